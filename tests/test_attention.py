"""The sparse attention operator against SPEC §1, with float64 numpy as the independent oracle."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chipmunk_jax as cj
from chipmunk_jax import indices as ix
from chipmunk_jax.schedules import AttnKind as K
from pallas_kernels.attention import reference as ref_ops
from pallas_kernels.attention import xla as xla_ops

B, H, D = 2, 2, 16
BACKENDS = ("reference", "xla")


def _qkv(seed: int, n: int, b: int = B, h: int = H, d: int = D, scale: float = 1.0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(scale * jax.random.normal(kk, (b, h, n, d), jnp.float32) for kk in ks)


def _np_dense(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    m = s.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(s - m).sum(-1, keepdims=True)))[..., 0]
    return np.einsum("bhqk,bhkd->bhqd", np.exp(s - lse[..., None]), v), lse, s


def _np_sparse(q, k, v, indices, counts, group):
    """A_S of SPEC §1.4 from its formula: per query row, softmax over the group's selected columns."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    indices, counts = np.asarray(indices), np.asarray(counts)
    b, h, n, d = q.shape
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                g = i // group
                sel = indices[bi, hi, g, : counts[bi, hi, g]]
                if sel.size == 0:
                    continue  # an empty selection is defined as 0
                s = k[bi, hi, sel] @ q[bi, hi, i] / np.sqrt(d)
                p = np.exp(s - s.max())
                out[bi, hi, i] = p @ v[bi, hi, sel] / p.sum()
    return out


def _np_colsum(s, prev_lse, group):
    b, h, n, nk = s.shape
    g = -(-n // group)
    cs = np.zeros((b, h, g, nk))
    p = np.exp(s - np.asarray(prev_lse, np.float64)[..., None])
    for gi in range(g):
        cs[:, :, gi] = p[:, :, gi * group : (gi + 1) * group].sum(2)
    return cs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compress", [False, True])
def test_all_selected_equals_dense_over_a_run(backend, compress):
    """(a) With every key selected, every step kind equals dense attention, with inputs changing each step."""
    n = 200  # not a multiple of the 64-row group (a partial last group); 40 * round(200 / 40) = 200 keys
    cfg = cj.AttnConfig(top_keys=1.0, counts_multiple_of=40, mbm=64, should_compress_indices=compress, random_keys=0.0)
    cache = cj.init_attention_cache(cfg, batch=B, heads=H, seq_len=n, head_dim=D, dtype=jnp.float32)
    kinds = [K.WARMUP, K.MASK, K.SPARSE, K.SPARSE, K.FULL, K.SPARSE, K.MASK, K.SPARSE, K.DENSE]
    for t, kind in enumerate(kinds):
        q, k, v = _qkv(100 + t, n, scale=1.5)
        out, cache = cj.sparse_attention(q, k, v, cache, kind=kind, config=cfg, backend=backend, rng=jax.random.key(t))
        want, _, _ = _np_dense(q, k, v)
        np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-5, err_msg=f"step {t} {kind}")


def _random_selection(rng: np.random.Generator, b, h, g, nk, kcap, min_count):
    indices = np.zeros((b, h, g, kcap), np.int32)
    counts = rng.integers(min_count, kcap + 1, size=(b, h, g)).astype(np.int32)
    for idx in np.ndindex(b, h, g):
        indices[idx] = rng.permutation(nk)[:kcap]  # duplicate-free; slots past counts hold real columns too
    return indices, counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_step_is_cache_plus_sparse_attention_float64(backend):
    """(b) Mask step -> top-k of the column sums, C = o - A_S; sparse step -> C + A_S(t), checked in float64."""
    n, group = 150, 64
    cfg = cj.AttnConfig(top_keys=0.3, counts_multiple_of=16, mbm=group, should_compress_indices=False)
    cache = cj.init_attention_cache(cfg, batch=B, heads=H, seq_len=n, head_dim=D, dtype=jnp.float32)
    q0, k0, v0 = _qkv(0, n)
    q1, k1, v1 = _qkv(1, n)
    q2, k2, v2 = _qkv(2, n)

    _, cache = cj.sparse_attention(q0, k0, v0, cache, kind=K.WARMUP, config=cfg, backend=backend)
    _, lse0, _ = _np_dense(q0, k0, v0)
    np.testing.assert_allclose(np.asarray(cache.lse), lse0, rtol=1e-5, atol=1e-5)

    o1, cache = cj.sparse_attention(q1, k1, v1, cache, kind=K.MASK, config=cfg, backend=backend)
    want_o1, lse1, s1 = _np_dense(q1, k1, v1)
    np.testing.assert_allclose(np.asarray(o1), want_o1, atol=2e-5)
    np.testing.assert_allclose(np.asarray(cache.lse), lse1, rtol=1e-5, atol=1e-5)
    # Selection: tk = m * round(top_keys * N / m) = 16 * round(2.8125) = 48 columns of largest mass, per group,
    # with the mass measured against the PREVIOUS step's normaliser.
    tk = 48
    cs = _np_colsum(s1, lse0, group)
    want_sel = np.sort(np.argsort(-cs, axis=-1)[..., :tk], axis=-1)
    np.testing.assert_array_equal(np.asarray(cache.indices), want_sel)
    np.testing.assert_array_equal(np.asarray(cache.counts), np.full((B, H, 3), tk))
    c1 = want_o1 - _np_sparse(q1, k1, v1, want_sel, np.full((B, H, 3), tk), group)
    np.testing.assert_allclose(np.asarray(cache.out), c1, atol=3e-5)

    o2, cache2 = cj.sparse_attention(q2, k2, v2, cache, kind=K.SPARSE, config=cfg, backend=backend)
    want_o2 = c1 + _np_sparse(q2, k2, v2, want_sel, np.full((B, H, 3), tk), group)
    np.testing.assert_allclose(np.asarray(o2), want_o2, atol=3e-5)
    assert cache2 is cache or jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), cache2, cache))

    # A random duplicate-free selection with counts below capacity (masked slots), through FULL then SPARSE.
    rng = np.random.default_rng(0)
    sel, cnt = _random_selection(rng, B, H, 3, n, tk, 1)
    cache = cache.replace(indices=jnp.asarray(sel), counts=jnp.asarray(cnt))
    o3, cache = cj.sparse_attention(q1, k1, v1, cache, kind=K.FULL, config=cfg, backend=backend)
    c3 = want_o1 - _np_sparse(q1, k1, v1, sel, cnt, group)
    np.testing.assert_allclose(np.asarray(o3), want_o1, atol=2e-5)
    np.testing.assert_allclose(np.asarray(cache.out), c3, atol=3e-5)
    o4, _ = cj.sparse_attention(q2, k2, v2, cache, kind=K.SPARSE, config=cfg, backend=backend)
    np.testing.assert_allclose(np.asarray(o4), c3 + _np_sparse(q2, k2, v2, sel, cnt, group), atol=3e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compressed_mask_step_float64(backend):
    """Compressed mode: the mask holds the top-tk columns and the static rows; A_S uses the padded selection."""
    n, group, m = 130, 64, 16
    cfg = cj.AttnConfig(top_keys=0.25, counts_multiple_of=m, mbm=group, should_compress_indices=True)
    g = 3
    rng = np.random.default_rng(1)
    static = ix.StaticMask(mask=rng.random((H, g, n)) < 0.05, sparse_group=np.array([[True, False, True]] * H))
    cache = cj.init_attention_cache(cfg, batch=B, heads=H, seq_len=n, head_dim=D, dtype=jnp.float32)
    q0, k0, v0 = _qkv(10, n)
    q1, k1, v1 = _qkv(11, n)
    q2, k2, v2 = _qkv(12, n)
    _, cache = cj.sparse_attention(q0, k0, v0, cache, kind=K.WARMUP, config=cfg, backend=backend)
    key = jax.random.key(5)
    o1, cache = cj.sparse_attention(
        q1, k1, v1, cache, kind=K.MASK, config=cfg, backend=backend, rng=key, static_mask=static
    )
    mask = np.asarray(ix.unpack_bits(cache.mask_bits, n))
    want_o1, _, s1 = _np_dense(q1, k1, v1)
    _, lse0, _ = _np_dense(q0, k0, v0)
    cs = _np_colsum(s1, lse0, group)
    tk = m * round(0.25 * n / m)  # 32
    top = np.zeros_like(mask)
    np.put_along_axis(top, np.argsort(-cs, axis=-1)[..., :tk], True, axis=-1)
    rand = np.asarray(jax.random.uniform(key, (B, H, g, n))) < 0.01
    want_mask = ((top | rand) & static.sparse_group[None, :, :, None]) | static.mask[None]
    np.testing.assert_array_equal(mask, want_mask)

    # mask -> (indices, counts): selected ascending, rounded up to m with the lowest unselected columns.
    sel = np.zeros((B, H, g, n), np.int32)
    cnt = np.zeros((B, H, g), np.int32)
    for idx in np.ndindex(B, H, g):
        on = np.flatnonzero(mask[idx])
        off = np.flatnonzero(~mask[idx])
        sel[idx] = np.concatenate([on, off])
        cnt[idx] = min(-(-on.size // m) * m, n)
    c1 = want_o1 - _np_sparse(q1, k1, v1, sel, cnt, group)
    np.testing.assert_allclose(np.asarray(cache.out), c1, atol=3e-5)
    o2, _ = cj.sparse_attention(q2, k2, v2, cache, kind=K.SPARSE, config=cfg, backend=backend)
    np.testing.assert_allclose(np.asarray(o2), c1 + _np_sparse(q2, k2, v2, sel, cnt, group), atol=3e-5)


def test_cache_structure_is_the_same_for_every_kind():
    """(d) Every kind returns a cache with the shapes and dtypes of the initial one (scan/donation need it)."""
    n = 100
    for compress in (False, True):
        cfg = cj.AttnConfig(top_keys=0.5, counts_multiple_of=16, mbm=32, should_compress_indices=compress)
        cache0 = cj.init_attention_cache(cfg, batch=1, heads=2, seq_len=n, head_dim=8, dtype=jnp.bfloat16)
        cache = cache0
        for t, kind in enumerate([K.WARMUP, K.MASK, K.SPARSE, K.FULL, K.DENSE]):
            q, k, v = (a.astype(jnp.bfloat16) for a in _qkv(t, n, b=1, h=2, d=8))
            out, cache = cj.sparse_attention(
                q, k, v, cache, kind=kind, config=cfg, backend="xla", rng=jax.random.key(0)
            )
            assert out.dtype == jnp.bfloat16 and out.shape == q.shape
            chex.assert_trees_all_equal_shapes_and_dtypes(cache, cache0)


def test_one_compilation_per_kind():
    """(e) Under jit with the kind static, each kind traces once; new data does not retrace."""
    n = 96
    cfg = cj.AttnConfig(top_keys=0.5, counts_multiple_of=16, mbm=32, should_compress_indices=True)
    traces = []

    @jax.jit(static_argnames=("kind",))
    def step(q, k, v, cache, rng, *, kind):
        traces.append(kind)
        return cj.sparse_attention(q, k, v, cache, kind=kind, config=cfg, backend="xla", rng=rng)

    cache = cj.init_attention_cache(cfg, batch=1, heads=1, seq_len=n, head_dim=8, dtype=jnp.float32)
    kinds = [K.WARMUP, K.MASK, K.SPARSE, K.SPARSE, K.FULL, K.SPARSE, K.MASK, K.SPARSE]
    for t, kind in enumerate(kinds):
        q, k, v = _qkv(t, n, b=1, h=1, d=8)
        _, cache = step(q, k, v, cache, jax.random.key(t), kind=kind)
    assert sorted(traces, key=lambda x: x.value) == sorted(set(kinds), key=lambda x: x.value)


@pytest.mark.parametrize("compress", [False, True])
def test_reference_and_xla_backends_agree(compress):
    """(f) The two backends agree on a random sparse run (bf16 inputs, f32 accumulation)."""
    n = 260
    cfg = cj.AttnConfig(top_keys=0.3, counts_multiple_of=32, mbm=64, should_compress_indices=compress)
    outs = {}
    for backend in BACKENDS:
        cache = cj.init_attention_cache(cfg, batch=B, heads=H, seq_len=n, head_dim=D, dtype=jnp.float32)
        res = []
        for t, kind in enumerate([K.WARMUP, K.MASK, K.SPARSE, K.SPARSE]):
            q, k, v = _qkv(200 + t, n)
            o, cache = cj.sparse_attention(
                q, k, v, cache, kind=kind, config=cfg, backend=backend, rng=jax.random.key(3)
            )
            res.append(np.asarray(o))
        outs[backend] = res
    for a, b in zip(outs["reference"], outs["xla"], strict=True):
        np.testing.assert_allclose(a, b, atol=3e-5)


@pytest.mark.parametrize("one_shot_max_k,kv_chunk", [(10_000, 64), (16, 16), (16, 48)])
def test_xla_sparse_primitive_chunked_paths_match_reference(one_shot_max_k, kv_chunk):
    """The XLA primitive's one-shot and chunked (online softmax) paths equal the reference, incl. count 0."""
    n, group, kcap = 170, 64, 100
    q, k, v = _qkv(7, n)
    rng = np.random.default_rng(2)
    sel, cnt = _random_selection(rng, B, H, 3, n, kcap, 0)
    cnt[0, 0, 0] = 0
    cnt[1, 1, 2] = kcap
    want = ref_ops.sparse_attention_reference(q, k, v, jnp.asarray(sel), jnp.asarray(cnt), group=group)
    got = xla_ops.sparse_attention_xla(
        q, k, v, jnp.asarray(sel), jnp.asarray(cnt), group=group, one_shot_max_k=one_shot_max_k, kv_chunk=kv_chunk
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    assert np.all(np.asarray(got)[0, 0, :group] == 0)  # an empty selection gives zeros, not NaN
    np.testing.assert_allclose(np.asarray(want), _np_sparse(q, k, v, sel, cnt, group), atol=2e-5)


def test_dense_colsum_primitives_match_float64():
    n, group = 140, 64
    q, k, v = _qkv(8, n)
    prev = jnp.asarray(np.random.default_rng(3).normal(size=(B, H, n)) + 3.0, jnp.float32)
    want_o, want_lse, s = _np_dense(q, k, v)
    want_cs = _np_colsum(s, prev, group)
    for o, lse, cs in (
        ref_ops.dense_attention_colsum_reference(q, k, v, prev, group=group),
        xla_ops.dense_attention_colsum_xla(q, k, v, prev, group=group),
    ):
        np.testing.assert_allclose(np.asarray(o), want_o, atol=2e-5)
        np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(cs), want_cs, rtol=2e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    """(g) Misuse is named, not silently wrong."""
    n = 64
    cfg = cj.AttnConfig(top_keys=0.5, counts_multiple_of=16, mbm=32, should_compress_indices=True)
    cache = cj.init_attention_cache(cfg, batch=1, heads=1, seq_len=n, head_dim=8, dtype=jnp.float32)
    q, k, v = _qkv(0, n, b=1, h=1, d=8)
    with pytest.raises(ValueError, match="needs rng"):
        cj.sparse_attention(q, k, v, cache, kind=K.MASK, config=cfg, backend="xla")
    with pytest.raises(ValueError, match="unknown backend"):
        cj.sparse_attention(q, k, v, cache, kind=K.SPARSE, config=cfg, backend="cuda")
    with pytest.raises(ValueError, match="does not match q"):
        q2, k2, v2 = _qkv(0, n + 1, b=1, h=1, d=8)
        cj.sparse_attention(q2, k2, v2, cache, kind=K.SPARSE, config=cfg, backend="xla")
    with pytest.raises(ValueError, match="other mode"):
        topk_cfg = cj.AttnConfig(top_keys=0.5, counts_multiple_of=16, mbm=32, should_compress_indices=False)
        cj.sparse_attention(q, k, v, cache, kind=K.SPARSE, config=topk_cfg, backend="xla")
    with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
        cj.sparse_attention(q[0], k[0], v[0], cache, kind=K.SPARSE, config=cfg, backend="xla")
    with pytest.raises(ValueError, match="no implementation 'mosaic_gpu_nope'"):
        from pallas_kernels.attention import api

        api.dense_attention(q, k, v, implementation="mosaic_gpu_nope")
    with pytest.raises(ValueError, match="kind"):
        cj.sparse_attention(q, k, v, cache, kind="sparsest", config=cfg, backend="xla")


def test_auto_backend_takes_mosaic_only_for_verified_ops(monkeypatch):
    """'auto' on a Hopper GPU uses a Mosaic kernel only for ops verified on hardware; never off a GPU."""
    from chipmunk_jax import backends

    assert backends.resolve_backend("auto", "sparse_attention") == "xla"  # this machine has no GPU
    monkeypatch.setattr(backends, "_on_hopper", lambda: True)
    monkeypatch.setattr(backends.registry, "available", lambda op: ("mosaic_gpu", "reference", "xla"))
    for op in ("sparse_attention", "dense_attention", "dense_attention_colsum"):
        assert backends.resolve_backend("auto", op) == "mosaic_gpu"
    assert backends.resolve_backend("auto", "sparse_mlp_delta") == "xla"  # slower than xla on the H200
    assert backends.resolve_backend("mosaic_gpu", "sparse_mlp_delta") == "mosaic_gpu"  # explicit choice kept
