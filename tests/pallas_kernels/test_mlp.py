"""Shared suite of the column-sparse MLP delta, run against every implementation (reference, xla, interpret).

All parameters are random (x, both weights, bias, cached activations and outputs, selections, counts);
the float64 oracle in ``oracles.py`` is the ground truth.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mlp import api
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

# (B, N, C, F, K capacity, block, dtype)
SMALL = [
    (*shape, block, dt)
    for shape, block, dt in product(
        shape=((1, 256, 128, 320, 100), (2, 128, 192, 256, 256)), block=(64, 128), dtype=("f32", "bf16")
    )
]
INTERPRET_CASES = [(1, 256, 128, 192, 100, 128, "bf16")]


def _inputs(case):
    b, n, c, f, kcap, block, dt = case
    dtype = DTYPES[dt]
    ks = jax.random.split(jax.random.key(zlib.crc32(repr(case).encode())), 9)
    g = n // block
    x = normal(ks[0], (b, n, c), dtype)
    w1 = normal(ks[1], (f, c), dtype, scale=c**-0.5)
    b1 = normal(ks[2], (f,), jnp.float32, scale=0.3)
    w2 = normal(ks[3], (f, c), dtype, scale=f**-0.5)
    idx = selection(ks[4], (b, g), f, kcap)
    counts = counts_below(ks[5], (b, g), kcap)
    act = normal(ks[6], (b, n, f), dtype, scale=0.5)
    out = normal(ks[7], (b, n, c), dtype)
    return x, w1, b1, w2, idx, counts, act, out


def _check(implementation, case, new_out, new_act, inputs):
    b, n, c, f, kcap, block, dt = case
    ref_out, ref_act = oracles.sparse_mlp_delta(*inputs, block=block)
    act, out = inputs[6], inputs[7]
    assert new_out.dtype == out.dtype and new_act.dtype == act.dtype
    # new out chains two reductions (over C in mm1, over the selected neurons in mm2); new act only the first.
    assert_close(new_out, ref_out, tolerance(implementation, DTYPES[dt], kcap + c), "out")
    assert_close(new_act, ref_act, tolerance(implementation, DTYPES[dt], c), "act")
    # Unselected neurons keep their cached activation exactly.
    member = np.zeros((b, n // block, f), bool)
    for bi in range(b):
        for gi in range(n // block):
            member[bi, gi, np.asarray(inputs[4])[bi, gi, : int(inputs[5][bi, gi])]] = True
    untouched = ~np.repeat(member, block, axis=1)
    np.testing.assert_array_equal(np.asarray(new_act, np.float32)[untouched], np.asarray(act, np.float32)[untouched])


@pytest.mark.parametrize(("implementation", "case"), implementations("sparse_mlp_delta", SMALL, INTERPRET_CASES))
def test_sparse_mlp_delta(implementation, case, fresh_interpreter):
    require("sparse_mlp_delta", implementation)
    inputs = _inputs(case)
    new_out, new_act = api.sparse_mlp_delta(*inputs, block=case[5], implementation=implementation)
    _check(implementation, case, new_out, new_act, inputs)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mosaic_mlp_race_detector_and_direct_gather(fresh_interpreter):
    require("sparse_mlp_delta", INTERPRET)
    from pallas_kernels.mlp import mosaic_gpu

    case = (1, 128, 64, 160, 64, 128, "f32")
    inputs = _inputs(case)
    cfg = mosaic_gpu.TuningConfig(block_n=64, block_out=64, gather="rows_direct")
    new_out, new_act = mosaic_gpu.sparse_mlp_delta(*inputs, block=128, config=cfg, interpret=True, detect_races=True)
    _check(INTERPRET, case, new_out, new_act, inputs)
    assert fresh_interpreter.get_races().races_found is False


@pytest.mark.timeout(60)
def test_mosaic_mlp_checks():
    require("sparse_mlp_delta", INTERPRET)
    from pallas_kernels.mlp import mosaic_gpu

    with pytest.raises(ValueError, match="block_c"):
        mosaic_gpu.TuningConfig(block_c=48)
    with pytest.raises(ValueError, match="gather"):
        mosaic_gpu.TuningConfig(gather="cp_async")
    inputs = _inputs((1, 128, 96, 128, 64, 128, "bf16"))
    with pytest.raises(ValueError, match="multiple of"):
        mosaic_gpu.sparse_mlp_delta(*inputs, block=128, interpret=True)
    inputs = _inputs((1, 128, 128, 128, 64, 128, "bf16"))
    with pytest.raises(ValueError, match="block"):
        mosaic_gpu.sparse_mlp_delta(*inputs, block=32, interpret=True)
