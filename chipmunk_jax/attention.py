"""The sparse attention operator (SPEC §1): one call per layer and step, cache in, new cache out."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from chipmunk_jax import indices as ix
from chipmunk_jax.backends import resolve_backend
from chipmunk_jax.cache import AttentionCache
from chipmunk_jax.config import AttnConfig, ChipmunkConfig
from chipmunk_jax.schedules import AttnKind, _kind
from pallas_kernels import attention as ops


def _attn_cfg(config: AttnConfig | ChipmunkConfig) -> AttnConfig:
    return config.attn if isinstance(config, ChipmunkConfig) else config


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "auto") -> jax.Array:
    """Plain dense attention on [B, H, N, D] (cuDNN/XLA through jax.nn.dot_product_attention for 'xla')."""
    backend = resolve_backend(backend, "dense_attention")
    if backend == "xla":
        # jax.nn.dot_product_attention mixes bf16 and f32 internally, which strict promotion rejects.
        with jax.numpy_dtype_promotion("standard"):
            o = jax.nn.dot_product_attention(
                jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
            )  # [B, N, H, D]
        return jnp.swapaxes(o, 1, 2)
    return ops.dense_attention(q, k, v, implementation=backend)[0]


def _selection(cache: AttentionCache, cfg: AttnConfig, n_keys: int) -> tuple[jax.Array, jax.Array]:
    if cfg.should_compress_indices:
        return ix.mask_to_indices(ix.unpack_bits(cache.mask_bits, n_keys), cfg.counts_multiple_of)
    return cache.indices, cache.counts


def _check(q, k, v, cache: AttentionCache, cfg: AttnConfig) -> None:
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v must be [B, H, N, D] with equal B, H, D; got {q.shape=}, {k.shape=}, {v.shape=}")
    if cache.out.shape != q.shape:
        raise ValueError(f"cache.out {cache.out.shape} does not match q {q.shape}; was the cache made for this layer?")
    if cfg.should_compress_indices != (cache.mask_bits is not None):
        mode = "compressed" if cfg.should_compress_indices else "top-k"
        raise ValueError(f"the config asks for {mode} indices but the cache was made for the other mode")


def sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: AttentionCache,
    *,
    kind: AttnKind,
    config: AttnConfig | ChipmunkConfig,
    backend: str = "auto",
    rng: jax.Array | None = None,
    static_mask: ix.StaticMask | None = None,
) -> tuple[jax.Array, AttentionCache]:
    """Chipmunk attention for one layer at one step.

    Args:
      q, k, v: [B, H, N, D] (queries and keys share the sequence; RoPE already applied).
      cache: this layer's AttentionCache (``init_attention_cache``).
      kind: the static step kind (``schedules.step_kinds``).
      config: the attention config (or the whole ChipmunkConfig).
      backend: 'auto', 'reference', 'xla' or 'mosaic_gpu'.
      rng: random key (``indices.layer_rng``); needed by MASK steps in compressed mode.
      static_mask: the video static mask (compressed mode), or None.

    Returns:
      (out [B, H, N, D] in q.dtype, new cache). WARMUP/MASK/FULL/DENSE return exact dense attention; SPARSE
      returns C + A_S(q, k, v) with C = o - A_S from the last full step.
    """
    cfg = _attn_cfg(config)
    kind = _kind(AttnKind, kind)
    resolve_backend(backend)  # an unknown name fails here, whatever the kind
    if kind is AttnKind.DENSE:
        return dense_attention(q, k, v, backend=backend), cache
    _check(q, k, v, cache, cfg)
    group, n_keys = cfg.mbm, k.shape[2]

    def a_s(indices, counts):
        return ops.sparse_attention(
            q, k, v, indices, counts, group=group, implementation=resolve_backend(backend, "sparse_attention")
        )

    def store_delta(o, a):
        return (o.astype(jnp.float32) - a.astype(jnp.float32)).astype(cache.out.dtype)

    if kind is AttnKind.WARMUP:
        o, lse = ops.dense_attention(q, k, v, group=group, implementation=resolve_backend(backend, "dense_attention"))
        return o, cache.replace(lse=lse)

    if kind is AttnKind.MASK:
        impl = resolve_backend(backend, "dense_attention_colsum")
        o, lse, cs = ops.dense_attention_colsum(q, k, v, cache.lse, group=group, implementation=impl)
        if cfg.should_compress_indices:
            if rng is None:
                raise ValueError("a MASK step in compressed mode needs rng (indices.layer_rng(key, step, layer))")
            mask = ix.compressed_mask(cs, cfg, rng, static_mask)
            indices, counts = ix.mask_to_indices(mask, cfg.counts_multiple_of)
            new = cache.replace(lse=lse, mask_bits=ix.pack_bits(mask))
        else:
            kcap = cache.indices.shape[-1]
            indices = ix.topk_indices(cs, kcap)
            counts = jnp.full(cs.shape[:3], kcap, jnp.int32)
            new = cache.replace(lse=lse, indices=indices, counts=counts)
        return o, new.replace(out=store_delta(o, a_s(indices, counts)))

    indices, counts = _selection(cache, cfg, n_keys)
    if kind is AttnKind.FULL:
        o, _ = ops.dense_attention(q, k, v, group=group, implementation=resolve_backend(backend, "dense_attention"))
        return o, cache.replace(out=store_delta(o, a_s(indices, counts)))

    # SPARSE: o = C + A_S(q_t, k_t, v_t); the cache stays anchored to the last full step.
    a = a_s(indices, counts)
    o = cache.out.astype(jnp.float32) + a.astype(jnp.float32)
    return o.astype(q.dtype), cache
