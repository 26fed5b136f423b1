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
from chipmunk_jax.config import AttnConfig, ChipmunkConfig, MLPConfig


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


def model_cache_nbytes(
    config: ChipmunkConfig,
    *,
    num_layers: int,
    batch: int,
    seq_len: int,
    heads: int,
    head_dim: int,
    width: int | None = None,
    hidden: int | None = None,
    mlp_seq_len: int | None = None,
    dtype=jnp.bfloat16,
) -> dict[str, int]:
    """Chipmunk cache bytes of a whole model: only sparsified layers (index >= first_n_dense_layers) keep caches.

    Args:
      config: the Chipmunk config (attention and MLP enabled flags and dense-layer counts are honoured).
      num_layers: sparsifiable layers of the model (e.g. 57 for FLUX.1: 19 double + 38 single blocks).
      batch: batch including CFG branches.
      seq_len: attention sequence length (text + image/video tokens).
      heads, head_dim: attention heads and head size.
      width, hidden: MLP width C and hidden size F (needed when the MLP is enabled).
      mlp_seq_len: tokens through the sparse MLP (defaults to seq_len).
      dtype: dtype of the output/activation caches.

    Returns:
      {'attention': bytes, 'mlp': bytes, 'total': bytes}.
    """
    sizes = {"attention": 0, "mlp": 0}
    if config.attn.is_enabled:
        n = max(0, num_layers - config.attn.first_n_dense_layers)
        per = attention_cache_nbytes(
            config.attn, batch=batch, heads=heads, seq_len=seq_len, head_dim=head_dim, dtype=dtype
        )
        sizes["attention"] = n * per
    if config.mlp.is_enabled:
        if width is None or hidden is None:
            raise ValueError("model_cache_nbytes needs width and hidden when the MLP is sparsified")
        n = max(0, num_layers - config.mlp.first_n_dense_layers)
        per = mlp_cache_nbytes(
            config.mlp, batch=batch, seq_len=mlp_seq_len or seq_len, width=width, hidden=hidden, dtype=dtype
        )
        sizes["mlp"] = n * per
    sizes["total"] = sizes["attention"] + sizes["mlp"]
    return sizes
