"""One shared suite per attention op, run against every implementation (reference, xla, Mosaic GPU interpret).

Every case draws fresh random q/k/v, selections, counts and normalisers; the float64 NumPy oracles in
``oracles.py`` are the ground truth. Interpret-mode shapes are tiny (CPU simulation of every warpgroup) but still
cover N not a multiple of the group, Nk not a multiple of the KV tile, masked slots and both group sizes.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import api
from tests.pallas_kernels import oracles
from tests.pallas_kernels.common import (
    INTERPRET,
    assert_close,
    counts_below,
    implementations,
    normal,
    product,
    require,
    selection,
    tolerance,
)

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
D = 128

# (B, H, N, Nk, group, dtype)
DENSE_SMALL = product(shape=((1, 2, 130, 130), (2, 1, 256, 200)), group=(128, 192), dtype=("f32", "bf16"))
DENSE_SMALL = [(*shape, g, dt) for shape, g, dt in DENSE_SMALL]
# Interpret mode is slow (every warpgroup simulated on CPU): one case per op here; the race-detector tests below
# add group 128 for every op.
DENSE_INTERPRET = [(1, 1, 130, 150, 192, "f32")]
COLSUM_INTERPRET = [(1, 1, 200, 200, 128, "bf16")]

# (B, H, N, Nk, group, K capacity, dtype)
SPARSE_SMALL = [
    (b, h, n, nk, g, kcap, dt)
    for (b, h, n, nk, kcap), g, dt in product(
        shape=((1, 2, 130, 130, 100), (2, 1, 256, 300, 224)), group=(128, 192), dtype=("f32", "bf16")
    )
]
SPARSE_INTERPRET = [(1, 1, 130, 256, 192, 130, "f32")]


def _case_key(case) -> jax.Array:
    return jax.random.key(zlib.crc32(repr(case).encode()))


def _qkv(key, b, h, n, nk, dtype):
    kq, kk, kv = jax.random.split(key, 3)
    return normal(kq, (b, h, n, D), dtype), normal(kk, (b, h, nk, D), dtype), normal(kv, (b, h, nk, D), dtype)


@pytest.mark.parametrize(("implementation", "case"), implementations("dense_attention", DENSE_SMALL, DENSE_INTERPRET))
def test_dense_attention(implementation, case, fresh_interpreter):
    require("dense_attention", implementation)
    b, h, n, nk, group, dt = case
    q, k, v = _qkv(_case_key(case), b, h, n, nk, DTYPES[dt])
    o, lse = api.dense_attention(q, k, v, group=group, implementation=implementation)
    ref_o, ref_lse = oracles.dense_attention(q, k, v)
    assert o.dtype == q.dtype and lse.dtype == jnp.float32
    tol = tolerance(implementation, DTYPES[dt], nk)
    assert_close(o, ref_o, tol, "o")
    assert_close(lse, ref_lse, tol, "lse")


@pytest.mark.parametrize(
    ("implementation", "case"), implementations("dense_attention_colsum", DENSE_SMALL, COLSUM_INTERPRET)
)
def test_dense_attention_colsum(implementation, case, fresh_interpreter):
    require("dense_attention_colsum", implementation)
    b, h, n, nk, group, dt = case
    key, knoise = jax.random.split(_case_key(case))
    q, k, v = _qkv(key, b, h, n, nk, DTYPES[dt])
    ref_o, ref_lse = oracles.dense_attention(q, k, v)
    # An earlier step's normaliser: near this one, but not equal.
    prev = jnp.asarray(ref_lse, jnp.float32) + 0.5 * jax.random.normal(knoise, (b, h, n), jnp.float32)
    o, lse, cs = api.dense_attention_colsum(q, k, v, prev, group=group, implementation=implementation)
    ref_cs = oracles.column_sums(q, k, prev, group)
    tol = tolerance(implementation, DTYPES[dt], nk)
    assert_close(o, ref_o, tol, "o")
    assert_close(lse, ref_lse, tol, "lse")
    scale = float(np.max(np.abs(ref_cs)))
    assert_close(cs / scale, ref_cs / scale, tolerance(implementation, DTYPES[dt], group), "cs (relative to max)")


@pytest.mark.parametrize(
    ("implementation", "case"), implementations("sparse_attention", SPARSE_SMALL, SPARSE_INTERPRET)
)
def test_sparse_attention(implementation, case, fresh_interpreter):
    require("sparse_attention", implementation)
    b, h, n, nk, group, kcap, dt = case
    key, ksel, kcnt = jax.random.split(_case_key(case), 3)
    q, k, v = _qkv(key, b, h, n, nk, DTYPES[dt])
    g = -(-n // group)
    idx = selection(ksel, (b, h, g), nk, kcap)
    counts = counts_below(kcnt, (b, h, g), kcap)
    o = api.sparse_attention(q, k, v, idx, counts, group=group, implementation=implementation)
    assert o.dtype == q.dtype
    assert_close(
        o, oracles.sparse_attention(q, k, v, idx, counts, group), tolerance(implementation, DTYPES[dt], kcap), "o"
    )


@pytest.mark.parametrize(
    ("implementation", "case"),
    implementations(
        "sparse_attention", [(1, 2, 200, 128, "f32"), (2, 1, 130, 192, "bf16")], [(1, 1, 130, 192, "bf16")]
    ),
)
def test_sparse_all_selected_equals_dense(implementation, case, fresh_interpreter):
    require("sparse_attention", implementation)
    b, h, n, group, dt = case
    key, kperm = jax.random.split(_case_key(case))
    q, k, v = _qkv(key, b, h, n, n, DTYPES[dt])
    g = -(-n // group)
    idx = selection(kperm, (b, h, g), n, n)  # every key, in a random order
    counts = jnp.full((b, h, g), n, jnp.int32)
    o = api.sparse_attention(q, k, v, idx, counts, group=group, implementation=implementation)
    assert_close(o, oracles.dense_attention(q, k, v)[0], tolerance(implementation, DTYPES[dt], n), "o")


# --- Mosaic GPU kernel-level cases: other gathers, empty groups, the race detector. ---


def _mosaic():
    require("sparse_attention", INTERPRET)
    from pallas_kernels.attention import mosaic_gpu

    return mosaic_gpu


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("gather", ["pregathered", "rows_direct"])
def test_sparse_gathers_and_empty_group(gather, fresh_interpreter):
    mg = _mosaic()
    b, h, n, nk, kcap = 1, 1, 200, 180, 100
    key, ksel, kcnt = jax.random.split(jax.random.key(len(gather)), 3)
    q, k, v = _qkv(key, b, h, n, nk, jnp.bfloat16)
    idx = selection(ksel, (b, h, 2), nk, kcap)
    counts = jnp.stack([jnp.int32(0), jax.random.randint(kcnt, (), 1, kcap, jnp.int32)]).reshape(1, 1, 2)
    cfg = mg.TuningConfig(num_compute_wgs=2, gather=gather, consumer_regs=232, producer_regs=40)
    o = mg.sparse_attention(q, k, v, idx, counts, config=cfg, interpret=True)
    ref = oracles.sparse_attention(q, k, v, idx, counts, 128)
    assert_close(o, ref, tolerance(INTERPRET, jnp.bfloat16, kcap), "o")
    assert np.all(np.asarray(o[:, :, :128], np.float32) == 0.0), "a group with count 0 must give zeros"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("op", ["dense", "colsum", "sparse"])
def test_race_detector_finds_no_race(op, fresh_interpreter):
    mg = _mosaic()
    b, h, n = 1, 1, 100
    key, kx, ky = jax.random.split(jax.random.key(7 + len(op)), 3)
    q, k, v = _qkv(key, b, h, n, n, jnp.bfloat16)
    cfg = mg.TuningConfig(num_compute_wgs=2, block_kv=64, consumer_regs=232, producer_regs=40)
    if op == "dense":
        o, _ = mg.dense_attention(q, k, v, config=cfg, interpret=True, detect_races=True)
        ref = oracles.dense_attention(q, k, v)[0]
    elif op == "colsum":
        prev = 3.0 + jax.random.normal(kx, (b, h, n), jnp.float32)
        o, _, cs = mg.dense_attention_colsum(q, k, v, prev, config=cfg, interpret=True, detect_races=True)
        ref = oracles.dense_attention(q, k, v)[0]
        ref_cs = oracles.column_sums(q, k, prev, 128)
        assert_close(cs / ref_cs.max(), ref_cs / ref_cs.max(), tolerance(INTERPRET, jnp.bfloat16, 128), "cs")
    else:
        idx = selection(kx, (b, h, 1), n, 90)
        counts = jax.random.randint(ky, (b, h, 1), 65, 90, jnp.int32)
        o = mg.sparse_attention(q, k, v, idx, counts, config=cfg, interpret=True, detect_races=True)
        ref = oracles.sparse_attention(q, k, v, idx, counts, 128)
    assert_close(o, ref, tolerance(INTERPRET, jnp.bfloat16, n), "o")
    assert fresh_interpreter.get_races().races_found is False


@pytest.mark.timeout(60)
def test_mosaic_entry_points_check_shapes():
    mg = _mosaic()
    q = jnp.zeros((1, 1, 64, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="head dim 128"):
        mg.dense_attention(q, q, q, interpret=True)
    q = jnp.zeros((1, 1, 64, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="indices"):
        mg.sparse_attention(q, q, q, jnp.zeros((1, 1, 2, 8), jnp.int32), jnp.zeros((1, 1, 2), jnp.int32))
    with pytest.raises(ValueError, match="128 or 192"):
        mg.default_config(256, sparse=True)
    with pytest.raises(ValueError, match="block_kv"):
        mg.TuningConfig(block_kv=96)
    with pytest.raises(ValueError, match="register"):
        mg.TuningConfig(num_compute_wgs=3, consumer_regs=232, producer_regs=40)
    with pytest.raises(ValueError, match="interpret"):
        mg.sparse_attention(
            q,
            q,
            q,
            jnp.zeros((1, 1, 1, 8), jnp.int32),
            jnp.zeros((1, 1, 1), jnp.int32),
            config=mg.TuningConfig(gather="rows_direct"),
        )
