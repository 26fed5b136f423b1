"""Mochi 1 transformer architecture configs: the released preview (10B) and a tiny test config."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MochiConfig:
    """Static architecture of a Mochi 1 asymmetric DiT (diffusers ``MochiTransformer3DModel`` fields).

    Attributes:
      patch_size: spatial patch p (the patch is 1 x p x p: frames are not patched).
      in_channels: latent channels in.
      out_channels: channels predicted per latent voxel.
      heads: attention heads H (both streams share the joint attention's heads).
      head_dim: D.
      num_layers: transformer blocks; the last one has no text output (``context_pre_only``).
      text_width: width of the text stream (diffusers ``pooled_projection_dim``).
      text_dim: width of the T5 token embeddings.
      time_embed_dim: width of the sinusoidal timestep embedding.
      text_pool_heads: heads of the attention pooling of the text into the conditioning vector.
      eps: epsilon of the block RMS norms and of the output LayerNorm.
      qk_eps: epsilon of the per-head q/k RMS norms.
    """

    patch_size: int = 2
    in_channels: int = 12
    out_channels: int = 12
    heads: int = 24
    head_dim: int = 128
    num_layers: int = 48
    text_width: int = 1536
    text_dim: int = 4096
    time_embed_dim: int = 256
    text_pool_heads: int = 8
    eps: float = 1e-6
    qk_eps: float = 1e-5

    def __post_init__(self):
        if self.patch_size < 1 or self.head_dim % 2:
            raise ValueError(f"need patch_size >= 1 and an even head_dim, got {self.patch_size}, {self.head_dim}")
        if self.text_dim % self.text_pool_heads:
            raise ValueError(f"text_dim {self.text_dim} is not a multiple of text_pool_heads {self.text_pool_heads}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1 (the last block is the text-less one), got {self.num_layers}")

    @property
    def dim(self) -> int:
        """Visual width C (= heads * head_dim, also the attention inner width)."""
        return self.heads * self.head_dim

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden width of the visual stream (diffusers: 4 * C * 2 // 3)."""
        return 4 * self.dim * 2 // 3

    @property
    def text_ffn_dim(self) -> int:
        """SwiGLU hidden width of the text stream."""
        return 4 * self.text_width * 2 // 3

    @property
    def patch_volume(self) -> int:
        return self.patch_size * self.patch_size

    def replace(self, **kwargs) -> MochiConfig:
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MochiConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown MochiConfig fields {unknown}")
        return cls(**d)


MOCHI_1_PREVIEW = MochiConfig()


def tiny_config(**kwargs) -> MochiConfig:
    """A few-ten-thousand-parameter Mochi for tests (same structure as the release)."""
    base = dict(
        in_channels=4,
        out_channels=4,
        heads=2,
        head_dim=16,
        num_layers=3,
        text_width=24,
        text_dim=32,
        time_embed_dim=16,
    )
    base.update(kwargs)
    return MochiConfig(**base)


CONFIGS = {"mochi-1-preview": MOCHI_1_PREVIEW}
