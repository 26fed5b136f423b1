"""Image encoders: the CLIP vision tower of Wan2.1 image-to-video, and CLIP's image preprocessing."""

from models.image_encoders.clip_vision import (
    CLIP_VISION_TINY,
    CLIP_VIT_H_14,
    CLIPVisionConfig,
    CLIPVisionEncoder,
    encode,
    preprocess,
)

__all__ = ["CLIP_VISION_TINY", "CLIP_VIT_H_14", "CLIPVisionConfig", "CLIPVisionEncoder", "encode", "preprocess"]
