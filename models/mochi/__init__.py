"""Mochi 1 asymmetric video DiT in Flax NNX with Chipmunk sparse joint attention."""

from models.mochi.config import CONFIGS, MOCHI_1_PREVIEW, MochiConfig, tiny_config
from models.mochi.transformer import (
    ChipmunkRun,
    MochiCache,
    MochiTransformer3D,
    forward,
    init_mochi_cache,
    mochi_static_mask,
    post_patch_grid,
    rope_positions,
    rope_table,
    sparse_layers,
)

__all__ = [
    "CONFIGS",
    "MOCHI_1_PREVIEW",
    "ChipmunkRun",
    "MochiCache",
    "MochiConfig",
    "MochiTransformer3D",
    "forward",
    "init_mochi_cache",
    "mochi_static_mask",
    "post_patch_grid",
    "rope_positions",
    "rope_table",
    "sparse_layers",
    "tiny_config",
]
