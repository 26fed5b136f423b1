"""Sampling the tiny pixel-space Flux, dense and with Chipmunk, through the Flux sampler.

``generate_images`` calls ``models.flux.sampling.generate`` as it is. ``sample_trajectory`` runs the same
steps (the same ``FluxDenoiser``, schedule, caches and compiled step functions of ``chipmunk_jax.sampler``) but
keeps the latents after every step, for the per-step error of ``chipmunk_jax.evaluate``.

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
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chipmunk_jax.cache import cache_nbytes
from chipmunk_jax.config import ChipmunkConfig, preset
from chipmunk_jax.reorder import patchify, unpatchify
from chipmunk_jax.sampler import Report, SamplerState, compiled_step
from chipmunk_jax.schedules import step_kinds
from models.flux.model import Flux, init_flux_cache, position_ids, rope_table
from models.flux.sampling import (
    PIXELS_PER_TOKEN,
    FluxCond,
    FluxDenoiser,
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


def _disabled() -> ChipmunkConfig:
    c = ChipmunkConfig()
    off = dict(is_enabled=False)
    return c.replace(attn=dataclasses.replace(c.attn, **off), mlp=dataclasses.replace(c.mlp, **off))


def tokens_to_images(tokens: jax.Array, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Raster Flux tokens [B, N, 48] -> images float32 [B, S, S, 3] in [0, 1]."""
    h, w = token_grid(image_size)
    return np.asarray(latent_to_image(unpack_latents(tokens, h, w)))


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
    txt, y = conditioning(np.asarray(labels))
    h, w = token_grid(image_size)
    gen = generate(
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
    )
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
    cfg = model.cfg
    txt, y = conditioning(np.asarray(labels))
    h, w = token_grid(image_size)
    b, ni = txt.shape[0], h * w
    patch = chipmunk is not None and chipmunk.patchify.is_enabled
    c1, c2 = (chipmunk.patchify.chunk_size_1, chipmunk.patchify.chunk_size_2) if chipmunk else (8, 4)
    if patch and (h % c1 or w % c1):
        raise ValueError(f"a {h}x{w} token grid is not a multiple of the patchify chunk {c1}")
    key = jax.random.key(seed)
    x = pack_noise(jax.random.fold_in(key, 0), b, h, w, cfg.in_channels)
    cos, sin = rope_table(position_ids(TXT_LEN, h, w), cfg.axes_dim, cfg.theta)
    if patch:
        cos, sin = (patchify(a, h, w, c1=c1, c2=c2, axis=0, start=TXT_LEN) for a in (cos, sin))
        x = patchify(x, h, w, c1=c1, c2=c2, axis=1)
    dt = model.dtype
    cond = FluxCond(txt=txt.astype(dt), y=y.astype(dt), guidance=None, cos=cos, sin=sin)
    plan_cfg = chipmunk if chipmunk is not None else _disabled()
    schedule = step_kinds(plan_cfg, steps, cfg.num_layers)
    cache = init_flux_cache(
        cfg, chipmunk, batch=b, txt_len=TXT_LEN, img_len=ni, dtype=dt, step_caching=plan_cfg.step_caching.is_enabled
    )
    graphdef, params = nnx.split(model)
    denoiser = FluxDenoiser(graphdef, chipmunk, backend)
    sigmas = jnp.asarray(flux_sigmas(steps, ni, dynamic_shift=cfg.guidance_embed), jnp.float32)
    state = SamplerState(step=jnp.zeros((), jnp.int32), latents=x, cache=cache, rng=jax.random.fold_in(key, 1))
    report, kept = Report(), []
    for plan in schedule.steps:
        exe, comp = compiled_step(denoiser, plan, params, cond, sigmas, state)
        if comp:
            report.compile_s[plan.label] = report.compile_s.get(plan.label, 0.0) + comp
        t0 = time.perf_counter()
        state = exe(params, cond, sigmas, state)
        jax.block_until_ready(state.latents)
        report.step_times.setdefault(plan.label, []).append(time.perf_counter() - t0)
        lat = unpatchify(state.latents, h, w, c1=c1, c2=c2, axis=1) if patch else state.latents
        kept.append(np.asarray(lat, np.float32))  # a copy: the state is donated to the next step
    report.stats = dict(denoiser.stats(state.cache))
    report.cache_bytes = cache_nbytes(state.cache)
    latents = np.stack(kept)
    return Trajectory(images=tokens_to_images(jnp.asarray(latents[-1]), image_size), latents=latents, report=report)
