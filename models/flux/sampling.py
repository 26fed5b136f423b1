"""FLUX.1 sampling glue: the Flux denoiser for ``chipmunk_jax.sampler``, the Flux schedule, token reordering.

Image tokens are patchified (SPEC §3.1) once before the loop, together with the image part of the RoPE table
(the text prefix stays in place), and unpatchified after it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from chipmunk_jax import parallel
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.reorder import patchify, unpatchify
from chipmunk_jax.sampler import EulerSampler, Report, SamplerState, flow_match_sigmas
from chipmunk_jax.schedules import AttnKind, MLPKind, StepPlan, step_kinds
from models.flux.model import ChipmunkRun, Flux, FluxCache, init_flux_cache, position_ids, rope_table

# Pixels per latent token: VAE downsampling 8 x packing 2.
PIXELS_PER_TOKEN = 16


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The resolution-dependent shift mu of the FLUX.1-dev pipeline (linear in the image token count)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux_sigmas(num_steps: int, image_seq_len: int, *, dynamic_shift: bool) -> np.ndarray:
    """Sigmas [num_steps + 1] of the diffusers Flux pipeline: dynamic shifting (dev) or none (schnell)."""
    mu = calculate_shift(image_seq_len) if dynamic_shift else None
    return flow_match_sigmas(num_steps, shift=1.0, mu=mu)


def check_size(width: int, height: int, patchify_on: bool = True, chunk: int = 8) -> tuple[int, int]:
    """Latent token grid (h, w) of an image size; raises ValueError naming the nearest valid sizes.

    With patchify on, h and w must be multiples of the patchify chunk (8 tokens = 128 px); else of 16 px.
    """
    step = PIXELS_PER_TOKEN * (chunk if patchify_on else 1)
    bad = [(name, v) for name, v in (("width", width), ("height", height)) if v <= 0 or v % step]
    if bad:
        hints = []
        for name, v in bad:
            lo, hi = max(step, (v // step) * step), max(step, -(-v // step) * step)
            near = f"{lo}" if lo == hi else f"{lo} or {hi}"
            hints.append(f"{name} {v} is not a multiple of {step} (nearest valid: {near})")
        why = " with patchify on (chunk_size_1 x 16 px)" if patchify_on else ""
        raise ValueError("; ".join(hints) + why)
    return height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN


def default_attention_impl(dtype) -> str | None:
    """cuDNN flash attention for 16-bit models on a GPU (the fastest dense attention there), else XLA's."""
    on_gpu = jax.devices()[0].platform == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else None


@flax.struct.dataclass
class FluxCond:
    """Per-generation conditioning (a traced argument of the step function).

    Attributes:
      txt: [B, Nt, context_dim] T5 embeddings.
      y: [B, vec_dim] pooled CLIP embedding.
      guidance: [B] embedded guidance (dev) or None (schnell).
      cos, sin: [Nt + Ni, head_dim / 2] RoPE table in the model's token order.
    """

    txt: jax.Array
    y: jax.Array
    guidance: jax.Array | None
    cos: jax.Array
    sin: jax.Array


def _sparse(plan: StepPlan) -> bool:
    return any(k is not AttnKind.DENSE for k in plan.attn) or any(k is not MLPKind.DENSE for k in plan.mlp)


@dataclasses.dataclass(frozen=True)
class FluxDenoiser:
    """The Flux velocity model for ``chipmunk_jax.sampler`` (static and hashable: holds the graphdef).

    Attributes:
      graphdef: ``nnx.split(model)[0]``.
      chipmunk: the Chipmunk config, or None for the dense model.
      backend: Chipmunk operator backend.
      attention_impl: ``implementation`` for jax.nn.dot_product_attention (dense layers / dense model).
      mesh: ``parallel.make_mesh`` mesh for CFG / sequence-parallel sampling, or None (one device).
    """

    graphdef: Any
    chipmunk: ChipmunkConfig | None = None
    backend: str = "auto"
    attention_impl: str | None = None
    mesh: Mesh | None = None

    def velocity(self, params, cond: FluxCond, latents, sigma, cache, rng, step, plan: StepPlan):
        """The model's velocity [B, Ni, C_out] at ``sigma`` and the new cache (one computed step)."""
        model: Flux = nnx.merge(self.graphdef, params)
        b = latents.shape[0]
        run = ChipmunkRun(self.chipmunk, plan, self.backend) if self.chipmunk is not None and _sparse(plan) else None
        v, cache = model(
            latents,
            cond.txt,
            cond.y,
            jnp.full((b,), sigma, jnp.float32),
            cond.guidance,
            (cond.cos, cond.sin),
            cache,
            chipmunk=run,
            rng=rng,
            step=step,
            attention_impl=self.attention_impl,
            mesh=self.mesh,
        )
        return v, cache

    def skip_velocity(self, params, cond: FluxCond, latents, sigma, cache: FluxCache):
        """Velocity of a skipped step: modulation + final layer on the cached hidden states (SPEC §4)."""
        model: Flux = nnx.merge(self.graphdef, params)
        if cache.hidden is None:
            raise ValueError("a skipped step needs cache.hidden (init_flux_cache(..., step_caching=True))")
        vec = model.embed_vec(cond.y, jnp.full((latents.shape[0],), sigma, jnp.float32), cond.guidance)
        return parallel.constrain_tokens(model.final_layer(cache.hidden, vec), self.mesh)

    def stats(self, cache: FluxCache) -> dict[str, float]:
        """Achieved density (fraction of keys / neurons computed on sparse steps) from the cache counts."""
        out = {}
        attn = [c for c in (cache.double_attn, cache.single_attn) if c is not None and c.counts is not None]
        if attn and self.chipmunk is not None:
            lay0 = self.chipmunk.attn.first_n_dense_layers
            counts, n_keys = _sparse_layers([c.counts for c in attn], lay0), attn[0].out.shape[-2]
            if counts.size:
                out["attention density (keys kept / keys)"] = float(counts.mean() / n_keys)
                out["attention sparsity"] = 1.0 - out["attention density (keys kept / keys)"]
        mlp = [c for c in (cache.double_mlp, cache.single_mlp) if c is not None]
        if mlp and self.chipmunk is not None:
            lay0 = self.chipmunk.mlp.first_n_dense_layers
            f = mlp[0].act.shape[-1]
            counts = _sparse_layers([c.counts for c in mlp], lay0)
            if counts.size and counts.max() > 0:
                out["mlp density (neurons kept / F)"] = float(np.minimum(counts, f).mean() / f)
                out["mlp sparsity"] = 1.0 - out["mlp density (neurons kept / F)"]
        return out


def _sparse_layers(per_stack: list, first_sparse: int) -> np.ndarray:
    """Counts of the layers >= first_sparse, over the double then single stacks (leading layer axis)."""
    layers = [np.asarray(layer).reshape(-1) for c in per_stack for layer in np.asarray(c)]
    kept = layers[first_sparse:]
    return np.concatenate(kept) if kept else np.zeros((0,), np.int32)


def _disabled(cfg: ChipmunkConfig | None) -> ChipmunkConfig:
    base = cfg or ChipmunkConfig()
    return base.replace(
        attn=dataclasses.replace(base.attn, is_enabled=False), mlp=dataclasses.replace(base.mlp, is_enabled=False)
    )


def pack_noise(key: jax.Array, batch: int, h: int, w: int, channels: int) -> jax.Array:
    """Initial noise as packed latent tokens [B, h*w, channels] (raster order), float32."""
    return jax.random.normal(key, (batch, h * w, channels), jnp.float32)


def unpack_latents(tokens: jax.Array, h: int, w: int) -> jax.Array:
    """Packed raster tokens [B, h*w, 4c] -> VAE latents [B, c, 2h, 2w] (diffusers' _unpack_latents layout)."""
    b, n, ch = tokens.shape
    c = ch // 4
    x = tokens.reshape(b, h, w, c, 2, 2)
    return x.transpose(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * h, 2 * w)


@dataclasses.dataclass
class Generation:
    """Result of ``generate``: final packed latents (raster order), VAE-layout latents, the report.

    ``trajectory`` (only with ``generate(..., trajectory=True)``): float32 [steps, B, Ni, C_out] packed latents
    in raster order after every step; its last entry equals ``tokens``.
    """

    tokens: jax.Array
    latents: jax.Array
    report: Report
    state: SamplerState
    trajectory: np.ndarray | None = None


def _place(state: SamplerState, params, cond: FluxCond, mesh: Mesh | None, offload: frozenset[str]):
    """Puts the sampler state, parameters and conditioning on the mesh (and offloaded cache fields on the host)."""
    cache = parallel.place_cache(state.cache, mesh=mesh, offload=offload)
    if mesh is None:
        return state.replace(cache=cache), params, cond
    rep = parallel.replicated(mesh)
    tokens = lambda a: jax.device_put(a, NamedSharding(mesh, parallel.token_spec(mesh, a.shape)))
    per_sample = lambda a: jax.device_put(a, NamedSharding(mesh, parallel.batch_spec(mesh, a.shape)))
    state = state.replace(
        step=jax.device_put(state.step, rep),
        latents=tokens(state.latents),
        cache=cache,
        rng=jax.device_put(state.rng, rep),
    )
    cond = cond.replace(
        txt=tokens(cond.txt),
        y=per_sample(cond.y),
        guidance=None if cond.guidance is None else per_sample(cond.guidance),
        cos=jax.device_put(cond.cos, rep),
        sin=jax.device_put(cond.sin, rep),
    )
    return state, jax.device_put(params, rep), cond


def generate(
    model: Flux,
    txt: jax.Array,
    y: jax.Array,
    *,
    width: int,
    height: int,
    steps: int,
    seed: int = 0,
    guidance: float | None = 3.5,
    chipmunk: ChipmunkConfig | None = None,
    backend: str = "auto",
    attention_impl: str | None = None,
    patchify_on: bool | None = None,
    noise: jax.Array | None = None,
    progress: bool = True,
    mesh: Mesh | None = None,
    trajectory: bool = False,
) -> Generation:
    """Samples FLUX.1 latents with flow-matching Euler and (optionally) Chipmunk.

    Args:
      model: the Flux transformer.
      txt: [B, Nt, context_dim] T5 embeddings.
      y: [B, vec_dim] pooled CLIP embeddings.
      width, height: image size in pixels.
      steps: denoising steps.
      seed: noise and per-(step, layer) random keys.
      guidance: embedded guidance scale (dev); ignored by schnell (no guidance embedding).
      chipmunk: Chipmunk config (e.g. ``chipmunk_jax.preset('flux')``), or None for the dense model. Its
        step_caching section is honoured in both cases.
      backend: Chipmunk operator backend.
      attention_impl: jax.nn.dot_product_attention implementation for dense attention.
      patchify_on: reorder image tokens; default: ``chipmunk.patchify.is_enabled`` (off for the dense model).
      noise: optional initial noise [B, Ni, in_channels] (raster order) instead of one drawn from ``seed``.
      progress: tqdm progress bar.
      mesh: a ``parallel.make_mesh(cfg=..., sp=...)`` mesh: the batch is split over 'cfg' (B divisible by it),
        tokens over 'sp' with Ulysses attention (heads and Nt + Ni divisible by it). None: one device.
        Independently of the mesh, cache fields chosen by ``chipmunk.offloading`` are kept in host memory.
      trajectory: also keep the packed latents after every step (``Generation.trajectory``, raster order, on the
        host) for per-step comparisons; the same compiled steps run, so the result is unchanged.

    Returns:
      A Generation.
    """
    cfg = model.cfg
    if patchify_on is None:
        patchify_on = chipmunk is not None and chipmunk.patchify.is_enabled
    c1, c2 = (chipmunk.patchify.chunk_size_1, chipmunk.patchify.chunk_size_2) if chipmunk else (8, 4)
    h, w = check_size(width, height, patchify_on, c1)
    b, nt = txt.shape[0], txt.shape[1]
    if txt.shape[2] != cfg.context_dim or y.shape != (b, cfg.vec_dim):
        raise ValueError(f"need txt [B, Nt, {cfg.context_dim}] and y [B, {cfg.vec_dim}]; got {txt.shape}, {y.shape}")
    ni = h * w
    if mesh is not None:
        parallel.check_attention_shapes(mesh, b, cfg.heads, nt + ni)
    key = jax.random.key(seed)
    if noise is None:
        noise = pack_noise(jax.random.fold_in(key, 0), b, h, w, cfg.in_channels)
    cos, sin = rope_table(position_ids(nt, h, w), cfg.axes_dim, cfg.theta)
    x = jnp.array(noise, jnp.float32, copy=True)  # the state is donated; never hand over the caller's array
    if patchify_on:
        cos, sin = (patchify(a, h, w, c1=c1, c2=c2, axis=0, start=nt) for a in (cos, sin))
        x = patchify(x, h, w, c1=c1, c2=c2, axis=1)
    dt = model.dtype
    g = None
    if cfg.guidance_embed:
        g = jnp.full((b,), 3.5 if guidance is None else guidance, jnp.float32)
    cond = FluxCond(txt=txt.astype(dt), y=y.astype(dt), guidance=g, cos=cos, sin=sin)
    plan_cfg = chipmunk if chipmunk is not None else _disabled(None)
    schedule = step_kinds(plan_cfg, steps, cfg.num_layers)
    step_caching = plan_cfg.step_caching.is_enabled
    cache = init_flux_cache(cfg, chipmunk, batch=b, txt_len=nt, img_len=ni, dtype=dt, step_caching=step_caching)
    graphdef, params = nnx.split(model)
    denoiser = FluxDenoiser(graphdef, chipmunk, backend, attention_impl, mesh)
    sigmas = flux_sigmas(steps, ni, dynamic_shift=cfg.guidance_embed)
    state = SamplerState(step=jnp.zeros((), jnp.int32), latents=x, cache=cache, rng=jax.random.fold_in(key, 1))
    offload = parallel.offloaded_fields(chipmunk.offloading) if chipmunk is not None else frozenset()
    if mesh is not None or offload:
        state, params, cond = _place(state, params, cond, mesh, offload)
    sampler = EulerSampler(denoiser, schedule)
    kept: list[np.ndarray] = []

    def raster(tokens: jax.Array) -> jax.Array:
        return unpatchify(tokens, h, w, c1=c1, c2=c2, axis=1) if patchify_on else tokens

    def keep(s: SamplerState) -> None:
        kept.append(np.array(raster(s.latents), np.float32, copy=True))  # a copy: the state is donated

    state, report = sampler.run(params, cond, sigmas, state, progress=progress, on_step=keep if trajectory else None)
    tokens = raster(state.latents)
    return Generation(
        tokens=tokens,
        latents=unpack_latents(tokens, h, w),
        report=report,
        state=state,
        trajectory=np.stack(kept) if trajectory else None,
    )
