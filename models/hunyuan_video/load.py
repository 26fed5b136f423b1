"""Loading converted HunyuanVideo checkpoints (``python -m convert_weights hunyuan-video``) without a random init."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from models.hunyuan_video.config import HunyuanVideoConfig
from models.hunyuan_video.transformer import HunyuanVideoTransformer3D

MODEL = "hunyuan_video"


def read_hunyuan_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a converted HunyuanVideo checkpoint.

    Raises:
      FileNotFoundError: the directory or its manifest is missing (the message says how to convert one).
      ValueError: the directory holds another model's checkpoint.
    """
    from convert_weights.common import read_manifest

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"checkpoint directory {path} does not exist; convert one with "
            "`python -m convert_weights hunyuan-video --src <HunyuanVideo/transformer> --dst <dir>`"
        )
    m = read_manifest(path)
    if m.get("model") != MODEL:
        raise ValueError(f"{path} holds a {m.get('model')!r} checkpoint, not a HunyuanVideo transformer")
    return m


def read_config(path: str | os.PathLike) -> HunyuanVideoConfig:
    """The architecture stored in a converted checkpoint's manifest (nothing else is read)."""
    from convert_weights.hunyuan_video import config_from_dict

    return config_from_dict(read_hunyuan_manifest(path)["config"])


def load_transformer(ckpt_dir: str | os.PathLike, dtype=None, host: bool = False) -> HunyuanVideoTransformer3D:
    """Builds the HunyuanVideo transformer of a converted checkpoint and fills it with the stored weights.

    Args:
      ckpt_dir: directory written by ``python -m convert_weights hunyuan-video``.
      dtype: cast the parameters (and so the compute) to this dtype; None keeps the stored dtype.
      host: place the parameters in host memory (the CPU device) instead of the default device: for a 13B
        model that is then sharded over a mesh (``jax.device_put``) or offloaded, so that it never has to fit
        on one accelerator whole. A jitted call on the accelerator still accepts them (they are copied in).

    Returns:
      The model; its structure comes from ``nnx.eval_shape`` (no random initialisation runs).

    Raises:
      FileNotFoundError / ValueError: a missing directory, another model's checkpoint, or stored arrays that do
        not match the manifest's architecture (every mismatch listed).
    """
    from convert_weights.common import fill_module, read_checkpoint

    manifest = read_hunyuan_manifest(ckpt_dir)
    cfg = read_config(ckpt_dir)
    dt = jnp.dtype(dtype) if dtype is not None else jnp.dtype(manifest["dtype"])
    abstract = nnx.eval_shape(lambda: HunyuanVideoTransformer3D(cfg, rngs=nnx.Rngs(0), dtype=dt))
    arrays = read_checkpoint(ckpt_dir)  # numpy, host memory
    if host:
        with jax.default_device(jax.devices("cpu")[0]):
            return fill_module(abstract, arrays, where=str(ckpt_dir), dtype=dt)
    return fill_module(abstract, arrays, where=str(ckpt_dir), dtype=dt)
