"""HunyuanVideo transformer architecture configs: the released 13B model and tiny test configs."""

from __future__ import annotations

import dataclasses

# diffusers builds the token refiner with its default MLP ratio whatever the model's ``mlp_ratio`` is.
REFINER_MLP_RATIO = 4.0


@dataclasses.dataclass(frozen=True)
class HunyuanVideoConfig:
    """Static architecture of a HunyuanVideo transformer (diffusers ``HunyuanVideoTransformer3DModel`` fields).

    The names ``hidden``, ``heads``, ``head_dim``, ``mlp_hidden``, ``depth_double`` and ``depth_single`` are those
    of ``FluxConfig``: the stacked Flux block modules are reused for the double- and single-stream blocks.

    Attributes:
      in_channels: latent channels in (16 for text-to-video).
      out_channels: channels predicted per latent voxel.
      heads: attention heads H.
      head_dim: head width D (model width C = H * D).
      depth_double: double-stream (video + text) blocks (diffusers ``num_layers``).
      depth_single: single-stream blocks (diffusers ``num_single_layers``).
      depth_refiner: token-refiner blocks (diffusers ``num_refiner_layers``).
      mlp_ratio: MLP width F = int(C * mlp_ratio) of the double/single blocks.
      patch_size: spatial patch (ph = pw).
      patch_size_t: temporal patch pt.
      guidance_embeds: embedded (distilled) guidance, as the released model.
      text_dim: width of the Llama text embeddings.
      pooled_dim: width of the pooled CLIP text embedding.
      rope_theta: RoPE base.
      rope_axes_dim: head-dim split (t, h, w) of the 3-D RoPE (sums to head_dim).
    """

    in_channels: int = 16
    out_channels: int = 16
    heads: int = 24
    head_dim: int = 128
    depth_double: int = 20
    depth_single: int = 40
    depth_refiner: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    guidance_embeds: bool = True
    text_dim: int = 4096
    pooled_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)

    def __post_init__(self):
        object.__setattr__(self, "rope_axes_dim", tuple(int(d) for d in self.rope_axes_dim))
        if len(self.rope_axes_dim) != 3 or sum(self.rope_axes_dim) != self.head_dim:
            raise ValueError(f"rope_axes_dim {self.rope_axes_dim} must be 3 sizes summing to head_dim {self.head_dim}")
        if any(d % 2 for d in self.rope_axes_dim):
            raise ValueError(f"rope_axes_dim {self.rope_axes_dim} must be even sizes")
        if min(self.patch_size, self.patch_size_t) < 1:
            raise ValueError(f"patch sizes must be >= 1, got {self.patch_size_t=}, {self.patch_size=}")
        if min(self.depth_double, self.depth_single, self.depth_refiner) < 0:
            raise ValueError("block counts must be >= 0")

    @property
    def hidden(self) -> int:
        """Model width C."""
        return self.heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        """MLP width F of the double/single blocks."""
        return int(self.hidden * self.mlp_ratio)

    @property
    def refiner_mlp_hidden(self) -> int:
        return int(self.hidden * REFINER_MLP_RATIO)

    @property
    def num_layers(self) -> int:
        """Layers sharing the Chipmunk layer index: the double blocks, then the single blocks."""
        return self.depth_double + self.depth_single

    @property
    def patch(self) -> tuple[int, int, int]:
        """(pt, ph, pw)."""
        return self.patch_size_t, self.patch_size, self.patch_size

    @property
    def patch_volume(self) -> int:
        return self.patch_size_t * self.patch_size * self.patch_size

    def replace(self, **kwargs) -> HunyuanVideoConfig:
        return dataclasses.replace(self, **kwargs)


HUNYUAN_VIDEO_13B = HunyuanVideoConfig()


def tiny_config(**kwargs) -> HunyuanVideoConfig:
    """A tiny HunyuanVideo for tests (same structure as the release: refiner, guidance, 3-D RoPE)."""
    base = dict(
        in_channels=4,
        out_channels=4,
        heads=2,
        head_dim=16,
        depth_double=2,
        depth_single=2,
        depth_refiner=2,
        text_dim=24,
        pooled_dim=20,
        rope_axes_dim=(4, 6, 6),
    )
    base.update(kwargs)
    return HunyuanVideoConfig(**base)


CONFIGS = {"13b": HUNYUAN_VIDEO_13B}
