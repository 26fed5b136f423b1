"""HunyuanVideo text-to-video sampling: diffusers' flow-matching Euler schedule, embedded guidance, Chipmunk.

The schedule is exactly diffusers' ``HunyuanVideoPipeline`` with its ``FlowMatchEulerDiscreteScheduler``
(``shift`` 7.0 in the release): sigmas ``linspace(1, 0, steps + 1)[:-1]`` shifted as
``shift * s / (1 + (shift - 1) * s)``, a final 0 appended, model timestep ``sigma * 1000``, Euler update
``x + (sigma_next - sigma) * v`` in float32. Guidance is *embedded* (the released model is guidance-distilled):
one model call per step with ``guidance_scale * 1000`` as an extra conditioning input, no classifier-free
guidance by default. Diffusers' optional "true CFG" (``true_cfg_scale > 1`` with a negative prompt) is supported
as one model call on the batch [cond; uncond].

The generation runs through ``chipmunk_jax.sampler.EulerSampler``: one step function is compiled per distinct
``StepPlan`` (for the Chipmunk preset: warm-up, mask, sparse, skip) and reused for every step of that kind and
by later generations of the same shapes. Chipmunk follows SPEC §6: only the joint self-attention is
sparsified, full steps {0, 1, 10, 40}, step caching on, the static mask built for the *valid* prompt length
(one static ``text_len`` for the whole batch; ``models.hunyuan_video.transformer.valid_text_length``).

Latents stay in the diffusers / VAE layout [B, 16, F, H, W] float32 throughout (diffusers' bf16 pipeline rounds
them to bf16 after every step; we keep float32). The voxel reordering happens inside the transformer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from chipmunk_jax import parallel
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.indices import StaticMask
from chipmunk_jax.sampler import EulerSampler, Report, SamplerState
from chipmunk_jax.schedules import step_kinds
from models.hunyuan_video.transformer import (
    ChipmunkRun,
    HunyuanCache,
    HunyuanVideoTransformer3D,
    hunyuan_static_mask,
    init_hunyuan_cache,
    post_patch_grid,
    valid_text_length,
)
from models.video import attention_stats, cfg_batch, dense_plan_config, guide, initial_latents, video_latent_size

__all__ = [
    "DEFAULT_FLOW_SHIFT",
    "DEFAULT_GUIDANCE",
    "HunyuanCond",
    "HunyuanDenoiser",
    "HunyuanGeneration",
    "generate",
    "hunyuan_sigmas",
    "latent_size",
]

DEFAULT_GUIDANCE = 6.0  # embedded guidance of the released pipeline
DEFAULT_FLOW_SHIFT = 7.0  # shift of the release's FlowMatchEulerDiscreteScheduler
NUM_TRAIN_TIMESTEPS = 1000
# The HunyuanVideo VAE keeps the first frame and compresses the rest by 4 in time, by 8 in space; patch 2 x 2.
VAE_TEMPORAL, VAE_SPATIAL = 4, 8
PIXEL_MULTIPLE = 16


def latent_size(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent (F, H, W) of a video of ``frames`` x ``height`` x ``width`` pixels; raises ValueError if invalid.

    Frames must be 4k + 1 and height / width multiples of 16 (VAE 8 x patch 2); the message names the nearest
    valid values.
    """
    return video_latent_size(frames, height, width, temporal=VAE_TEMPORAL, spatial=VAE_SPATIAL, multiple=PIXEL_MULTIPLE)


def hunyuan_sigmas(steps: int, shift: float = DEFAULT_FLOW_SHIFT) -> np.ndarray:
    """float32 [steps + 1]: the sigmas diffusers' HunyuanVideoPipeline runs, then a final 0.

    ``linspace(1, 0, steps + 1)[:-1]`` (the pipeline's default ``sigmas``), cast to float32 and shifted as the
    FlowMatchEulerDiscreteScheduler does (same float32 operations, so the values are bit-identical). The model's
    timestep at step t is ``sigmas[t] * 1000``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"flow shift must be > 0, got {shift}")
    s = np.linspace(1.0, 0.0, steps + 1)[:-1].astype(np.float32)
    s = (shift * s / (1 + (shift - 1) * s)).astype(np.float32)
    return np.concatenate([s, np.zeros(1, np.float32)])


@flax.struct.dataclass
class HunyuanCond:
    """Per-generation conditioning (traced: new prompts, guidance or seeds do not recompile).

    Attributes:
      text: [B', L, text_dim] Llama embeddings; B' = 2B with true CFG (cond rows first), else B.
      text_mask: [B', L] int32 prompt mask (valid tokens first).
      pooled: [B', pooled_dim] pooled CLIP embeddings.
      guidance: [B'] float32 embedded guidance, already ``guidance_scale * 1000``.
      true_cfg: float32 [] true-CFG scale (unused without true CFG).
      static_mask: (mask [H, G, N] bool, sparse_group [H, G] bool) of the Chipmunk static mask, or None.
    """

    text: jax.Array
    text_mask: jax.Array
    pooled: jax.Array
    guidance: jax.Array
    true_cfg: jax.Array
    static_mask: tuple[jax.Array, jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class HunyuanDenoiser:
    """The HunyuanVideo velocity for ``chipmunk_jax.sampler`` (static and hashable: holds the graphdef).

    Attributes:
      graphdef: ``nnx.split(model)[0]``.
      chipmunk: the Chipmunk config, or None for the dense model.
      cfg: diffusers' true CFG on: one model call on the batch [cond; uncond], combined as
        ``uncond + true_cfg * (cond - uncond)`` (``models.video.guide``).
      backend: Chipmunk operator backend.
      attention_impl: ``implementation`` of jax.nn.dot_product_attention for dense attention.
      text_len: the static valid prompt length the Chipmunk caches and static mask are built for (None without
        sparse attention).
    """

    graphdef: Any
    chipmunk: ChipmunkConfig | None = None
    cfg: bool = False
    backend: str = "auto"
    attention_impl: str | None = None
    text_len: int | None = None

    def _timestep(self, sigma: jax.Array, batch: int) -> jax.Array:
        # diffusers: timesteps = sigmas * num_train_timesteps in float32, broadcast to the batch.
        return jnp.full((batch,), sigma * jnp.float32(NUM_TRAIN_TIMESTEPS), jnp.float32)

    def velocity(self, params, cond: HunyuanCond, latents, sigma, cache: HunyuanCache, rng, step, plan):
        """Velocity [B, C, F, H, W] float32 at ``sigma`` and the new cache (a computed step)."""
        model: HunyuanVideoTransformer3D = nnx.merge(self.graphdef, params)
        x = cfg_batch(latents, self.cfg)
        run = None
        if self.chipmunk is not None and self.chipmunk.attn.is_enabled:
            run = ChipmunkRun(self.chipmunk, plan, self.backend)
        sm = None
        if cond.static_mask is not None:
            sm = StaticMask(mask=cond.static_mask[0], sparse_group=cond.static_mask[1])
        out, cache = model(
            x,
            self._timestep(sigma, x.shape[0]),
            cond.text,
            cond.text_mask,
            cond.pooled,
            cond.guidance,
            cache,
            chipmunk=run,
            text_len=self.text_len if run is not None else None,
            rng=rng,
            step=step,
            static_mask=sm,
            attention_impl=self.attention_impl,
        )
        return guide(out, cond.true_cfg, self.cfg), cache

    def skip_velocity(self, params, cond: HunyuanCond, latents, sigma, cache: HunyuanCache):
        """Velocity of a skipped step: the output head on the cached pre-head hidden states (SPEC §4)."""
        model: HunyuanVideoTransformer3D = nnx.merge(self.graphdef, params)
        if cache.hidden is None:
            raise ValueError("a skipped step needs cache.hidden (init_hunyuan_cache(..., step_caching=True))")
        grid = post_patch_grid(model.cfg, *latents.shape[2:])
        ts = self._timestep(sigma, cache.hidden.shape[0])
        out = model.final_layer(cache.hidden, ts, cond.pooled, cond.guidance, grid)
        return guide(out, cond.true_cfg, self.cfg)

    def stats(self, cache: HunyuanCache) -> dict[str, float]:
        """Achieved attention density on sparse steps (keys computed per query group / keys), every row."""
        return attention_stats(self.chipmunk, cache.attn)


@dataclasses.dataclass
class HunyuanGeneration:
    """Result of ``generate``: final latents [B, 16, F, H, W] float32 (unscaled VAE latents), the report, state."""

    latents: jax.Array
    report: Report
    state: SamplerState


def _check_prompt(name: str, text, mask, pooled, cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    text, mask, pooled = np.asarray(text, np.float32), np.asarray(mask), np.asarray(pooled, np.float32)
    if text.ndim != 3 or text.shape[2] != cfg.text_dim:
        raise ValueError(f"{name} text embeddings must be [B, L, {cfg.text_dim}] (Llama), got {text.shape}")
    b, length = text.shape[:2]
    if mask.shape != (b, length):
        raise ValueError(f"{name} text mask must be [{b}, {length}] like its embeddings, got {mask.shape}")
    if pooled.shape != (b, cfg.pooled_dim):
        raise ValueError(f"{name} pooled embeddings must be [{b}, {cfg.pooled_dim}] (CLIP), got {pooled.shape}")
    lens = (mask != 0).sum(1)
    if (lens == 0).any():
        raise ValueError(f"{name} text mask has a sample without any valid token (valid lengths {lens.tolist()})")
    return text, (mask != 0).astype(np.int32), pooled


def _pad_tokens(text: np.ndarray, mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    pad = length - text.shape[1]
    return np.pad(text, ((0, 0), (0, pad), (0, 0))), np.pad(mask, ((0, 0), (0, pad)))


def generate(
    model: HunyuanVideoTransformer3D,
    text: jax.Array | np.ndarray,
    text_mask: jax.Array | np.ndarray,
    pooled: jax.Array | np.ndarray,
    *,
    frames: int,
    height: int,
    width: int,
    steps: int = 50,
    guidance: float = DEFAULT_GUIDANCE,
    flow_shift: float = DEFAULT_FLOW_SHIFT,
    chipmunk: ChipmunkConfig | None = None,
    seed: int = 0,
    negative: tuple[Any, Any, Any] | None = None,
    true_cfg: float = 1.0,
    backend: str = "auto",
    attention_impl: str | None = None,
    noise: jax.Array | np.ndarray | None = None,
    progress: bool = True,
    mesh: Mesh | None = None,
) -> HunyuanGeneration:
    """Samples HunyuanVideo text-to-video latents with embedded guidance, flow Euler and optionally Chipmunk.

    Args:
      model: a ``HunyuanVideoTransformer3D``.
      text: [B, L, text_dim] Llama prompt embeddings (diffusers: hidden state -3 after the template crop, L 256).
      text_mask: [B, L] prompt mask, valid tokens first (bool or int).
      pooled: [B, pooled_dim] pooled CLIP embeddings.
      frames, height, width: video size in pixels (frames 4k+1, height/width multiples of 16).
      steps: denoising steps.
      guidance: embedded guidance scale (the model receives ``guidance * 1000``, rounded to the model dtype
        first as diffusers does).
      flow_shift: the scheduler's shift (7.0 in the release).
      chipmunk: Chipmunk config (``chipmunk_jax.preset('hunyuan')``), or None for the dense model. Its
        step_caching section is honoured; its MLP section must be disabled (HunyuanVideo sparsifies the joint
        attention only). Sparse attention needs one valid prompt length for the whole batch.
      seed: initial noise (numpy ``default_rng(seed)``) and the per-(step, layer) random keys of Chipmunk.
      negative: (text, text_mask, pooled) of a negative prompt ([1 or B, L', ...]) for true CFG.
      true_cfg: diffusers' ``true_cfg_scale``; > 1 with ``negative`` runs [cond; uncond] and combines them
        (off by default, as in the release).
      backend: Chipmunk operator backend ('auto', 'xla', 'reference', 'mosaic_gpu').
      attention_impl: jax.nn.dot_product_attention implementation for dense attention.
      noise: optional initial noise [B, C_in, F_lat, H/8, W/8] instead of one drawn from ``seed``.
      progress: tqdm progress bar.
      mesh: only None (or a one-device mesh): the HunyuanVideo transformer has no sequence/CFG-parallel wiring yet.

    Returns:
      A HunyuanGeneration.

    Raises:
      ValueError: bad sizes or shapes, an MLP-sparse or offloading Chipmunk config, per-sample different valid
        prompt lengths with sparse attention, a multi-device mesh.
    """
    cfg = model.cfg
    if mesh is not None and mesh.size > 1:
        raise ValueError(
            "the HunyuanVideo sampler runs on one device: sequence / CFG parallelism is not wired into its "
            "transformer yet (pass mesh=None)"
        )
    f, h, w = latent_size(frames, height, width)
    grid = post_patch_grid(cfg, f, h, w)
    if chipmunk is not None:
        if chipmunk.mlp.is_enabled:
            raise ValueError("HunyuanVideo sparsifies attention only: set mlp.is_enabled false in the Chipmunk config")
        if parallel.offloaded_fields(chipmunk.offloading):
            raise ValueError("cache offloading is not wired into the HunyuanVideo transformer: disable it (config)")
    ctx, mask, pool = _check_prompt("prompt", text, text_mask, pooled, cfg)
    b = ctx.shape[0]
    use_cfg = true_cfg > 1.0 and negative is not None
    if use_cfg:
        n_ctx, n_mask, n_pool = _check_prompt("negative", *negative, cfg)
        if n_ctx.shape[0] not in (1, b):
            raise ValueError(f"negative prompt batch must be 1 or {b}, got {n_ctx.shape[0]}")
        length = max(ctx.shape[1], n_ctx.shape[1])
        ctx, mask = _pad_tokens(ctx, mask, length)
        n_ctx, n_mask = _pad_tokens(n_ctx, n_mask, length)
        rep = lambda a: np.broadcast_to(a, (b, *a.shape[1:]))
        ctx = np.concatenate([ctx, rep(n_ctx)])
        mask = np.concatenate([mask, rep(n_mask)])
        pool = np.concatenate([pool, rep(n_pool)])
    batch = ctx.shape[0]

    sparse = chipmunk is not None and chipmunk.attn.is_enabled
    text_len = None
    if sparse:
        try:
            text_len = valid_text_length(mask)
        except ValueError as e:
            what = "the prompt and the negative prompt" if use_cfg else "the prompts of the batch"
            raise ValueError(
                f"Chipmunk sparse attention needs one valid prompt length for the whole model batch; {what} differ "
                f"({e}). Per-sample valid lengths are not supported: generate the samples separately, or run dense."
            ) from e

    dt = model.dtype
    key = jax.random.key(seed)
    x = initial_latents(noise, (b, cfg.in_channels, f, h, w), seed)

    sm = None
    if sparse:
        m = hunyuan_static_mask(cfg, chipmunk, grid, text_len, jax.random.fold_in(key, 1_000_000))
        sm = (jnp.asarray(m.mask), jnp.asarray(m.sparse_group))
    # diffusers builds the guidance tensor in the transformer dtype, then scales it: round the same way.
    g = (jnp.full((batch,), guidance, dt) * jnp.asarray(NUM_TRAIN_TIMESTEPS, dt)).astype(jnp.float32)
    cond = HunyuanCond(
        text=jnp.asarray(ctx, dt),
        text_mask=jnp.asarray(mask),
        pooled=jnp.asarray(pool, dt),
        guidance=g,
        true_cfg=jnp.asarray(true_cfg, jnp.float32),
        static_mask=sm,
    )
    schedule = step_kinds(chipmunk if chipmunk is not None else dense_plan_config(), steps, cfg.num_layers)
    cache = init_hunyuan_cache(cfg, chipmunk, batch=batch, grid=grid, text_len=text_len or 0, dtype=dt)
    graphdef, params = nnx.split(model)
    denoiser = HunyuanDenoiser(graphdef, chipmunk, use_cfg, backend, attention_impl, text_len if sparse else None)
    state = SamplerState(
        step=jnp.zeros((), jnp.int32),
        latents=x,
        cache=cache,
        rng=jax.random.fold_in(key, 1),
    )
    sigmas = jnp.asarray(hunyuan_sigmas(steps, flow_shift))
    state, report = EulerSampler(denoiser, schedule).run(params, cond, sigmas, state, progress=progress)
    return HunyuanGeneration(latents=state.latents, report=report, state=state)
