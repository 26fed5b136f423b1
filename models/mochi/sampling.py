"""Mochi 1 text-to-video sampling: the linear-quadratic flow schedule, CFG, Chipmunk step kinds, step caching.

The schedule and the update are those of diffusers' ``MochiPipeline``: genmo's linear-quadratic sigma schedule
(``threshold_noise`` 0.025, half the steps linear), run through ``FlowMatchEulerDiscreteScheduler`` with
``invert_sigmas=True``. Mochi's model time runs the other way from the usual flow time: with tau = 1 - sigma
(0 at pure noise), the transformer gets ``timestep = 1000 * tau`` and the latents move by
``x <- x + (tau_{t+1} - tau_t) * v`` on a tau table that ends at 1. This module keeps that table (``tau``) as
the Euler solver's "sigmas" (``models.wan.scheduler.FlowEuler``), so the update and the float32 arithmetic are
diffusers' own; the guided velocity is ``uncond + g * (cond - uncond)`` in float32, as the pipeline.

The generation runs through ``chipmunk_jax.sampler.EulerSampler``: one step function is compiled per distinct
``StepPlan`` (warm-up, mask, sparse and, with step caching, skip) and reused across steps and generations.

Text and the static ``text_len`` of Chipmunk attention. The Mochi transformer masks padded T5 tokens in its dense
attention, but Chipmunk's sparse operators take no key mask, so a Chipmunk call cuts the text to one static
length that every batch row must fill exactly (``MochiTransformer3D.__call__``). A prompt and its negative
prompt rarely have the same number of tokens (the default negative prompt "" has one), so the model batch
[cond rows; uncond rows] is split into *text groups*, one per distinct valid length: each group is its own model
call inside the same jitted step, with its own cache (its sequence length differs) and static mask. Outputs are
exact (each row sees exactly its own tokens, as in diffusers). When every row has the same length there is one
group, i.e. one batched call as Wan does. ``text_groups='pad'`` instead marks every row valid up to the longest
prompt (one call, but shorter prompts then attend to T5's outputs at their padding positions: an approximation,
not what diffusers computes). Without Chipmunk attention there is always one call with the padding mask.

Latents stay in the diffusers layout [B, 12, F, H, W] float32; the voxel order is applied inside the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.indices import StaticMask
from chipmunk_jax.sampler import EulerSampler, Report, SamplerState
from chipmunk_jax.schedules import step_kinds
from models.mochi.transformer import (
    ChipmunkRun,
    MochiCache,
    MochiTransformer3D,
    init_mochi_cache,
    mochi_static_mask,
    post_patch_grid,
)
from models.video import (
    attention_density,
    cfg_batch,
    dense_plan_config,
    density_stats,
    guide,
    initial_latents,
    video_latent_size,
)
from models.wan.scheduler import FlowEuler

# The Mochi VAE keeps the first frame and compresses the rest by 6 in time, by 8 in space; the patch adds 2 x 2.
VAE_TEMPORAL, VAE_SPATIAL = 6, 8
PIXEL_MULTIPLE = 16
THRESHOLD_NOISE = 0.025  # genmo's / diffusers' MochiPipeline setting
NUM_TRAIN_TIMESTEPS = 1000
TEXT_GROUP_MODES = ("split", "pad")


def latent_size(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent (F, H, W) of a video of ``frames`` x ``height`` x ``width`` pixels; raises ValueError if invalid.

    Frames must be 6k + 1 (the VAE keeps the first frame and expands each further latent frame into 6); height
    and width must be multiples of 16 (VAE 8 x patch 2). The message names the nearest valid values.
    """
    return video_latent_size(frames, height, width, temporal=VAE_TEMPORAL, spatial=VAE_SPATIAL, multiple=PIXEL_MULTIPLE)


def linear_quadratic_sigmas(
    num_steps: int, threshold_noise: float = THRESHOLD_NOISE, linear_steps: int | None = None
) -> np.ndarray:
    """genmo's noise levels sigma_0 = 1 > ... > sigma_{n-1} > 0 (float64 [n]), the last one before clean.

    Written in terms of s = 1 - sigma: s rises linearly by ``threshold_noise / linear_steps`` per step over the
    first ``linear_steps`` steps (reaching ``threshold_noise``), then follows the quadratic that continues with
    the same slope and would reach s = 1 at step n. Most steps are thus spent at low noise.

    Args:
      num_steps: denoising steps n (>= 2).
      threshold_noise: s reached at the end of the linear part.
      linear_steps: steps of the linear part, 1 <= linear_steps < n (default n // 2).
    """
    if num_steps < 2:
        raise ValueError(f"Mochi's schedule needs at least 2 steps (a linear and a quadratic part), got {num_steps}")
    linear = num_steps // 2 if linear_steps is None else linear_steps
    if not 1 <= linear < num_steps:
        raise ValueError(f"linear_steps must be in [1, {num_steps - 1}] for {num_steps} steps, got {linear}")
    if not 0.0 < threshold_noise < 1.0:
        raise ValueError(f"threshold_noise must be in (0, 1), got {threshold_noise}")
    i = np.arange(num_steps, dtype=np.float64)
    slope = threshold_noise / linear
    quad = num_steps - linear
    # s(i) = thr + slope (i - L) + k (i - L)^2 for i >= L, with s(n) = 1.
    k = (1.0 - threshold_noise - slope * quad) / quad**2
    d = i - linear
    s = np.where(i < linear, i * slope, threshold_noise + slope * d + k * d * d)
    return 1.0 - s


def mochi_schedule(
    num_steps: int, threshold_noise: float = THRESHOLD_NOISE, linear_steps: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The tau table and model timesteps of diffusers' MochiPipeline (FlowMatchEuler with ``invert_sigmas``).

    Returns:
      (tau float32 [n + 1]: 1 - sigma rising from 0, with a final 1; timesteps float32 [n] = 1000 * tau[:n],
      what the transformer receives). Computed as diffusers does: sigmas cast to float32 first, then inverted.
    """
    sig = linear_quadratic_sigmas(num_steps, threshold_noise, linear_steps).astype(np.float32)
    tau = (np.float32(1.0) - sig).astype(np.float32)
    timesteps = (tau * np.float32(NUM_TRAIN_TIMESTEPS)).astype(np.float32)
    return np.concatenate([tau, np.ones(1, np.float32)]), timesteps


@dataclasses.dataclass(frozen=True)
class TextGroup:
    """One model call of a step: rows of the model batch [cond rows; uncond rows] sharing one text length.

    Attributes:
      rows: indices into the model batch (cond rows 0..B-1, then uncond rows B..2B-1 with CFG).
      text_len: the static Chipmunk ``text_len`` (every row has exactly that many valid tokens), or None for a
        dense call that applies the padding mask.
    """

    rows: tuple[int, ...]
    text_len: int | None


@flax.struct.dataclass
class MochiCond:
    """Per-generation conditioning, one entry per text group (traced: new prompts of the same token counts or a
    new guidance scale do not recompile).

    Attributes:
      text: per group [b_g, L_g, text_dim] T5 embeddings in the model dtype.
      mask: per group [b_g, L_g] bool, valid tokens first.
      guidance: float32 [] guidance scale.
      static_mask: per group (mask [H, G, N_g] bool, sparse_group [H, G] bool) of the Chipmunk static mask, or
        None (no Chipmunk attention).
    """

    text: tuple[jax.Array, ...]
    mask: tuple[jax.Array, ...]
    guidance: jax.Array
    static_mask: tuple[tuple[jax.Array, jax.Array], ...] | None = None


@dataclasses.dataclass(frozen=True)
class MochiDenoiser:
    """The guided Mochi velocity for ``chipmunk_jax.sampler`` (static and hashable: holds the graphdef).

    Attributes:
      graphdef: ``nnx.split(model)[0]``.
      groups: the text groups (one model call each); their rows cover the model batch.
      chipmunk: the Chipmunk config, or None for the dense model.
      cfg: classifier-free guidance on (model batch [cond; uncond]).
      backend: Chipmunk operator backend.
      attention_impl: ``implementation`` of jax.nn.dot_product_attention for the dense joint attention.
    """

    graphdef: Any
    groups: tuple[TextGroup, ...]
    chipmunk: ChipmunkConfig | None = None
    cfg: bool = True
    backend: str = "auto"
    attention_impl: str | None = None

    def _order(self) -> np.ndarray:
        """The permutation that puts the concatenated group outputs back in model-batch order."""
        rows = np.concatenate([np.asarray(g.rows, np.int32) for g in self.groups])
        return np.argsort(rows)

    def _guide(self, outs: list[jax.Array], guidance: jax.Array) -> jax.Array:
        out = jnp.concatenate([o.astype(jnp.float32) for o in outs])
        if len(self.groups) > 1:
            out = out[self._order()]
        return guide(out, guidance, self.cfg)

    def velocity(self, params, cond: MochiCond, latents, timestep, cache: tuple[MochiCache, ...], rng, step, plan):
        """Guided velocity [B, C, F, H, W] float32 at the model ``timestep`` and the new caches (a computed step)."""
        model: MochiTransformer3D = nnx.merge(self.graphdef, params)
        x = cfg_batch(latents, self.cfg)
        outs, caches = [], []
        for g, group in enumerate(self.groups):
            xg = x if len(self.groups) == 1 else x[np.asarray(group.rows)]
            run, sm = None, None
            if group.text_len is not None:
                run = ChipmunkRun(self.chipmunk, plan, group.text_len, self.backend)
                sm = StaticMask(mask=cond.static_mask[g][0], sparse_group=cond.static_mask[g][1])
            ts = jnp.full((xg.shape[0],), timestep, jnp.float32)
            out, c = model(
                xg,
                ts,
                cond.text[g],
                cond.mask[g],
                cache[g],
                chipmunk=run,
                rng=rng,
                step=step,
                static_mask=sm,
                attention_impl=self.attention_impl,
            )
            outs.append(out)
            caches.append(c)
        return self._guide(outs, cond.guidance), tuple(caches)

    def skip_velocity(self, params, cond: MochiCond, latents, timestep, cache: tuple[MochiCache, ...]):
        """Velocity of a skipped step: the output head on each row's cached hidden states (SPEC §4)."""
        model: MochiTransformer3D = nnx.merge(self.graphdef, params)
        grid = post_patch_grid(model.cfg, *latents.shape[2:])
        outs = []
        for g, c in enumerate(cache):
            if c.hidden is None:
                raise ValueError("a skipped step needs cache.hidden (init_mochi_cache(..., step_caching=True))")
            ts = jnp.full((c.hidden.shape[0],), timestep, jnp.float32)
            outs.append(model.final_layer(c.hidden, ts, cond.text[g], cond.mask[g], grid))
        return self._guide(outs, cond.guidance)

    def stats(self, cache: tuple[MochiCache, ...]) -> dict[str, float]:
        """Achieved attention density on sparse steps, averaged over every row of every text group."""
        per_group = [attention_density(self.chipmunk, c.attn) for c in cache]
        weights = [len(g.rows) for g, d in zip(self.groups, per_group, strict=True) if d is not None]
        per_group = [d for d in per_group if d is not None]
        if not per_group:
            return {}
        return density_stats(float(np.average(per_group, weights=weights)))


@dataclasses.dataclass
class MochiGeneration:
    """Result of ``generate``: final latents [B, 12, F, H, W] float32 (normalised VAE latents), the report, the
    final sampler state (``state.cache`` is the tuple of per-text-group caches), and the text groups."""

    latents: jax.Array
    report: Report
    state: SamplerState
    groups: tuple[TextGroup, ...]


def _prefix_counts(mask: np.ndarray, name: str) -> np.ndarray:
    """Valid tokens per row of a [R, L] mask; raises unless each row's valid tokens come first (T5 padding)."""
    counts = mask.sum(1)
    if not (mask == (np.arange(mask.shape[1])[None, :] < counts[:, None])).all():
        raise ValueError(f"{name}: the valid tokens of each row must come first (tokenizer padding at the end)")
    return counts


def _text_inputs(model, text, mask, neg, neg_mask, use_cfg: bool) -> tuple[np.ndarray, np.ndarray]:
    """Model-batch text [R, L, D] float32 and mask [R, L] bool (cond rows, then uncond rows with CFG)."""
    d = model.cfg.text_dim
    text = np.asarray(text, np.float32)
    if text.ndim != 3 or text.shape[2] != d:
        raise ValueError(f"text_embeddings must be [B, L, {d}] (T5-XXL last hidden states), got {text.shape}")
    b = text.shape[0]
    mask = np.asarray(mask).astype(bool)
    if mask.shape != text.shape[:2]:
        raise ValueError(f"text_mask must be {text.shape[:2]} (one flag per token), got {mask.shape}")
    if not use_cfg:
        return text, mask
    if neg is None or neg_mask is None:
        raise ValueError(
            "guidance_scale > 1 needs negative_embeddings and negative_mask (CFG); pass guidance_scale <= 1 to "
            "disable CFG"
        )
    neg = np.asarray(neg, np.float32)
    neg_mask = np.asarray(neg_mask).astype(bool)
    if neg.ndim != 3 or neg.shape[0] not in (1, b) or neg.shape[2] != d:
        raise ValueError(f"negative_embeddings must be [1 or {b}, L, {d}], got {neg.shape}")
    if neg_mask.shape != neg.shape[:2]:
        raise ValueError(f"negative_mask must be {neg.shape[:2]}, got {neg_mask.shape}")
    length = max(text.shape[1], neg.shape[1])

    def pad(x, m):
        x = np.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0)))
        m = np.pad(m, ((0, 0), (0, length - m.shape[1])))
        return np.broadcast_to(x, (b, length, d)), np.broadcast_to(m, (b, length))

    (t, m), (n, nm) = pad(text, mask), pad(neg, neg_mask)
    return np.concatenate([t, n]), np.concatenate([m, nm])


def text_groups(counts: np.ndarray, chipmunk_attention: bool, mode: str = "split") -> tuple[TextGroup, ...]:
    """The model calls of a step for rows with ``counts`` valid tokens (see the module docstring).

    Args:
      counts: valid tokens per model-batch row.
      chipmunk_attention: Chipmunk sparse attention is on (static text lengths needed).
      mode: 'split' (one exact call per distinct length) or 'pad' (one call at the longest length).
    """
    if mode not in TEXT_GROUP_MODES:
        raise ValueError(f"unknown text_groups mode {mode!r}; choose one of {', '.join(TEXT_GROUP_MODES)}")
    rows = tuple(range(len(counts)))
    if not chipmunk_attention:
        return (TextGroup(rows, None),)
    if mode == "pad":
        return (TextGroup(rows, int(counts.max())),)
    lengths = list(dict.fromkeys(int(c) for c in counts))  # in order of first appearance: cond rows first
    return tuple(TextGroup(tuple(int(r) for r in np.flatnonzero(counts == n)), n) for n in lengths)


def generate(
    model: MochiTransformer3D,
    text_embeddings: np.ndarray | jax.Array,
    text_mask: np.ndarray | jax.Array,
    *,
    frames: int,
    height: int,
    width: int,
    steps: int = 64,
    guidance_scale: float = 4.5,
    negative_embeddings: np.ndarray | jax.Array | None = None,
    negative_mask: np.ndarray | jax.Array | None = None,
    chipmunk: ChipmunkConfig | None = None,
    seed: int = 0,
    noise: np.ndarray | jax.Array | None = None,
    threshold_noise: float = THRESHOLD_NOISE,
    linear_steps: int | None = None,
    text_group_mode: str = "split",
    backend: str = "auto",
    attention_impl: str | None = None,
    mesh=None,
    progress: bool = True,
) -> MochiGeneration:
    """Samples Mochi 1 text-to-video latents as diffusers' MochiPipeline, optionally with Chipmunk.

    Args:
      model: a ``MochiTransformer3D``.
      text_embeddings: [B, L, 4096] T5-XXL last hidden states (diffusers: 256 tokens per prompt).
      text_mask: [B, L] the tokenizer's attention mask (valid tokens first).
      frames, height, width: video size in pixels (frames 6k+1, height/width multiples of 16).
      steps: denoising steps (>= 2; diffusers' default 64).
      guidance_scale: CFG scale; <= 1 runs the conditional branch only (as diffusers).
      negative_embeddings, negative_mask: [1 or B, L', 4096] and [1 or B, L'] for the negative prompt (diffusers
        encodes "" by default); required when ``guidance_scale > 1``.
      chipmunk: Chipmunk config (``chipmunk_jax.preset('mochi')``), or None for the dense model. Its step_caching
        section is honoured; its MLP section must be disabled (Mochi's SwiGLU feed-forward stays dense).
      seed: initial noise (numpy ``default_rng(seed)``) and the per-(step, layer) random keys of Chipmunk.
      noise: optional initial latents [B, 12, F_lat, H/8, W/8] instead of noise drawn from ``seed``.
      threshold_noise, linear_steps: the linear-quadratic schedule (``linear_quadratic_sigmas``).
      text_group_mode: with Chipmunk attention and rows of different valid lengths: 'split' (exact, one model call
        per length) or 'pad' (one call, shorter prompts padded with T5's padding outputs).
      backend: Chipmunk operator backend.
      attention_impl: jax.nn.dot_product_attention implementation for dense attention.
      mesh: must be None: the Mochi transformer has no sharded (Ulysses / CFG-parallel) attention yet.
      progress: tqdm progress bar.

    Returns:
      A MochiGeneration.
    """
    if mesh is not None:
        raise ValueError(
            "the Mochi transformer has no sharded attention yet (no mesh= in MochiTransformer3D); run on one device "
            "with mesh=None"
        )
    cfg = model.cfg
    f, h, w = latent_size(frames, height, width)
    grid = post_patch_grid(cfg, f, h, w)
    if chipmunk is not None and chipmunk.mlp.is_enabled:
        raise ValueError("Mochi sparsifies attention only: set mlp.is_enabled = false in the Chipmunk config")
    use_cfg = guidance_scale > 1.0
    text, mask = _text_inputs(model, text_embeddings, text_mask, negative_embeddings, negative_mask, use_cfg)
    b = text.shape[0] // 2 if use_cfg else text.shape[0]
    counts = _prefix_counts(mask, "text_mask / negative_mask")
    attn_on = chipmunk is not None and chipmunk.attn.is_enabled
    groups = text_groups(counts, attn_on, text_group_mode)
    if attn_on and text_group_mode == "pad":
        mask = np.broadcast_to(np.arange(mask.shape[1])[None, :] < counts.max(), mask.shape)
    # Tokens past the longest valid prompt are masked for every row: dropping them changes nothing.
    length = max(1, int(counts.max()))
    text, mask = text[:, :length], mask[:, :length]

    key = jax.random.key(seed)
    x = initial_latents(noise, (b, cfg.in_channels, f, h, w), seed)

    dt = model.dtype
    texts, masks, static, caches = [], [], [], []
    for g in groups:
        rows = np.asarray(g.rows)
        n_txt = length if g.text_len is None else max(1, g.text_len)
        texts.append(jnp.asarray(text[rows, :n_txt], dt))
        masks.append(jnp.asarray(mask[rows, :n_txt]))
        if g.text_len is not None:
            sm = mochi_static_mask(cfg, chipmunk, grid, g.text_len, jax.random.fold_in(key, 1_000_000))
            static.append((jnp.asarray(sm.mask), jnp.asarray(sm.sparse_group)))
        caches.append(init_mochi_cache(cfg, chipmunk, batch=len(rows), grid=grid, text_len=g.text_len or 0, dtype=dt))
    cond = MochiCond(
        text=tuple(texts),
        mask=tuple(masks),
        guidance=jnp.asarray(guidance_scale, jnp.float32),
        static_mask=tuple(static) if attn_on else None,
    )
    schedule = step_kinds(chipmunk if chipmunk is not None else dense_plan_config(), steps, cfg.num_layers)
    solver = FlowEuler()
    tables = solver.tables(*mochi_schedule(steps, threshold_noise, linear_steps))
    graphdef, params = nnx.split(model)
    denoiser = MochiDenoiser(graphdef, groups, chipmunk, use_cfg, backend, attention_impl)
    state = SamplerState(
        step=jnp.zeros((), jnp.int32),
        latents=x,
        cache=tuple(caches),
        rng=jax.random.fold_in(key, 1),
        solver=solver.init_state(x),
    )
    state, report = EulerSampler(denoiser, schedule, solver).run(params, cond, tables, state, progress=progress)
    return MochiGeneration(latents=state.latents, report=report, state=state, groups=groups)
