"""What the video DiTs (Wan, HunyuanVideo, Mochi) share: Chipmunk cache allocation and the static mask, the
latent size of a pixel video, the initial noise, the classifier-free guidance combination, the dense step
schedule and the achieved-sparsity statistics of their samplers.

Each model keeps its own cache class (fields ``attn`` and ``hidden``) and thin wrappers with its config; the
rules live here once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.cache import AttentionCache, init_attention_cache
from chipmunk_jax.config import AttnConfig, ChipmunkConfig, MLPConfig
from chipmunk_jax.indices import StaticMask, static_video_mask


def sparse_layer_count(num_layers: int, chipmunk: ChipmunkConfig | None) -> int:
    """Layers that keep a Chipmunk attention cache (0 when sparse attention is off)."""
    if chipmunk is None or not chipmunk.attn.is_enabled:
        return 0
    return max(0, num_layers - chipmunk.attn.first_n_dense_layers)


def init_video_cache(
    cache_cls,
    chipmunk: ChipmunkConfig | None,
    *,
    num_layers: int,
    heads: int,
    head_dim: int,
    width: int,
    batch: int,
    grid: tuple[int, int, int],
    text_len: int = 0,
    dtype=jnp.bfloat16,
    step_caching: bool | None = None,
):
    """Allocates ``cache_cls(attn=..., hidden=...)`` for a generation (zeros).

    The attention cache covers [video tokens (voxel order); ``text_len`` text tokens] on a leading axis of the
    sparsified layers; ``hidden`` ([batch, video tokens, width], step caching) exists when ``step_caching`` is
    true (default: ``chipmunk.step_caching.is_enabled``).
    """
    n = math.prod(grid)
    layers = sparse_layer_count(num_layers, chipmunk)
    if step_caching is None:
        step_caching = chipmunk is not None and chipmunk.step_caching.is_enabled
    attn = None
    if layers:
        attn = init_attention_cache(
            chipmunk.attn,
            batch=batch,
            heads=heads,
            seq_len=n + text_len,
            head_dim=head_dim,
            dtype=dtype,
            num_layers=layers,
        )
    return cache_cls(attn=attn, hidden=jnp.zeros((batch, n, width), dtype) if step_caching else None)


def video_static_mask(
    heads: int, chipmunk: ChipmunkConfig, grid: tuple[int, int, int], text_len: int, rng: jax.Array | None
) -> StaticMask:
    """The static part of the compressed key mask (SPEC §1.3) over [video (voxel order); ``text_len`` text]."""
    return static_video_mask(grid, text_len, heads, chipmunk.attn, rng=rng, group=chipmunk.attn.mbm)


def video_latent_size(
    frames: int, height: int, width: int, *, temporal: int, spatial: int = 8, multiple: int = 16
) -> tuple[int, int, int]:
    """Latent (F, H, W) of a video of ``frames`` x ``height`` x ``width`` pixels; raises ValueError if invalid.

    The video VAEs keep the first frame and compress the others by ``temporal`` (so frames must be
    ``temporal`` k + 1) and space by ``spatial``; height and width must be multiples of ``multiple`` (VAE
    ``spatial`` x the transformer's 2 x 2 patch). The message names the nearest valid values.
    """
    problems = []
    if frames < 1 or (frames - 1) % temporal:
        lo = max(1, (frames - 1) // temporal * temporal + 1)
        problems.append(f"frames {frames} is not {temporal}k+1 (nearest valid: {lo} or {lo + temporal})")
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % multiple:
            lo = max(multiple, v // multiple * multiple)
            hi = max(multiple, -(-v // multiple) * multiple)
            near = f"{lo}" if lo == hi else f"{lo} or {hi}"
            problems.append(f"{name} {v} is not a multiple of {multiple} (nearest valid: {near})")
    if problems:
        raise ValueError("; ".join(problems))
    return (frames - 1) // temporal + 1, height // spatial, width // spatial


def initial_latents(noise, shape: tuple[int, ...], seed: int) -> jax.Array:
    """The sampler's starting latents: float32 ``noise`` (checked against ``shape``), or standard normal noise
    drawn by numpy's ``default_rng(seed)`` (the same on every platform, and nothing to compile).

    Always a fresh array: the sampler state is donated, and the caller's array must not be handed over.
    """
    shape = tuple(shape)
    if noise is None:
        noise = np.random.default_rng(seed).standard_normal(shape, np.float32)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise must be {shape}, got {tuple(noise.shape)}")
    return jnp.array(noise, jnp.float32, copy=True)


def cfg_batch(x: jax.Array, cfg: bool) -> jax.Array:
    """The model batch of a CFG step: [x; x] (cond rows first, then uncond rows) with ``cfg``, else ``x``."""
    return jnp.concatenate([x, x]) if cfg else x


def guide(out: jax.Array, guidance: jax.Array, cfg: bool) -> jax.Array:
    """Classifier-free guidance in float32: ``uncond + guidance * (cond - uncond)`` on a model batch [cond rows;
    uncond rows] with ``cfg``, else ``out`` itself (float32)."""
    out = out.astype(jnp.float32)
    if not cfg:
        return out
    b = out.shape[0] // 2
    cond, uncond = out[:b], out[b:]
    return uncond + guidance * (cond - uncond)


def dense_plan_config() -> ChipmunkConfig:
    """A config with sparse attention and MLPs off: ``step_kinds`` of it plans every step dense (the samplers'
    schedule for the plain model)."""
    return ChipmunkConfig(attn=AttnConfig(is_enabled=False), mlp=MLPConfig(is_enabled=False))


DENSITY = "attention density (keys kept / keys)"
SPARSITY = "attention sparsity"


def attention_density(chipmunk: ChipmunkConfig | None, attn: AttentionCache | None) -> float | None:
    """Mean fraction of keys each query group computes on sparse steps, over every layer, row, head and group of
    the cache (None without a Chipmunk attention cache or before a mask step recorded one).

    With a packed mask the count of a group is rounded up to ``counts_multiple_of`` (the keys a sparse step
    really computes, SPEC §1.2), capped at the number of keys.
    """
    if attn is None or chipmunk is None:
        return None
    n = attn.out.shape[-2]
    if attn.mask_bits is not None:
        pop = jnp.sum(jax.lax.population_count(attn.mask_bits).astype(jnp.int32), axis=-1)
        m = chipmunk.attn.counts_multiple_of
        counts = jnp.minimum(-(-pop // m) * m, n)
    elif attn.counts is not None:
        counts = attn.counts
    else:
        return None
    return float(jnp.mean(counts.astype(jnp.float32))) / n


def density_stats(density: float | None) -> dict[str, float]:
    """The sampler report's statistics for an attention density ({} when there is none)."""
    if density is None:
        return {}
    return {DENSITY: density, SPARSITY: 1.0 - density}


def attention_stats(chipmunk: ChipmunkConfig | None, attn: AttentionCache | None) -> dict[str, float]:
    """Achieved attention density and sparsity of a Chipmunk attention cache, for ``Report.stats``."""
    return density_stats(attention_density(chipmunk, attn))
