"""FLUX.1 architecture configs: the full-size dev / schnell models and tiny test configs."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Static architecture of a FLUX.1 transformer.

    Attributes:
      in_channels: channels of a packed latent token (16 latent channels x 2 x 2 = 64).
      out_channels: channels predicted per token (equal to ``in_channels`` for FLUX.1).
      hidden: model width C.
      heads: attention heads H (``hidden == heads * head_dim``).
      mlp_hidden: MLP width F.
      depth_double: number of double-stream blocks.
      depth_single: number of single-stream blocks.
      context_dim: width of the T5 token embeddings.
      vec_dim: width of the pooled CLIP embedding.
      axes_dim: RoPE dimensions of the 3 position axes (sum == head_dim).
      theta: RoPE base.
      guidance_embed: whether the model has a guidance embedding (dev: yes, schnell: no).
    """

    in_channels: int = 64
    out_channels: int = 64
    hidden: int = 3072
    heads: int = 24
    mlp_hidden: int = 12288
    depth_double: int = 19
    depth_single: int = 38
    context_dim: int = 4096
    vec_dim: int = 768
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    guidance_embed: bool = True

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise ValueError(f"axes_dim {self.axes_dim} must be even and sum to head_dim {self.head_dim}")
        if min(self.depth_double, self.depth_single) < 0:
            raise ValueError(f"depths must be >= 0, got {self.depth_double}, {self.depth_single}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def num_layers(self) -> int:
        """Sparsifiable layers: double blocks then single blocks share one layer index."""
        return self.depth_double + self.depth_single

    def replace(self, **kwargs) -> FluxConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict:
        """JSON-ready fields (the manifest's ``config``)."""
        d = dataclasses.asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FluxConfig:
        """Inverse of ``to_dict``; rejects unknown fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown FluxConfig fields {unknown}")
        return cls(**d)


FLUX_DEV = FluxConfig()
FLUX_SCHNELL = FluxConfig(guidance_embed=False)


def tiny_config(guidance_embed: bool = True, **kwargs) -> FluxConfig:
    """A few-thousand-parameter Flux for tests (same structure as the full model)."""
    base = dict(
        in_channels=16,
        out_channels=16,
        hidden=32,
        heads=2,
        mlp_hidden=64,
        depth_double=2,
        depth_single=3,
        context_dim=24,
        vec_dim=12,
        axes_dim=(4, 6, 6),
        guidance_embed=guidance_embed,
    )
    base.update(kwargs)
    return FluxConfig(**base)


CONFIGS = {"dev": FLUX_DEV, "schnell": FLUX_SCHNELL}
