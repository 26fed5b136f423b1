"""Float32 jnp references of the attention primitives, written for clarity, not speed or memory.

Layout everywhere: q, k, v are [B, H, N, D]; the scale is 1/sqrt(D); attention is non-causal.
Query group g holds rows [group*g, group*g + group) (the last group may be partial).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import slot_mask


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
    d = q.shape[-1]
    return jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(d))


def dense_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dense softmax attention and its per-row log partition function.

    Returns:
      o: [B, H, N, D] in q.dtype; lse: [B, H, N] float32, log sum_j exp(s_ij).
    """
    s = _scores(q, k)  # [B, H, N, N]
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    o = jnp.einsum("bhqk,bhkd->bhqd", p, v.astype(jnp.float32))
    return o.astype(q.dtype), lse


def dense_attention_colsum_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, prev_lse: jax.Array, *, group: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dense attention plus column sums of exp(s_ij - prev_lse_i) per query group (SPEC §1.2b).

    Returns:
      o [B, H, N, D], lse [B, H, N] float32, cs [B, H, G, N] float32 with G = ceil(N / group).
    """
    b, h, n, _ = q.shape
    o, lse = dense_attention_reference(q, k, v)
    p_prev = jnp.exp(_scores(q, k) - prev_lse[..., None].astype(jnp.float32))  # [B, H, N, N]
    g = -(-n // group)
    p_prev = jnp.pad(p_prev, ((0, 0), (0, 0), (0, g * group - n), (0, 0)))  # padded rows add nothing
    cs = p_prev.reshape(b, h, g, group, k.shape[2]).sum(axis=3)
    return o, lse, cs


def sparse_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, counts: jax.Array, *, group: int
) -> jax.Array:
    """Column-sparse attention A_S (SPEC §1.4): softmax over the selected columns only.

    Args:
      q, k, v: [B, H, N, D] (keys may have a different length Nk).
      indices: [B, H, G, K] int32 key indices per query group; slots >= counts are ignored.
      counts: [B, H, G] int32 number of valid slots.
      group: query rows per group.

    Returns:
      [B, H, N, D] in q.dtype; a group with count 0 gives zeros.
    """
    b, h, n, d = q.shape
    g = indices.shape[2]
    qg = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, 0), (0, g * group - n), (0, 0)))
    qg = qg.reshape(b, h, g, group, d)
    idx = jnp.clip(indices, 0, k.shape[2] - 1)
    ks = jax.vmap(jax.vmap(lambda kk, ii: kk[ii]))(k.astype(jnp.float32), idx)  # [B, H, G, K, D]
    vs = jax.vmap(jax.vmap(lambda vv, ii: vv[ii]))(v.astype(jnp.float32), idx)
    s = jnp.einsum("bhgqd,bhgkd->bhgqk", qg, ks) / jnp.sqrt(jnp.float32(d))
    valid = slot_mask(counts, indices.shape[-1])[:, :, :, None, :]  # [B, H, G, 1, K]
    s = jnp.where(valid, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(valid, jnp.exp(s - m), 0.0)
    denom = p.sum(-1, keepdims=True)
    o = jnp.einsum("bhgqk,bhgkd->bhgqd", p, vs) / jnp.where(denom > 0, denom, 1.0)
    return o.reshape(b, h, g * group, d)[:, :, :n].astype(q.dtype)
