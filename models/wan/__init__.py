"""Wan2.1 video transformer in Flax NNX with Chipmunk sparse self-attention."""

from models.wan.config import CONFIGS, WAN_I2V_14B, WAN_T2V_1_3B, WAN_T2V_14B, WanConfig, tiny_config
from models.wan.transformer import (
    ChipmunkRun,
    WanCache,
    WanTransformer3D,
    forward,
    init_wan_cache,
    post_patch_grid,
    rope_table,
    sparse_layers,
    wan_static_mask,
)

__all__ = [
    "CONFIGS",
    "WAN_I2V_14B",
    "WAN_T2V_14B",
    "WAN_T2V_1_3B",
    "ChipmunkRun",
    "WanCache",
    "WanConfig",
    "WanTransformer3D",
    "forward",
    "init_wan_cache",
    "post_patch_grid",
    "rope_table",
    "sparse_layers",
    "tiny_config",
    "wan_static_mask",
]
