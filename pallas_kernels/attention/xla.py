"""Portable XLA implementations of the attention primitives (any backend).

Memory stays linear in N: the queries are processed one chunk of query groups at a time (``lax.map``), so
at most [B, H, chunk_rows, Nk] scores exist at once. The sparse path gathers the selected key/value rows of
each group and runs a masked softmax over them; for large index capacities (compressed masks, whose count
varies per group) it walks the index list in KV chunks with an online softmax, stopping at the largest
count of the chunk, so its cost follows the selected work rather than the capacity.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import slot_mask

# Bytes of f32 scores allowed per lax.map iteration (bounds peak memory, keeps iterations large enough).
_SCORE_BYTES_PER_ITER = 64 * 2**20
# Index capacities above this are walked in chunks of _KV_CHUNK with an online softmax.
_ONE_SHOT_MAX_K = 2048
_KV_CHUNK = 512


def _num_groups(n: int, group: int) -> int:
    return -(-n // group)


def _to_groups(x: jax.Array, group: int, fill: float = 0.0) -> jax.Array:
    """[B, H, N, ...] -> [G, B, H, group, ...], padding rows with ``fill``."""
    b, h, n = x.shape[:3]
    g = _num_groups(n, group)
    pad = [(0, 0), (0, 0), (0, g * group - n)] + [(0, 0)] * (x.ndim - 3)
    x = jnp.pad(x, pad, constant_values=fill)
    x = x.reshape(b, h, g, group, *x.shape[3:])
    return jnp.moveaxis(x, 2, 0)


def _from_groups(x: jax.Array, n: int) -> jax.Array:
    """[G, B, H, group, ...] -> [B, H, N, ...]."""
    g, b, h, group = x.shape[:4]
    x = jnp.moveaxis(x, 0, 2).reshape(b, h, g * group, *x.shape[4:])
    return x[:, :, :n]


def _batch_size(b: int, h: int, rows: int, cols: int) -> int:
    return max(1, _SCORE_BYTES_PER_ITER // max(1, b * h * rows * cols * 4))


def _scale(d: int) -> float:
    return 1.0 / float(d) ** 0.5


@functools.partial(jax.jit, static_argnames=("group", "with_colsum"))
def _dense_chunked(q, k, v, prev_lse, *, group: int, with_colsum: bool):
    b, h, n, d = q.shape
    nk = k.shape[2]
    scale = _scale(d)
    qg = _to_groups(q, group)  # [G, B, H, group, D]
    # Padded rows get prev_lse = +inf so that they add nothing to the column sums.
    pg = _to_groups(prev_lse.astype(jnp.float32), group, fill=jnp.inf) if with_colsum else None

    def one_group(args):
        qc, pc = args
        s = jnp.einsum("bhqd,bhkd->bhqk", qc, k, preferred_element_type=jnp.float32) * scale
        lse = jax.nn.logsumexp(s, axis=-1)  # [B, H, group]
        p = jnp.exp(s - lse[..., None])
        o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        cs = jnp.exp(s - pc[..., None]).sum(axis=2) if with_colsum else None  # [B, H, Nk]
        return o.astype(q.dtype), lse, cs

    o, lse, cs = jax.lax.map(one_group, (qg, pg), batch_size=_batch_size(b, h, group, nk))
    o = _from_groups(o, n)
    lse = _from_groups(lse, n)
    if with_colsum:
        cs = jnp.moveaxis(cs, 0, 2)  # [B, H, G, Nk]
    return o, lse, cs


def dense_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, *, group: int = 192):
    """Dense attention and log partition function, chunked over query groups.

    Returns:
      o [B, H, N, D] in q.dtype and lse [B, H, N] float32.
    """
    o, lse, _ = _dense_chunked(q, k, v, None, group=group, with_colsum=False)
    return o, lse


def dense_attention_colsum_xla(q, k, v, prev_lse, *, group: int = 192):
    """Dense attention plus per-group column sums of exp(s - prev_lse) (SPEC §1.2b).

    Returns:
      o [B, H, N, D], lse [B, H, N] float32, cs [B, H, G, Nk] float32.
    """
    return _dense_chunked(q, k, v, prev_lse, group=group, with_colsum=True)


def _gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, H, N, D], idx [B, H, K] -> [B, H, K, D]."""
    return jax.vmap(jax.vmap(lambda xx, ii: xx[ii]))(x, idx)


def _masked_softmax_av(s, valid, vs):
    """Softmax over the valid slots of s [B,H,R,K] applied to vs [B,H,K,D]; empty rows give 0."""
    s = jnp.where(valid, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(valid, jnp.exp(s - m), 0.0)
    denom = p.sum(-1, keepdims=True)
    o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vs.dtype), vs, preferred_element_type=jnp.float32)
    return o / jnp.where(denom > 0, denom, 1.0)


@functools.partial(jax.jit, static_argnames=("group", "one_shot_max_k", "kv_chunk"))
def sparse_attention_xla(
    q, k, v, indices, counts, *, group: int = 192, one_shot_max_k: int = _ONE_SHOT_MAX_K, kv_chunk: int = _KV_CHUNK
):
    """Column-sparse attention A_S (SPEC §1.4) by per-group gathers.

    Args:
      q: [B, H, N, D]; k, v: [B, H, Nk, D].
      indices: [B, H, G, K] int32, G = ceil(N / group); counts: [B, H, G] int32.
      one_shot_max_k: capacities K up to this are gathered at once; larger ones are walked in chunks.
      kv_chunk: keys per chunk of the walk.

    Returns:
      [B, H, N, D] in q.dtype.
    """
    b, h, n, d = q.shape
    kcap = indices.shape[-1]
    scale = _scale(d)
    qg = _to_groups(q, group)  # [G, B, H, group, D]
    ig = jnp.moveaxis(jnp.clip(indices, 0, k.shape[2] - 1), 2, 0)  # [G, B, H, K]
    cg = jnp.moveaxis(counts, 2, 0)  # [G, B, H]

    if kcap <= one_shot_max_k:

        def one_group(args):
            qc, ic, cc = args
            ks, vs = _gather_rows(k, ic), _gather_rows(v, ic)
            s = jnp.einsum("bhqd,bhkd->bhqk", qc, ks, preferred_element_type=jnp.float32) * scale
            valid = slot_mask(cc, kcap)[:, :, None, :]
            return _masked_softmax_av(s, valid, vs).astype(q.dtype)

        bs = _batch_size(b, h, group, kcap)
    else:
        chunk = kv_chunk
        padk = -(-kcap // chunk) * chunk
        ig = jnp.pad(ig, ((0, 0), (0, 0), (0, 0), (0, padk - kcap)))

        def one_group(args):
            qc, ic, cc = args
            trips = (jnp.max(cc) + chunk - 1) // chunk

            def body(carry):
                i, m, l, acc = carry
                ii = jax.lax.dynamic_slice_in_dim(ic, i * chunk, chunk, axis=2)
                ks, vs = _gather_rows(k, ii), _gather_rows(v, ii)
                s = jnp.einsum("bhqd,bhkd->bhqk", qc, ks, preferred_element_type=jnp.float32) * scale
                valid = slot_mask(cc, chunk, i * chunk)[:, :, None, :]
                s = jnp.where(valid, s, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                alpha = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
                p = jnp.where(valid, jnp.exp(s - m_safe[..., None]), 0.0)
                l = l * alpha + p.sum(-1)
                pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vs.dtype), vs, preferred_element_type=jnp.float32)
                acc = acc * alpha[..., None] + pv
                return i + 1, m_new, l, acc

            init = (
                jnp.int32(0),
                jnp.full(qc.shape[:3], -jnp.inf, jnp.float32),
                jnp.zeros(qc.shape[:3], jnp.float32),
                jnp.zeros(qc.shape, jnp.float32),
            )
            _, _, l, acc = jax.lax.while_loop(lambda c: c[0] < trips, body, init)
            return (acc / jnp.where(l > 0, l, 1.0)[..., None]).astype(q.dtype)

        bs = _batch_size(b, h, group, chunk)
    o = jax.lax.map(one_group, (qg, ig, cg), batch_size=bs)
    return _from_groups(o, n)
