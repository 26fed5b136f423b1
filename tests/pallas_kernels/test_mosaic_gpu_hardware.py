"""Real execution of the Mosaic GPU kernels on a Hopper GPU, against the XLA implementations.

Skipped (and reported as skipped) on any machine without an sm_90 device. Shapes are mid-sized so that many
CTAs, several KV steps, partial tiles and masked slots all occur; inputs are random and outputs are compared to
the portable 'xla' implementation run on upcast inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import registry
from pallas_kernels.attention import api as attn_api
from pallas_kernels.mlp import api as mlp_api
from tests.pallas_kernels.common import counts_below, normal, selection


def _on_hopper() -> bool:
    try:
        dev = jax.devices("gpu")[0]
    except RuntimeError:
        return False
    return getattr(dev, "compute_capability", "") in ("9.0", "9.0a")


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper (sm_90) GPU"),
]


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _qkv(seed, b, h, n, nk):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (
        normal(ks[0], (b, h, n, 128), jnp.bfloat16),
        normal(ks[1], (b, h, nk, 128), jnp.bfloat16),
        normal(ks[2], (b, h, nk, 128), jnp.bfloat16),
    )


@pytest.mark.parametrize("group", [128, 192])
def test_dense_and_colsum_on_gpu(group):
    assert "mosaic_gpu" in registry.available("dense_attention")
    q, k, v = _qkv(group, 2, 3, 1000, 1100)
    o, lse = attn_api.dense_attention(q, k, v, group=group, implementation="mosaic_gpu")
    ro, rl = attn_api.dense_attention(*(x.astype(jnp.float32) for x in (q, k, v)), group=group, implementation="xla")
    assert _rel_err(o, ro) < 1e-2 and _rel_err(lse, rl) < 1e-3
    prev = rl + 0.3
    o, lse, cs = attn_api.dense_attention_colsum(q, k, v, prev, group=group, implementation="mosaic_gpu")
    _, _, rcs = attn_api.dense_attention_colsum(
        *(x.astype(jnp.float32) for x in (q, k, v)), prev, group=group, implementation="xla"
    )
    assert _rel_err(cs, rcs) < 1e-2


@pytest.mark.parametrize("group", [128, 192])
def test_sparse_on_gpu(group):
    b, h, n, nk, kcap = 2, 3, 1000, 1500, 448
    q, k, v = _qkv(group + 1, b, h, n, nk)
    g = -(-n // group)
    ks = jax.random.split(jax.random.key(group), 2)
    idx = selection(ks[0], (b, h, g), nk, kcap)
    counts = counts_below(ks[1], (b, h, g), kcap)
    o = attn_api.sparse_attention(q, k, v, idx, counts, group=group, implementation="mosaic_gpu")
    ref = attn_api.sparse_attention(
        *(x.astype(jnp.float32) for x in (q, k, v)), idx, counts, group=group, implementation="xla"
    )
    assert _rel_err(o, ref) < 1e-2


def test_sparse_mlp_on_gpu():
    b, n, c, f, kcap = 1, 1024, 768, 3072, 1024
    ks = jax.random.split(jax.random.key(3), 8)
    x = normal(ks[0], (b, n, c), jnp.bfloat16)
    w1 = normal(ks[1], (f, c), jnp.bfloat16, scale=c**-0.5)
    b1 = normal(ks[2], (f,), jnp.float32, scale=0.3)
    w2 = normal(ks[3], (f, c), jnp.bfloat16, scale=f**-0.5)
    idx = selection(ks[4], (b, n // 128), f, kcap)
    counts = counts_below(ks[5], (b, n // 128), kcap)
    act = normal(ks[6], (b, n, f), jnp.float32, scale=0.5)
    out = normal(ks[7], (b, n, c), jnp.float32)
    args = (x, w1, b1, w2, idx, counts, act, out)
    new_out, new_act = mlp_api.sparse_mlp_delta(*args, implementation="mosaic_gpu")
    ref_out, ref_act = mlp_api.sparse_mlp_delta(*args, implementation="xla")
    assert _rel_err(new_out, ref_out) < 1e-2 and _rel_err(new_act, ref_act) < 1e-2
