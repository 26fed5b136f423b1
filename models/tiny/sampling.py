"""Sampling the tiny pixel-space Flux, dense and with Chipmunk, through the Flux sampler.

``generate_images`` calls ``models.flux.sampling.generate`` as it is; ``sample_trajectory`` calls it with
``trajectory=True`` (the same compiled steps, keeping the latents after every step) for the per-step error of
``chipmunk_jax.evaluate``.

The Flux preset is tuned for FLUX.1's 4096 + 512 tokens. ``tiny_preset`` keeps every decision of it (top_keys,
full-step cadence, dense layers, MLP quantile, patchify chunks) and shrinks only the granularities that are
GPU tile sizes and would otherwise swamp 2 + 256 tokens:
  attn.counts_multiple_of 112 -> 16  (112 of 258 keys would floor the attention density at 43%),
  attn.mbm 192 -> 16                 (one query group per 4x4 patchify chunk: about the same share of the image),
  mlp.bm 128 -> 64                   (token blocks sharing a neuron selection),
  mlp.counts_multiple_of 256 -> 32   (256 of 768 neurons would floor the MLP density at 33%).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chipmunk_jax.config import ChipmunkConfig, preset
from chipmunk_jax.sampler import Report
from models.flux.model import Flux, position_ids, rope_table
from models.flux.sampling import (
    PIXELS_PER_TOKEN,
    flux_sigmas,
    generate,
    pack_noise,
    unpack_latents,
)
from models.tiny.model import IMAGE_SIZE, TXT_LEN, conditioning, latent_to_image, token_grid


def tiny_preset(base: ChipmunkConfig | None = None) -> ChipmunkConfig:
    """The Flux preset (or ``base``) with its tile-size granularities scaled to the tiny token count.

    Attention: one key selection per 4x4-token patchify chunk (mbm 16; Flux's 192 queries are 4.7% of its 4096
    image tokens, 16 are 6% of 256) and counts rounded to 16 keys. MLP: token blocks of 64 and neuron counts
    rounded to 32. Measured on the shipped model (docs/DEMO.md): query groups of 64 instead of 16 cost 3.8 dB of
    PSNR at the same sparsity; MLP blocks of 16 instead of 64 cost 2 dB.
    """
    base = base if base is not None else preset("flux")
    return base.replace(
        attn=dataclasses.replace(base.attn, counts_multiple_of=16, mbm=16),
        mlp=dataclasses.replace(base.mlp, bm=64, counts_multiple_of=32),
    )


def tokens_to_images(tokens: jax.Array, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Raster Flux tokens [B, N, 48] -> images float32 [B, S, S, 3] in [0, 1]."""
    h, w = token_grid(image_size)
    return np.asarray(latent_to_image(unpack_latents(tokens, h, w)))


def _generate(model: Flux, labels, *, steps, seed, chipmunk, backend, image_size, progress, trajectory=False):
    """``models.flux.sampling.generate`` on the tiny model's class conditioning, one image per label."""
    txt, y = conditioning(np.asarray(labels))
    h, w = token_grid(image_size)
    return generate(
        model,
        txt,
        y,
        # generate counts 16 pixels per token (VAE 8x, packing 2x); the tiny model's tokens are 4 pixels.
        width=w * PIXELS_PER_TOKEN,
        height=h * PIXELS_PER_TOKEN,
        steps=steps,
        seed=seed,
        guidance=None,
        chipmunk=chipmunk,
        backend=backend,
        progress=progress,
        trajectory=trajectory,
    )


def generate_images(
    model: Flux,
    labels,
    *,
    steps: int,
    seed: int,
    chipmunk: ChipmunkConfig | None = None,
    backend: str = "auto",
    image_size: int = IMAGE_SIZE,
    progress: bool = False,
):
    """Samples one image per label with ``models.flux.sampling.generate``.

    Returns:
      (images float32 [B, S, S, 3] in [0, 1], the Generation with its Report).
    """
    kw = dict(steps=steps, seed=seed, chipmunk=chipmunk, backend=backend, image_size=image_size, progress=progress)
    gen = _generate(model, labels, **kw)
    return np.asarray(latent_to_image(gen.latents)), gen


@dataclasses.dataclass
class Trajectory:
    """A generation with its intermediate states.

    Attributes:
      images: float32 [B, S, S, 3] in [0, 1].
      latents: float32 [steps, B, N, C] raster-order tokens after each step.
      report: the sampler Report (per-kind step times, compile time, achieved sparsity, cache bytes).
    """

    images: np.ndarray
    latents: np.ndarray
    report: Report


def sample_trajectory(
    model: Flux,
    labels,
    *,
    steps: int,
    seed: int,
    chipmunk: ChipmunkConfig | None = None,
    backend: str = "auto",
    image_size: int = IMAGE_SIZE,
) -> Trajectory:
    """The generation of ``generate_images`` (same noise, schedule and step functions), step by step.

    Returns:
      A Trajectory whose final latents equal ``generate``'s.
    """
    gen = _generate(
        model,
        labels,
        steps=steps,
        seed=seed,
        chipmunk=chipmunk,
        backend=backend,
        image_size=image_size,
        progress=False,
        trajectory=True,
    )
    return Trajectory(images=tokens_to_images(gen.tokens, image_size), latents=gen.trajectory, report=gen.report)


def guided_images(model: Flux, labels, scales, *, steps: int = 50, seed: int = 0) -> dict[float, np.ndarray]:
    """Dense Euler samples with classifier-free guidance, {scale: images float32 [B, 64, 64, 3] in [0, 1]}.

    For models trained with ``TrainConfig.p_uncond`` > 0 (label dropout), which know the null condition (label
    -1). The noise and sigmas are those of ``generate_images(model, labels, steps=steps, seed=seed)``, so scale 1
    gives its images (up to float rounding); other scales mix the conditional and the null-condition velocity,
    v = v_null + scale * (v_cond - v_null), at twice the model calls. Dense only: the Flux sampler (and so
    Chipmunk) runs FLUX.1's embedded guidance, not classifier-free guidance.
    """
    h, w = token_grid(IMAGE_SIZE)
    cfg = model.cfg
    rope = rope_table(position_ids(TXT_LEN, h, w), cfg.axes_dim, cfg.theta)
    labels = np.asarray(labels)
    b = len(labels)
    x0 = pack_noise(jax.random.fold_in(jax.random.key(seed), 0), b, h, w, cfg.in_channels)
    sig = jnp.asarray(flux_sigmas(steps, h * w, dynamic_shift=False), jnp.float32)
    txt_c, y_c = conditioning(labels)
    txt_u, y_u = conditioning(-np.ones_like(labels))
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, x, scale):
        m = nnx.merge(graphdef, params)

        def body(i, x):
            t = jnp.full((b,), sig[i])
            vc, _ = m(x, txt_c, y_c, t, None, rope)
            vu, _ = m(x, txt_u, y_u, t, None, rope)
            return x + (sig[i + 1] - sig[i]) * (vu + scale * (vc - vu))

        return jax.lax.fori_loop(0, steps, body, x)

    return {float(s): tokens_to_images(run(params, x0, jnp.float32(s))) for s in scales}
