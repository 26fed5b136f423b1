"""Loading converted FLUX.1 checkpoints into ``models.flux.Flux`` without a random init."""

from __future__ import annotations

import os

import jax
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
    from convert_weights.common import read_checkpoint

    manifest = read_flux_manifest(path)
    cfg = FluxConfig.from_dict(manifest["config"])
    stored = jnp.dtype(manifest["dtype"])
    dtype = jnp.dtype(dtype) if dtype is not None else stored
    abstract = nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    arrays = read_checkpoint(path)
    flat = []
    seen = set()
    problems = []
    for p, var in nnx.to_flat_state(state):
        name = ".".join(str(x) for x in p)
        seen.add(name)
        if name not in arrays:
            problems.append(f"missing {name}")
            continue
        a = arrays[name]
        if tuple(a.shape) != tuple(var.get_value().shape):
            problems.append(f"{name}: stored {tuple(a.shape)}, model {tuple(var.get_value().shape)}")
            continue
        flat.append((p, var.replace(jax.device_put(jnp.asarray(a, dtype)))))
    extra = sorted(set(arrays) - seen)
    if extra:
        problems.append(f"unexpected stored arrays {extra}")
    if problems:
        raise ValueError(f"{path}: checkpoint does not match the model:\n  " + "\n  ".join(problems))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
