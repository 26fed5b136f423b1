"""Loading converted FLUX.1 checkpoints into ``models.flux.Flux`` without a random init."""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from models.flux.config import FluxConfig
from models.flux.model import Flux


def read_flux_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a converted Flux checkpoint; raises on a missing directory or another model's checkpoint."""
    from convert_weights.common import read_manifest

    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    m = read_manifest(path)
    if m.get("model") != "flux":
        raise ValueError(f"{path} holds a {m.get('model')!r} checkpoint, not a Flux transformer")
    return m


def load(path: str | os.PathLike, dtype=None) -> Flux:
    """Builds the Flux model described by a converted checkpoint and fills it with the stored weights.

    Args:
      path: directory written by ``python -m convert_weights flux``.
      dtype: cast the parameters to this dtype (default: as stored).

    Returns:
      The model; its structure comes from ``nnx.eval_shape`` (no random initialisation is run).
    """
    from convert_weights.common import fill_module, read_checkpoint

    manifest = read_flux_manifest(path)
    cfg = FluxConfig.from_dict(manifest["config"])
    stored = jnp.dtype(manifest["dtype"])
    dtype = jnp.dtype(dtype) if dtype is not None else stored
    abstract = nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    return fill_module(abstract, read_checkpoint(path), where=str(path), dtype=dtype)
