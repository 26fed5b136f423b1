"""chipmunk-jax: training-free sparse-delta acceleration of diffusion transformers, in JAX.

The method's state is explicit: a frozen config, a static step-kind schedule, and cache pytrees passed into
and returned from pure operators.
"""

from chipmunk_jax import parallel
from chipmunk_jax.attention import dense_attention, sparse_attention
from chipmunk_jax.cache import (
    AttentionCache,
    MLPCache,
    attention_cache_nbytes,
    cache_nbytes,
    init_attention_cache,
    init_mlp_cache,
    mlp_cache_nbytes,
    model_cache_nbytes,
)
from chipmunk_jax.config import (
    AttnConfig,
    ChipmunkConfig,
    ConfigError,
    MLPConfig,
    OffloadingConfig,
    PatchifyConfig,
    StepCachingConfig,
    config_from_dict,
    load_config,
    preset,
)
from chipmunk_jax.indices import StaticMask, layer_rng, static_video_mask
from chipmunk_jax.mlp import dense_mlp, sparse_mlp
from chipmunk_jax.reorder import (
    patchify,
    patchify_permutation,
    unpatchify,
    unvoxelize,
    voxel_permutation,
    voxelize,
)
from chipmunk_jax.schedules import AttnKind, MLPKind, Schedule, StepPlan, step_kinds

__all__ = [
    "AttentionCache",
    "AttnConfig",
    "AttnKind",
    "ChipmunkConfig",
    "ConfigError",
    "MLPCache",
    "MLPConfig",
    "MLPKind",
    "OffloadingConfig",
    "PatchifyConfig",
    "Schedule",
    "StaticMask",
    "StepCachingConfig",
    "StepPlan",
    "attention_cache_nbytes",
    "cache_nbytes",
    "config_from_dict",
    "dense_attention",
    "dense_mlp",
    "init_attention_cache",
    "init_mlp_cache",
    "layer_rng",
    "load_config",
    "mlp_cache_nbytes",
    "model_cache_nbytes",
    "parallel",
    "patchify",
    "patchify_permutation",
    "preset",
    "sparse_attention",
    "sparse_mlp",
    "static_video_mask",
    "step_kinds",
    "unpatchify",
    "unvoxelize",
    "voxel_permutation",
    "voxelize",
]
