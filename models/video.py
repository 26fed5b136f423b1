"""Chipmunk state shared by the video DiTs (Wan, HunyuanVideo, Mochi): cache allocation and the static mask.

Each model keeps its own cache class (fields ``attn`` and ``hidden``) and thin wrappers with its config; the
rules live here once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from chipmunk_jax.cache import init_attention_cache
from chipmunk_jax.config import ChipmunkConfig
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
