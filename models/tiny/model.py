"""The tiny pixel-space Flux: its config, class conditioning, pixel <-> token packing and checkpoint files.

The model is ``models.flux.Flux`` unchanged, only small. There is no VAE: a 64x64x3 image is folded 2x2
space-to-depth into a 12-channel "latent" of 32x32, which Flux packs 2x2 as usual into 16x16 = 256 tokens of 48
channels. So ``models.flux.sampling.unpack_latents`` returns that 12-channel latent and ``latent_to_image``
plays the VAE decoder's role.

Class conditioning goes through Flux's own inputs, with fixed (not learned) embeddings:
  y   [B, NUM_CLASSES]              one-hot class (through ``vector_in`` into the modulation vector),
  txt [B, 2, NUM_SHAPES + NUM_COLOURS]  a one-hot shape token and a one-hot colour token (through ``txt_in``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.flux.config import FluxConfig
from models.flux.model import Flux
from models.tiny import dataset

IMAGE_SIZE = 64
# Pixels per side folded into one latent position (the tiny model's stand-in for the VAE's 8x downsampling).
LATENT_FOLD = 2
LATENT_CHANNELS = 3 * LATENT_FOLD * LATENT_FOLD
TXT_LEN = 2
CONTEXT_DIM = len(dataset.SHAPES) + len(dataset.COLOURS)
CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "config.json"


def tiny_flux_config(**overrides) -> FluxConfig:
    """The shipped architecture (2 double + 4 single blocks, width 192, 3 heads of 64, 5.1M parameters)."""
    base = dict(
        in_channels=4 * LATENT_CHANNELS,
        out_channels=4 * LATENT_CHANNELS,
        hidden=192,
        heads=3,
        mlp_hidden=768,
        depth_double=2,
        depth_single=4,
        context_dim=CONTEXT_DIM,
        vec_dim=dataset.NUM_CLASSES,
        axes_dim=(8, 28, 28),
        guidance_embed=False,
    )
    base.update(overrides)
    return FluxConfig(**base)


def tiny_flux_config_for(hidden: int, depth_double: int, depth_single: int, head_dim: int = 64) -> FluxConfig:
    """A tiny config of another width / depth: heads of ``head_dim`` (fewer if narrower), MLP 4x, RoPE 1:3.5:3.5."""
    heads = max(1, hidden // head_dim)
    d = hidden // heads
    a0 = 2 * max(1, d // 16)
    a1 = 2 * ((d - a0) // 4)
    return tiny_flux_config(
        hidden=hidden,
        heads=heads,
        mlp_hidden=4 * hidden,
        depth_double=depth_double,
        depth_single=depth_single,
        axes_dim=(a0, a1, d - a0 - a1),
    )


def token_grid(size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(h, w) of the image token grid: 2 * LATENT_FOLD pixels per token side."""
    per = 2 * LATENT_FOLD
    if size % per:
        raise ValueError(f"image size {size} is not a multiple of {per}")
    return size // per, size // per


def conditioning(labels: np.ndarray | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Fixed class embeddings: (txt [B, 2, CONTEXT_DIM], y [B, NUM_CLASSES]) float32 from labels [B].

    A negative label is the null condition (all zeros), which training with ``p_uncond`` > 0 teaches the
    model as "any class" (for classifier-free guidance).
    """
    labels = jnp.asarray(labels, jnp.int32)
    n_col = len(dataset.COLOURS)
    valid = labels >= 0
    cls = jnp.where(valid, labels, 0)
    shape, colour = cls // n_col, cls % n_col
    t_shape = jax.nn.one_hot(shape, CONTEXT_DIM, dtype=jnp.float32)
    t_colour = jax.nn.one_hot(len(dataset.SHAPES) + colour, CONTEXT_DIM, dtype=jnp.float32)
    y = jax.nn.one_hot(cls, dataset.NUM_CLASSES, dtype=jnp.float32)
    keep = valid.astype(jnp.float32)
    return jnp.stack([t_shape, t_colour], axis=1) * keep[:, None, None], y * keep[:, None]


def image_to_tokens(images: jax.Array) -> jax.Array:
    """Images [B, S, S, 3] in [0, 1] -> Flux tokens [B, (S/4)^2, 48] in [-1, 1] (raster order)."""
    b, s, _, c = images.shape
    f = LATENT_FOLD
    x = images.astype(jnp.float32) * 2.0 - 1.0
    # Space-to-depth: latent channel index = c * f * f + dy * f + dx.
    lat = x.reshape(b, s // f, f, s // f, f, c).transpose(0, 5, 2, 4, 1, 3).reshape(b, c * f * f, s // f, s // f)
    h = s // (2 * f)
    # Flux packing (the inverse of models.flux.sampling.unpack_latents).
    tok = lat.reshape(b, c * f * f, h, 2, h, 2).transpose(0, 2, 4, 1, 3, 5)
    return tok.reshape(b, h * h, c * f * f * 4)


def latent_to_image(latents: jax.Array) -> jax.Array:
    """Unpacked latents [B, 12, S/2, S/2] (``unpack_latents``) -> images [B, S, S, 3] in [0, 1] (clipped)."""
    b, ch, hh, ww = latents.shape
    f = LATENT_FOLD
    c = ch // (f * f)
    x = latents.astype(jnp.float32).reshape(b, c, f, f, hh, ww).transpose(0, 4, 2, 5, 3, 1)
    return jnp.clip((x.reshape(b, hh * f, ww * f, c) + 1.0) * 0.5, 0.0, 1.0)


def init_model(cfg: FluxConfig, seed: int = 0, dtype=jnp.float32) -> Flux:
    """A freshly initialised tiny Flux with adaLN-zero: every block and the output start as the identity / zero.

    Flux's own init draws every weight at random; zeroing the modulation (hence the gates) and the output
    projection, as DiT does, makes the short CPU training converge much faster.
    """
    model = Flux(cfg, rngs=nnx.Rngs(seed), dtype=dtype)
    for stack, names in (
        (model.double, ("img_mod_w", "img_mod_b", "txt_mod_w", "txt_mod_b")),
        (model.single, ("mod_w", "mod_b")),
        (model.final_mod, ("kernel", "bias")),
        (model.final_linear, ("kernel", "bias")),
    ):
        for name in names:
            p = getattr(stack, name)
            p[...] = jnp.zeros_like(p[...])
    return model


def flat_params(model: Flux) -> dict[str, np.ndarray]:
    """Dotted parameter path -> numpy array (the names ``convert_weights.common.fill_module`` expects)."""
    _, state = nnx.split(model)
    return {".".join(str(k) for k in path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def save_checkpoint(model: Flux, path: str | os.PathLike, meta: dict, dtype=np.float16) -> Path:
    """Writes ``model.safetensors`` (parameters cast to ``dtype``) and ``config.json`` into directory ``path``.

    Args:
      model: the trained model.
      path: checkpoint directory (created).
      meta: extra JSON-ready fields (training command, steps, loss, ...); ``flux_config`` is added.
      dtype: storage dtype of the weights.

    Returns:
      The directory.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    params = {k: v.astype(dtype) for k, v in flat_params(model).items()}
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file(params, str(tmp))
    os.replace(tmp, path / WEIGHTS_FILE)
    full = dict(meta)
    full["flux_config"] = model.cfg.to_dict()
    full["weights_dtype"] = np.dtype(dtype).name
    full["num_params"] = int(sum(v.size for v in params.values()))
    (path / META_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return path


def read_meta(path: str | os.PathLike = CHECKPOINT_DIR) -> dict:
    """The ``config.json`` of a tiny checkpoint directory."""
    f = Path(path) / META_FILE
    if not f.exists():
        raise FileNotFoundError(
            f"{path} is not a tiny-model checkpoint (no {META_FILE}); train one with `python -m models.tiny.train`"
        )
    return json.loads(f.read_text())


def load_checkpoint(path: str | os.PathLike = CHECKPOINT_DIR, dtype=jnp.float32) -> tuple[Flux, dict]:
    """Loads a tiny checkpoint strictly (every parameter present, with its shape) into a Flux of ``dtype``.

    Returns:
      (model, meta) with meta the checkpoint's ``config.json``.
    """
    from safetensors.numpy import load_file

    from convert_weights.common import fill_module

    meta = read_meta(path)
    cfg = FluxConfig.from_dict(meta["flux_config"])
    arrays = load_file(str(Path(path) / WEIGHTS_FILE))
    abstract = nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    return fill_module(abstract, arrays, where=str(path), dtype=dtype), meta
