"""Attention primitives with ``implementation=`` dispatch.

Implementations: 'reference' (f32 jnp, clear, quadratic memory), 'xla' (portable, chunked, linear memory),
'mosaic_gpu' (Hopper kernels, registered by ``pallas_kernels.attention.mosaic_gpu`` when importable).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from pallas_kernels import registry
from pallas_kernels.attention import reference, xla


def _check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D]; got {q.shape=}, {k.shape=}, {v.shape=}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q, k, v shapes disagree: {q.shape=}, {k.shape=}, {v.shape=}")


registry.register(
    "dense_attention", "reference", lambda q, k, v, *, group: reference.dense_attention_reference(q, k, v)
)
registry.register("dense_attention", "xla", xla.dense_attention_xla)
registry.register("dense_attention_colsum", "reference", reference.dense_attention_colsum_reference)
registry.register("dense_attention_colsum", "xla", xla.dense_attention_colsum_xla)
registry.register("sparse_attention", "reference", reference.sparse_attention_reference)
registry.register("sparse_attention", "xla", xla.sparse_attention_xla)


def _impl(op: str, implementation: str) -> Callable:
    registry.load_optional_backends()
    return registry.get(op, implementation)


def dense_attention(q, k, v, *, group: int = 192, implementation: str = "xla"):
    """Dense non-causal attention with its log partition function.

    Args:
      q, k, v: [B, H, N, D] (k, v may have another length Nk).
      group: query rows per group (affects only tiling).
      implementation: 'reference', 'xla' or 'mosaic_gpu'.

    Returns:
      o [B, H, N, D] in q.dtype, lse [B, H, N] float32 (log sum_j exp(q_i.k_j / sqrt(D))).
    """
    _check_qkv(q, k, v)
    return _impl("dense_attention", implementation)(q, k, v, group=group)


def dense_attention_colsum(q, k, v, prev_lse, *, group: int = 192, implementation: str = "xla"):
    """Dense attention plus cs[b, h, g, j] = sum_{i in group g} exp(s_ij - prev_lse_i) (float32).

    Returns:
      o [B, H, N, D], lse [B, H, N] float32, cs [B, H, ceil(N / group), Nk] float32.
    """
    _check_qkv(q, k, v)
    if prev_lse.shape != q.shape[:3]:
        raise ValueError(f"prev_lse must be [B, H, N] = {q.shape[:3]}, got {prev_lse.shape=}")
    return _impl("dense_attention_colsum", implementation)(q, k, v, prev_lse, group=group)


def sparse_attention(q, k, v, indices, counts, *, group: int = 192, implementation: str = "xla"):
    """Column-sparse attention: per (b, h, query group) softmax over the keys indices[..., :counts].

    Args:
      q: [B, H, N, D]; k, v: [B, H, Nk, D].
      indices: [B, H, ceil(N / group), K] int32; counts: [B, H, ceil(N / group)] int32 (<= K).

    Returns:
      [B, H, N, D] in q.dtype.
    """
    _check_qkv(q, k, v)
    b, h, n, _ = q.shape
    g = -(-n // group)
    if indices.ndim != 4 or indices.shape[:3] != (b, h, g):
        raise ValueError(f"indices must be [B, H, G, K] with (B, H, G) = {(b, h, g)}, got {indices.shape=}")
    if counts.shape != (b, h, g):
        raise ValueError(f"counts must be [B, H, G] = {(b, h, g)}, got {counts.shape=}")
    return _impl("sparse_attention", implementation)(q, k, v, indices, counts, group=group)
