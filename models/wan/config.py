"""Wan2.1 transformer architecture configs: the released T2V / I2V models and tiny test configs."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Static architecture of a Wan2.1 transformer (diffusers ``WanTransformer3DModel`` fields).

    Attributes:
      patch_size: (pt, ph, pw) of the 3-D patch embedding.
      in_channels: latent channels in (16 for T2V; 36 for I2V: noise 16 + mask 4 + image latents 16).
      out_channels: channels predicted per latent voxel.
      dim: model width C (= heads * head_dim).
      heads: attention heads H.
      ffn_dim: feed-forward width F.
      num_layers: transformer blocks.
      text_dim: width of the UMT5 token embeddings.
      freq_dim: width of the sinusoidal timestep embedding.
      cross_attn_norm: affine LayerNorm before the cross-attention (``norm2``); True in all releases.
      eps: epsilon of the block norms and of the q/k RMS norms.
      image_dim: width of the CLIP image tokens (I2V), or None (T2V).
      rope_max_seq_len: RoPE table length per axis (post-patch frames, rows and columns must not exceed it).
      theta: RoPE base.
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 16
    out_channels: int = 16
    dim: int = 5120
    heads: int = 40
    ffn_dim: int = 13824
    num_layers: int = 40
    text_dim: int = 4096
    freq_dim: int = 256
    cross_attn_norm: bool = True
    eps: float = 1e-6
    image_dim: int | None = None
    rope_max_seq_len: int = 1024
    theta: float = 10_000.0

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints, got {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not a multiple of heads {self.heads}")
        if self.head_dim % 2 or min(self.rope_dims) < 2:
            raise ValueError(f"head_dim {self.head_dim} is too small or odd for the 3-axis RoPE split")
        if self.num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {self.num_layers}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head-dim split (t, h, w) of the RoPE, as diffusers' WanRotaryPosEmbed: h = w = 2 * (D // 6)."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw

    @property
    def patch_volume(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    @property
    def is_i2v(self) -> bool:
        return self.image_dim is not None

    def replace(self, **kwargs) -> WanConfig:
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WanConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown WanConfig fields {unknown}")
        return cls(**d)


WAN_T2V_1_3B = WanConfig(dim=1536, heads=12, ffn_dim=8960, num_layers=30)
WAN_T2V_14B = WanConfig(dim=5120, heads=40, ffn_dim=13824, num_layers=40)
# The 480P and 720P I2V releases share this architecture.
WAN_I2V_14B = WanConfig(dim=5120, heads=40, ffn_dim=13824, num_layers=40, in_channels=36, image_dim=1280)


def tiny_config(i2v: bool = False, **kwargs) -> WanConfig:
    """A few-thousand-parameter Wan for tests (same structure as the released models)."""
    base = dict(
        in_channels=8 if i2v else 4,
        out_channels=4,
        dim=32,
        heads=2,
        ffn_dim=48,
        num_layers=3,
        text_dim=24,
        freq_dim=16,
        image_dim=20 if i2v else None,
        rope_max_seq_len=64,
    )
    base.update(kwargs)
    return WanConfig(**base)


CONFIGS = {"t2v-1.3b": WAN_T2V_1_3B, "t2v-14b": WAN_T2V_14B, "i2v-14b": WAN_I2V_14B}
