"""Chipmunk cache pytrees with fixed shapes, allocated up front.

A cache is a value: operators take one and return a new one; nothing is mutated. Every leaf has a batch
axis (batch > 1 and CFG batches, cond and uncond on the batch axis). ``num_layers`` adds a leading layer axis
so that a model can ``lax.scan`` over its layers with the cache as scanned input and output.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from chipmunk_jax import indices as ix
from chipmunk_jax.config import AttnConfig, MLPConfig


@flax.struct.dataclass
class AttentionCache:
    """Per-layer sparse attention state (SPEC §1.2).

    Attributes:
      out: [B, H, N, D] C = o - A_S from the last full step (cache dtype).
      lse: [B, H, N] float32 log partition function of the last warm-up / mask step.
      indices: [B, H, G, K] int32 selected keys (uncompressed mode), else None.
      counts: [B, H, G] int32 valid slots of ``indices`` (uncompressed mode), else None.
      mask_bits: [B, H, G, ceil(N / 32)] uint32 bit-packed key mask (compressed mode), else None.
    """

    out: jax.Array
    lse: jax.Array
    indices: jax.Array | None = None
    counts: jax.Array | None = None
    mask_bits: jax.Array | None = None


@flax.struct.dataclass
class MLPCache:
    """Per-layer sparse MLP state (SPEC §2). N_p is N rounded up to a multiple of ``bm``.

    Attributes:
      act: [B, N_p, F] cached activation gelu(Z) (running: updated by every sparse step).
      out: [B, N_p, C] cached output Y (running).
      block_mean: [B, N_p / bm, F] float32 block-mean pre-activation M.
      indices: [B, N_p / bm, F] int32 selected neurons per token block (capacity F).
      counts: [B, N_p / bm] int32 valid slots of ``indices``.
    """

    act: jax.Array
    out: jax.Array
    block_mean: jax.Array
    indices: jax.Array
    counts: jax.Array


def _stack(tree, num_layers: int | None):
    if num_layers is None:
        return tree
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_layers, *x.shape)), tree)


def init_attention_cache(
    cfg: AttnConfig,
    *,
    batch: int,
    heads: int,
    seq_len: int,
    head_dim: int,
    dtype=jnp.bfloat16,
    num_layers: int | None = None,
) -> AttentionCache:
    """Allocates an empty attention cache (zeros) for one layer, or ``num_layers`` stacked layers."""
    g = ix.num_groups(seq_len, cfg.mbm)
    bh = (batch, heads)
    if cfg.should_compress_indices:
        sel = dict(mask_bits=jnp.zeros((*bh, g, ix.num_groups(seq_len, 32)), jnp.uint32))
    else:
        k = ix.topk_capacity(cfg, seq_len)
        sel = dict(
            indices=jnp.zeros((*bh, g, k), jnp.int32),
            counts=jnp.zeros((*bh, g), jnp.int32),
        )
    cache = AttentionCache(
        out=jnp.zeros((*bh, seq_len, head_dim), dtype),
        lse=jnp.zeros((*bh, seq_len), jnp.float32),
        **sel,
    )
    return _stack(cache, num_layers)


def init_mlp_cache(
    cfg: MLPConfig,
    *,
    batch: int,
    seq_len: int,
    width: int,
    hidden: int,
    dtype=jnp.bfloat16,
    num_layers: int | None = None,
) -> MLPCache:
    """Allocates an empty MLP cache for one layer, or ``num_layers`` stacked layers."""
    n_p = ix.round_up(seq_len, cfg.bm)
    g = n_p // cfg.bm
    cache = MLPCache(
        act=jnp.zeros((batch, n_p, hidden), dtype),
        out=jnp.zeros((batch, n_p, width), dtype),
        block_mean=jnp.zeros((batch, g, hidden), jnp.float32),
        indices=jnp.zeros((batch, g, hidden), jnp.int32),
        counts=jnp.zeros((batch, g), jnp.int32),
    )
    return _stack(cache, num_layers)


def cache_nbytes(tree) -> int:
    """Bytes held by a cache pytree (arrays or ShapeDtypeStructs, e.g. from ``jax.eval_shape``)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def attention_cache_nbytes(cfg: AttnConfig, **kwargs) -> int:
    """Bytes of ``init_attention_cache(cfg, **kwargs)`` without allocating it."""
    return cache_nbytes(jax.eval_shape(lambda: init_attention_cache(cfg, **kwargs)))


def mlp_cache_nbytes(cfg: MLPConfig, **kwargs) -> int:
    """Bytes of ``init_mlp_cache(cfg, **kwargs)`` without allocating it."""
    return cache_nbytes(jax.eval_shape(lambda: init_mlp_cache(cfg, **kwargs)))
