"""Loading converted Mochi 1 transformer checkpoints (``python -m convert_weights mochi``) without a random init."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from models.mochi.config import MochiConfig
from models.mochi.transformer import MochiTransformer3D

MODEL = "mochi"


def read_mochi_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a converted Mochi checkpoint; raises on a missing directory or another model's checkpoint."""
    from convert_weights.common import read_manifest

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"checkpoint directory {path} does not exist; convert one with "
            "`python -m convert_weights mochi --src <mochi transformer> --dst <dir>`"
        )
    m = read_manifest(path)
    if m.get("model") != MODEL:
        raise ValueError(f"{path} holds a {m.get('model')!r} checkpoint, not a Mochi transformer")
    return m


def load_config(path: str | os.PathLike) -> MochiConfig:
    """The architecture stored with a converted checkpoint (reads only the manifest)."""
    return MochiConfig.from_dict(read_mochi_manifest(path)["config"])


def load_transformer(ckpt_dir: str | os.PathLike, dtype=None, host: bool = False) -> MochiTransformer3D:
    """Builds the Mochi transformer described by a converted checkpoint and fills it with the stored weights.

    Args:
      ckpt_dir: directory written by ``python -m convert_weights mochi``.
      dtype: parameter dtype (default: as stored). ``pos_frequencies`` is float32 whatever the dtype, as the
        model defines it.
      host: keep the parameters in host memory (JAX's CPU device) instead of the default device, e.g. to shard
        them over a mesh afterwards (``jax.device_put(nnx.state(model), shardings)``) without first
        materialising the whole model on one accelerator.

    Returns:
      The model; its structure comes from ``nnx.eval_shape`` (no random initialisation is run).

    Raises:
      FileNotFoundError: no such directory or no manifest in it.
      ValueError: another model's checkpoint, or stored arrays that do not match the model (all listed).
    """
    from convert_weights.common import fill_module, read_checkpoint

    manifest = read_mochi_manifest(ckpt_dir)
    cfg = MochiConfig.from_dict(manifest["config"])
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(manifest["dtype"])
    abstract = nnx.eval_shape(lambda: MochiTransformer3D(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    arrays = read_checkpoint(ckpt_dir)
    # dtype=None: every parameter takes the abstract model's dtype (``dtype``, float32 for pos_frequencies).
    if host:
        with jax.default_device(jax.devices("cpu")[0]):
            return fill_module(abstract, arrays, where=str(ckpt_dir), dtype=None)
    return fill_module(abstract, arrays, where=str(ckpt_dir), dtype=None)
