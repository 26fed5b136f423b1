"""Float64 NumPy oracles of the kernel primitives, independent of every implementation under test."""

from __future__ import annotations

import numpy as np


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _scores(q, k) -> np.ndarray:
    q, k = _f64(q), _f64(k)
    return np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])


def _logsumexp(s: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (np.log(np.sum(np.exp(s - m), axis=-1, keepdims=True)) + m)[..., 0]


def dense_attention(q, k, v):
    """(o [B, H, N, D], lse [B, H, N])."""
    s = _scores(q, k)
    lse = _logsumexp(s)
    o = np.einsum("bhqk,bhkd->bhqd", np.exp(s - lse[..., None]), _f64(v))
    return o, lse


def column_sums(q, k, prev_lse, group: int) -> np.ndarray:
    """cs [B, H, ceil(N / group), Nk] = sum over each query group of exp(s_ij - prev_lse_i)."""
    p = np.exp(_scores(q, k) - _f64(prev_lse)[..., None])
    b, h, n, nk = p.shape
    g = -(-n // group)
    return np.stack([p[:, :, i * group : (i + 1) * group].sum(axis=2) for i in range(g)], axis=2)


def sparse_attention(q, k, v, indices, counts, group: int) -> np.ndarray:
    """Softmax over keys indices[b, h, g, :counts] for the rows of query group g; empty groups give 0."""
    s = _scores(q, k)
    b, h, n, _ = s.shape
    o = np.zeros(q.shape, np.float64)
    idx, cnt = np.asarray(indices), np.asarray(counts)
    vv = _f64(v)
    for bi in range(b):
        for hi in range(h):
            for gi in range(idx.shape[2]):
                sel = idx[bi, hi, gi, : cnt[bi, hi, gi]]
                rows = slice(gi * group, min(n, (gi + 1) * group))
                if sel.size == 0:
                    continue
                ss = s[bi, hi, rows][:, sel]
                p = np.exp(ss - ss.max(axis=1, keepdims=True))
                o[bi, hi, rows] = (p / p.sum(axis=1, keepdims=True)) @ vv[bi, hi, sel]
    return o


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def sparse_mlp_delta(x, w1, b1, w2, indices, counts, act, out, block: int):
    """(new out [B, N, C], new act [B, N, F]) of SPEC 2.2 step 5."""
    x, w1, b1, w2, act, out = map(_f64, (x, w1, b1, w2, act, out))
    new_out, new_act = out.copy(), act.copy()
    idx, cnt = np.asarray(indices), np.asarray(counts)
    for bi in range(x.shape[0]):
        for gi in range(idx.shape[1]):
            sel = idx[bi, gi, : cnt[bi, gi]]
            rows = slice(gi * block, (gi + 1) * block)
            p = gelu_tanh(x[bi, rows] @ w1[sel].T + b1[sel][None, :]) - act[bi, rows][:, sel]
            new_out[bi, rows] += p @ w2[sel]
            block_act = new_act[bi, rows]  # a view: basic indexing
            block_act[:, sel] += p  # sel is duplicate-free
    return new_out, new_act
