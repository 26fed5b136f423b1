"""HunyuanVideo text-to-video transformer in Flax NNX with Chipmunk sparse joint attention."""

from models.hunyuan_video.config import CONFIGS, HUNYUAN_VIDEO_13B, HunyuanVideoConfig, tiny_config
from models.hunyuan_video.transformer import (
    ChipmunkRun,
    HunyuanCache,
    HunyuanVideoTransformer3D,
    forward,
    hunyuan_static_mask,
    init_hunyuan_cache,
    post_patch_grid,
    sparse_layers,
    valid_text_length,
    video_rope,
)

__all__ = [
    "CONFIGS",
    "HUNYUAN_VIDEO_13B",
    "ChipmunkRun",
    "HunyuanCache",
    "HunyuanVideoConfig",
    "HunyuanVideoTransformer3D",
    "forward",
    "hunyuan_static_mask",
    "init_hunyuan_cache",
    "post_patch_grid",
    "sparse_layers",
    "tiny_config",
    "valid_text_length",
    "video_rope",
]
