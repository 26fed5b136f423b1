"""Tests of chipmunk_jax.indices against SPEC §1.2, §1.3, §2.2 and §10.

Every expected value is computed here with numpy and plain loops from SPEC's text.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax.config import AttnConfig, MLPConfig
from chipmunk_jax.indices import (
    StaticMask,
    attn_top_k,
    block_mean,
    compressed_mask,
    layer_rng,
    mask_to_indices,
    mlp_select,
    pack_bits,
    static_video_mask,
    topk_capacity,
    topk_indices,
    unpack_bits,
)


def _distinct_scores(shape, seed):
    """Random float32 scores without ties (a shuffled arange per row), so top-k and quantiles are unique."""
    rng = np.random.default_rng(seed)
    n = shape[-1]
    rows = np.stack([rng.permutation(n) for _ in range(int(np.prod(shape[:-1])))])
    return (rows.reshape(shape).astype(np.float32) + np.float32(0.5)) / np.float32(n)


# ---------------------------------------------------------------------------------------------------------------
# Bit packing


@pytest.mark.parametrize("shape", [(100,), (2, 3, 100), (4, 32), (1, 65)])
def test_pack_bits_layout_and_roundtrip(shape):
    mask = np.random.default_rng(sum(shape)).random(shape) < 0.4
    packed = np.asarray(pack_bits(jnp.asarray(mask)))
    n = shape[-1]
    words = -(-n // 32)
    assert packed.shape == (*shape[:-1], words) and packed.dtype == np.uint32
    flat_mask = mask.reshape(-1, n)
    flat_packed = packed.reshape(-1, words)
    for row in range(flat_mask.shape[0]):
        for w in range(words):
            want = 0
            for j in range(32 * w, min(32 * w + 32, n)):
                if flat_mask[row, j]:
                    want |= 1 << (j - 32 * w)
            assert int(flat_packed[row, w]) == want
    back = np.asarray(unpack_bits(jnp.asarray(packed), n))
    assert back.dtype == np.bool_
    np.testing.assert_array_equal(back, mask)


def test_unpack_ignores_bits_past_n():
    bits = jnp.asarray(np.array([[0xFFFFFFFF, 0xFFFFFFFF]], dtype=np.uint32))
    out = np.asarray(unpack_bits(bits, 40))
    assert out.shape == (1, 40) and out.all()


# ---------------------------------------------------------------------------------------------------------------
# mask -> (indices, counts)


def _np_mask_to_indices(mask, multiple):
    n = mask.shape[-1]
    flat = mask.reshape(-1, n)
    idx = np.zeros_like(flat, dtype=np.int64)
    counts = np.zeros(flat.shape[0], dtype=np.int64)
    for r in range(flat.shape[0]):
        sel = [j for j in range(n) if flat[r, j]]
        unsel = [j for j in range(n) if not flat[r, j]]
        idx[r] = sel + unsel
        counts[r] = min(-(-len(sel) // multiple) * multiple, n)
    return idx.reshape(mask.shape), counts.reshape(mask.shape[:-1])


def test_mask_to_indices_matches_loop():
    n, m = 300, 128
    rng = np.random.default_rng(0)
    mask = rng.random((2, 3, 4, n)) < rng.random((2, 3, 4, 1))
    mask[0, 0, 0] = False  # empty row: count 0
    mask[0, 0, 1] = True  # full row: count N
    mask[0, 0, 2] = False
    mask[0, 0, 2, rng.choice(n, 129, replace=False)] = True  # 129 -> 256
    mask[0, 0, 3] = False
    mask[0, 0, 3, rng.choice(n, 257, replace=False)] = True  # 257 -> 384, capped at 300
    mask[0, 1, 0] = False
    mask[0, 1, 0, [5, 299]] = True  # 2 -> 128: columns 0..4, 6..126 fill the tile
    idx, counts = mask_to_indices(jnp.asarray(mask), m)
    chex.assert_shape(idx, mask.shape)
    chex.assert_shape(counts, mask.shape[:-1])
    assert idx.dtype == jnp.int32 and counts.dtype == jnp.int32
    want_idx, want_counts = _np_mask_to_indices(mask, m)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_array_equal(np.asarray(counts), want_counts)
    assert int(counts[0, 0, 0]) == 0 and int(counts[0, 0, 1]) == n
    assert int(counts[0, 0, 2]) == 256 and int(counts[0, 0, 3]) == n and int(counts[0, 1, 0]) == 128
    members = set(np.asarray(idx[0, 1, 0, :128]).tolist())
    assert members == {5, 299} | (set(range(127)) - {5})


# ---------------------------------------------------------------------------------------------------------------
# top-k and the attention key count


def test_topk_indices_matches_argsort():
    cs = _distinct_scores((2, 3, 4, 50), seed=1)
    for k in (1, 7, 50):
        got = np.asarray(topk_indices(jnp.asarray(cs), k))
        want = np.sort(np.argsort(-cs, axis=-1)[..., :k], axis=-1)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "top_keys, m, n, want",
    [
        (0.165, 112, 4352, 672),  # Flux 1280x768 + 512 text: 718.08 / 112 = 6.41 -> 6
        (0.25, 128, 1280, 256),  # 2.5 -> 2 (half to even)
        (0.25, 128, 1792, 512),  # 3.5 -> 4 (half to even)
        (0.25, 128, 2304, 512),  # 4.5 -> 4 (half to even)
        (0.05, 128, 1000, 0),  # 0.39 -> 0
        (0.1, 128, 117000, 11648),  # 91.41 -> 91
        (1.0, 128, 300, 256),  # 2.34 -> 2
        (0.6, 128, 1000, 640),  # 4.6875 -> 5
    ],
)
def test_attn_top_k_rounding(top_keys, m, n, want):
    cfg = AttnConfig(top_keys=top_keys, counts_multiple_of=m)
    assert attn_top_k(cfg, n) == want
    assert want == m * int(np.rint(top_keys * n / m))  # numpy's rint also rounds half to even


@pytest.mark.parametrize(
    "top_keys, m, n, want",
    [
        (0.05, 128, 1000, 128),  # tk 0 -> one KV tile
        (0.05, 128, 100, 100),  # tk 0 and N < m -> N
        (1.0, 128, 200, 200),  # 1.56 -> 2 tiles = 256 > N -> N
        (0.25, 128, 1792, 512),
        (0.165, 112, 4352, 672),
        (1.0, 112, 4352, 4352),  # 38.86 -> 39 tiles = 4368 > N -> N
    ],
)
def test_topk_capacity_clamps(top_keys, m, n, want):
    assert topk_capacity(AttnConfig(top_keys=top_keys, counts_multiple_of=m), n) == want


# ---------------------------------------------------------------------------------------------------------------
# Compressed-mode mask (SPEC §1.2 b)


def _np_top_mask(cs, k):
    top = np.zeros(cs.shape, bool)
    np.put_along_axis(top, np.argsort(-cs, axis=-1)[..., :k], True, axis=-1)
    return top


def test_compressed_mask_without_static_mask():
    cfg = AttnConfig(top_keys=0.05, counts_multiple_of=128)
    cs = _distinct_scores((2, 4, 8, 2048), seed=2)
    k = 128  # 0.05 * 2048 / 128 = 0.8 -> 1 tile
    key = jax.random.key(3)
    mask = np.asarray(compressed_mask(jnp.asarray(cs), cfg, key, None))
    assert mask.shape == cs.shape and mask.dtype == np.bool_
    top = _np_top_mask(cs, k)
    assert (mask | ~top).all()  # every top-k column is in
    extra = mask & ~top
    rate = extra.sum() / (~top).sum()
    assert 0.0085 < rate < 0.0115, rate  # 1% random keys; ~122k trials, 4 sigma ~ 0.0011
    # Same key: same mask. Another key: another random part, same top-k part.
    np.testing.assert_array_equal(np.asarray(compressed_mask(jnp.asarray(cs), cfg, key, None)), mask)
    other = np.asarray(compressed_mask(jnp.asarray(cs), cfg, jax.random.key(4), None))
    assert (other != mask).any()
    assert (other | ~top).all()


def _random_static(h, g, n, seed):
    rng = np.random.default_rng(seed)
    static = rng.random((h, g, n)) < 0.05
    sparse_group = rng.random((h, g)) < 0.6
    sparse_group[0, 0], sparse_group[0, 1] = True, False
    return StaticMask(mask=static, sparse_group=sparse_group)


def test_compressed_mask_with_static_mask():
    b, h, g, n = 2, 3, 5, 1024
    cfg = AttnConfig(top_keys=0.25, counts_multiple_of=128)
    k = 256
    cs = _distinct_scores((b, h, g, n), seed=5)
    static = _random_static(h, g, n, seed=6)
    mask = np.asarray(compressed_mask(jnp.asarray(cs), cfg, jax.random.key(7), static))
    top = _np_top_mask(cs, k)
    for bi in range(b):
        for hi in range(h):
            for gi in range(g):
                row, st = mask[bi, hi, gi], static.mask[hi, gi]
                assert (row | ~st).all()  # static columns are always in
                if static.sparse_group[hi, gi]:
                    assert (row | ~top[bi, hi, gi]).all()
                else:
                    np.testing.assert_array_equal(row, st)  # gated: only the static row
    gated_in = static.sparse_group[None, :, :, None] & ~top & ~static.mask[None]
    rate = (mask & gated_in).sum() / gated_in.sum()
    assert 0.003 < rate < 0.02, rate


def test_compressed_mask_zero_keys_is_static_mask():
    b, h, g, n = 2, 2, 3, 640
    cfg = AttnConfig(top_keys=0.05, counts_multiple_of=128)  # 0.25 tiles -> tk = 0
    cs = _distinct_scores((b, h, g, n), seed=8)
    static = _random_static(h, g, n, seed=9)
    mask = np.asarray(compressed_mask(jnp.asarray(cs), cfg, jax.random.key(0), static))
    np.testing.assert_array_equal(mask, np.broadcast_to(static.mask, (b, h, g, n)))


def test_compressed_mask_rejects_mismatched_static_mask():
    cs = jnp.zeros((1, 2, 3, 256), jnp.float32)
    static = _random_static(2, 4, 256, seed=0)
    with pytest.raises(ValueError):
        compressed_mask(cs, AttnConfig(top_keys=0.5), jax.random.key(0), static)


# ---------------------------------------------------------------------------------------------------------------
# Static video mask (SPEC §1.3)


def _window_voxels(c, size, lv):
    """Voxel coordinates of an lv-wide window around c on an axis of ``size`` voxels, moved inward at borders."""
    width = min(lv, size)
    lo = c - lv // 2
    if lo < 0:
        lo = 0
    if lo + width > size:
        lo = size - width
    return list(range(lo, lo + width))


def _expected_static(grid, text_len, lv, w1d):
    """The deterministic part of the static mask [G, N] (rules 1-4) built from SPEC's text with loops."""
    tt, th, tw = grid
    nt, nh, nw = tt // 4, th // 6, tw // 8
    n_vox = nt * nh * nw
    n_vid = tt * th * tw
    n = n_vid + text_len
    g = -(-n // 192)
    exp = np.zeros((g, n), bool)
    exp[:, n_vid:] = True
    if lv > 0 and n_vox > 0:
        for a in range(nt):
            for b in range(nh):
                for c in range(nw):
                    q = (a * nh + b) * nw + c
                    for i in _window_voxels(a, nt, lv):
                        for j in _window_voxels(b, nh, lv):
                            for k in _window_voxels(c, nw, lv):
                                v = (i * nh + j) * nw + k
                                exp[q, 192 * v : 192 * (v + 1)] = True
        exp[n_vox:, max(0, n - 192 * lv**3) :] = True  # "the last 192 * lv^3 columns", at most all
    if w1d > 0:
        half = w1d * n_vid / 2
        for gi in range(g):
            centre = 192 * gi + 96
            for j in range(n_vid):
                if abs(j - centre) <= half:
                    exp[gi, j] = True
    last = text_len // 192 + 1
    dense = (n // 128) * 128
    exp[g - last :, n - dense :] = True
    return exp


# grid (t, h, w) tokens; voxel grid is (t//4, h//6, w//8); tails where not divisible.
STATIC_CASES = [
    ((9, 25, 41), 200, 3),  # voxel grid 2 x 4 x 5 with tails in t, h and w
    ((8, 24, 40), 100, 1),  # Mochi-like window of one voxel
    ((4, 42, 48), 400, 5),  # Wan-like window on a 1 x 7 x 6 voxel grid
    ((8, 36, 16), 200, 0),  # no local window
]


@pytest.mark.parametrize("grid, text_len, lv", STATIC_CASES)
def test_static_video_mask_rules(grid, text_len, lv):
    heads = 2
    cfg = AttnConfig(top_keys=0.3, random_keys=0.0, local_voxels=lv)
    sm = static_video_mask(grid, text_len, heads, cfg)
    exp = _expected_static(grid, text_len, lv, 0.0)
    assert sm.mask.shape == (heads, *exp.shape) and sm.mask.dtype == np.bool_
    for hi in range(heads):
        np.testing.assert_array_equal(sm.mask[hi], exp)


def test_static_video_mask_has_no_spurious_voxel_zero_column():
    # SPEC §9: the reference makes every group attend voxel 0. Query voxel (1, 3, 4) of a 2 x 4 x 5 grid is far
    # from voxel 0 with a 3-voxel window, so columns [0, 192) must be off; likewise with no window at all.
    grid, text_len = (9, 25, 41), 200
    for lv, rows in ((3, [19, 39, 38, 14]), (0, range(40))):
        sm = static_video_mask(grid, text_len, 1, AttnConfig(top_keys=0.3, random_keys=0.0, local_voxels=lv))
        for q in rows:
            assert not sm.mask[0, q, :192].any(), (lv, q)
    # ...while voxel 0's own neighbours do attend it.
    sm = static_video_mask(grid, text_len, 1, AttnConfig(top_keys=0.3, random_keys=0.0, local_voxels=3))
    assert sm.mask[0, 0, :192].all() and sm.mask[0, 1, :192].all() and sm.mask[0, 6, :192].all()


def test_static_video_mask_last_text_groups_nearly_dense():
    grid, text_len = (8, 24, 40), 500  # floor(500/192) + 1 = 3 groups
    cfg = AttnConfig(top_keys=0.3, random_keys=0.0, local_voxels=1)
    sm = static_video_mask(grid, text_len, 1, cfg)
    n = 8 * 24 * 40 + text_len
    g = -(-n // 192)
    dense = (n // 128) * 128
    assert sm.mask[0, g - 3 :, n - dense :].all()
    assert not sm.mask[0, g - 3 :, : n - dense].any()
    assert not sm.mask[0, g - 4, : 8 * 24 * 40 - 192 * 1].all()  # the group before is not dense


@pytest.mark.parametrize("w1d", [0.1, 0.37])
def test_static_video_mask_1d_window(w1d):
    grid, text_len = (8, 24, 40), 300
    cfg = AttnConfig(top_keys=0.3, random_keys=0.0, local_1d_window=w1d)
    sm = static_video_mask(grid, text_len, 2, cfg)
    exp = _expected_static(grid, text_len, 0, w1d)
    np.testing.assert_array_equal(sm.mask[0], exp)
    np.testing.assert_array_equal(sm.mask[1], exp)


def test_static_video_mask_random_keys():
    grid, text_len, heads = (9, 25, 41), 450, 2
    cfg = AttnConfig(top_keys=0.3, random_keys=0.05, local_voxels=3)
    key = jax.random.key(11)
    sm = static_video_mask(grid, text_len, heads, cfg, rng=key)
    exp = _expected_static(grid, text_len, 3, 0.0)
    g = exp.shape[0]
    last = text_len // 192 + 1
    for hi in range(heads):
        assert (sm.mask[hi] | ~exp).all()
        np.testing.assert_array_equal(sm.mask[hi, g - last :], exp[g - last :])  # no random keys in text rows
    free = ~exp[: g - last]
    extra = sm.mask[:, : g - last] & free[None]
    rate = extra.sum() / (heads * free.sum())
    assert 0.045 < rate < 0.055, rate
    assert (extra[0] != extra[1]).any()  # per head
    again = static_video_mask(grid, text_len, heads, cfg, rng=key)
    np.testing.assert_array_equal(again.mask, sm.mask)
    other = static_video_mask(grid, text_len, heads, cfg, rng=jax.random.key(12))
    assert (other.mask != sm.mask).any()
    with pytest.raises(ValueError):
        static_video_mask(grid, text_len, heads, cfg)


@pytest.mark.parametrize("top_keys", [0.05, 0.3, 0.5])
def test_static_video_mask_sparse_group_rule(top_keys):
    grid, text_len = (9, 25, 41), 200
    n_vid = 9 * 25 * 41
    n = n_vid + text_len
    cfg = AttnConfig(top_keys=top_keys, random_keys=0.02, local_voxels=3)
    sm = static_video_mask(grid, text_len, 2, cfg, rng=jax.random.key(1))
    assert sm.sparse_group.shape == sm.mask.shape[:2] and sm.sparse_group.dtype == np.bool_
    count = sm.mask.sum(-1)
    np.testing.assert_array_equal(sm.sparse_group, count + int(np.floor(top_keys * n_vid)) < n)
    if top_keys == 0.5:
        assert sm.sparse_group.any() and not sm.sparse_group.all()


def test_static_video_mask_needs_voxel_groups():
    with pytest.raises(ValueError):
        static_video_mask((8, 24, 40), 100, 1, AttnConfig(random_keys=0.0), group=128)


# ---------------------------------------------------------------------------------------------------------------
# MLP selection (SPEC §2.2)


def _check_selection(score, keep_expected, idx, counts, multiple):
    f = score.shape[-1]
    idx, counts = np.asarray(idx), np.asarray(counts)
    for bi in range(score.shape[0]):
        for gi in range(score.shape[1]):
            sel = np.flatnonzero(keep_expected[bi, gi])
            unsel = np.flatnonzero(~keep_expected[bi, gi])
            np.testing.assert_array_equal(idx[bi, gi], np.concatenate([sel, unsel]))
            assert counts[bi, gi] == min(-(-sel.size // multiple) * multiple, f)


@pytest.mark.parametrize("f, top_keys", [(1000, 0.3), (1000, 0.9), (640, 0.25), (2048, 0.1)])
def test_mlp_select_exact_quantile(f, top_keys):
    cfg = MLPConfig(is_enabled=True, top_keys=top_keys, random_keys=0.0)
    score = _distinct_scores((2, 3, f), seed=f)
    thr = np.quantile(score.astype(np.float64), 1.0 - top_keys, axis=-1, method="linear", keepdims=True)
    keep = score >= thr
    idx, counts = mlp_select(jnp.asarray(score), cfg, jax.random.key(0))
    chex.assert_shape(idx, (2, 3, f))
    chex.assert_shape(counts, (2, 3))
    _check_selection(score, keep, idx, counts, 256)
    if top_keys == 0.9:
        assert (np.asarray(counts) == f).all()  # ~900 kept -> 1024 > F -> capped


def _split_selected(row):
    """(selected, filler) of an indices row laid out as [selected ascending ; unselected ascending]."""
    drops = np.flatnonzero(np.diff(row) < 0)
    assert drops.size == 1, drops
    p = int(drops[0]) + 1
    return row[:p], row[p:]


def test_mlp_select_random_keep():
    f, top_keys, rk = 4096, 0.3, 0.05
    cfg = MLPConfig(is_enabled=True, top_keys=top_keys, random_keys=rk)
    score = _distinct_scores((2, 4, f), seed=3)
    thr = np.quantile(score.astype(np.float64), 1.0 - top_keys, axis=-1, method="linear", keepdims=True)
    base = score >= thr
    key = jax.random.key(5)
    idx, counts = mlp_select(jnp.asarray(score), cfg, key)
    idx, counts = np.asarray(idx), np.asarray(counts)
    n_extra = 0
    for bi in range(2):
        for gi in range(4):
            sel, rest = _split_selected(idx[bi, gi])
            assert np.all(np.diff(rest) > 0)
            assert set(np.flatnonzero(base[bi, gi])) <= set(sel.tolist())  # quantile set always kept
            assert counts[bi, gi] == min(-(-sel.size // 256) * 256, f)
            n_extra += sel.size - int(base[bi, gi].sum())
    rate = n_extra / (~base).sum()
    assert rk - 0.01 < rate < rk + 0.01, rate  # ~23k others at 5%: 4 sigma ~ 0.006
    idx2, counts2 = mlp_select(jnp.asarray(score), cfg, key)
    np.testing.assert_array_equal(np.asarray(idx2), idx)
    np.testing.assert_array_equal(np.asarray(counts2), counts)
    idx3, _ = mlp_select(jnp.asarray(score), cfg, jax.random.key(6))
    assert (np.asarray(idx3) != idx).any()


# ---------------------------------------------------------------------------------------------------------------
# Block mean


def test_block_mean():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 384, 5)).astype(np.float32)
    want = np.zeros((2, 3, 5), np.float64)
    for b in range(2):
        for g in range(3):
            want[b, g] = x[b, 128 * g : 128 * (g + 1)].astype(np.float64).mean(axis=0)
    got = block_mean(jnp.asarray(x), 128)
    assert got.dtype == jnp.float32 and got.shape == (2, 3, 5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(block_mean(jnp.asarray(x), 128, n_valid=384)), want, rtol=1e-5, atol=1e-6)

    # n_valid = 300: the last block averages its 44 valid rows only.
    want_v = want.copy()
    for b in range(2):
        want_v[b, 2] = x[b, 256:300].astype(np.float64).mean(axis=0)
    got_v = block_mean(jnp.asarray(x), 128, n_valid=300)
    np.testing.assert_allclose(np.asarray(got_v), want_v, rtol=1e-5, atol=1e-6)

    xb = jnp.asarray(x).astype(jnp.bfloat16)
    assert block_mean(xb, 128).dtype == jnp.float32


# ---------------------------------------------------------------------------------------------------------------
# Per-(step, layer) randomness


def test_layer_rng_distinct_and_reproducible():
    key = jax.random.key(42)
    draws = {}
    for step in range(4):
        for layer in range(4):
            draws[(step, layer)] = np.asarray(jax.random.uniform(layer_rng(key, step, layer), (8,)))
    values = [tuple(v.tolist()) for v in draws.values()]
    assert len(set(values)) == len(values)  # every (step, layer) differs
    again = np.asarray(jax.random.uniform(layer_rng(jax.random.key(42), 2, 3), (8,)))
    np.testing.assert_array_equal(again, draws[(2, 3)])
    # Traced step / layer give the same key as Python ints.
    traced = jax.jit(lambda s, layer: jax.random.uniform(layer_rng(key, s, layer), (8,)))(jnp.int32(2), jnp.int32(3))
    np.testing.assert_array_equal(np.asarray(traced), draws[(2, 3)])
    other = np.asarray(jax.random.uniform(layer_rng(jax.random.key(43), 2, 3), (8,)))
    assert (other != draws[(2, 3)]).any()


def test_static_mask_is_plain_data():
    sm = static_video_mask((4, 6, 8), 10, 1, AttnConfig(random_keys=0.0, local_voxels=1))
    assert dataclasses.is_dataclass(sm) and isinstance(sm.mask, np.ndarray)
