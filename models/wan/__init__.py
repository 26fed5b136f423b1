"""Wan2.1 video transformer in Flax NNX with Chipmunk sparse self-attention, its solvers and sampler."""

from models.wan.config import CONFIGS, WAN_I2V_14B, WAN_T2V_1_3B, WAN_T2V_14B, WanConfig, tiny_config
from models.wan.sampling import WanCond, WanDenoiser, WanGeneration, generate, latent_size
from models.wan.scheduler import FlowEuler, FlowTables, UniPC, UniPCState, flow_sigmas
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
    "FlowEuler",
    "FlowTables",
    "UniPC",
    "UniPCState",
    "WanCache",
    "WanCond",
    "WanConfig",
    "WanDenoiser",
    "WanGeneration",
    "WanTransformer3D",
    "flow_sigmas",
    "forward",
    "generate",
    "init_wan_cache",
    "latent_size",
    "post_patch_grid",
    "rope_table",
    "sparse_layers",
    "tiny_config",
    "wan_static_mask",
]
