"""Runs every Mosaic GPU kernel once at a small shape and compares it with the XLA implementation.

Meant for tools that watch one short process, e.g. NVIDIA compute-sanitizer:

  compute-sanitizer --tool memcheck python3 -m pallas_kernels.smoke
  compute-sanitizer --tool racecheck python3 -m pallas_kernels.smoke --only sparse_attention

Exits non-zero when a kernel's relative error exceeds 1e-2. Needs a Hopper GPU.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention import api as attn_api
from pallas_kernels.mlp import api as mlp_api

OPS = ("dense_attention", "dense_attention_colsum", "sparse_attention", "sparse_mlp_delta")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _normal(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def run(op: str, seed: int = 0) -> float:
    """Runs one op on mosaic_gpu and xla; returns the largest relative error over its outputs."""
    ks = jax.random.split(jax.random.key(seed), 8)
    bf = jnp.bfloat16
    if op == "sparse_mlp_delta":
        b, n, c, f, kcap = 1, 256, 256, 1024, 256
        x = _normal(ks[0], (b, n, c), bf)
        w1, w2 = _normal(ks[1], (f, c), bf, c**-0.5), _normal(ks[2], (f, c), bf, f**-0.5)
        b1 = _normal(ks[3], (f,), jnp.float32, 0.3)
        idx = jnp.argsort(jax.random.uniform(ks[4], (b, n // 128, f)), axis=-1)[..., :kcap].astype(jnp.int32)
        counts = jax.random.randint(ks[5], (b, n // 128), kcap // 2, kcap + 1)
        act, out = _normal(ks[6], (b, n, f), jnp.float32, 0.5), _normal(ks[7], (b, n, c), jnp.float32)
        args = (x, w1, b1, w2, idx, counts, act, out)
        got = mlp_api.sparse_mlp_delta(*args, implementation="mosaic_gpu")
        ref = mlp_api.sparse_mlp_delta(*args, implementation="xla")
        return max(_rel(g, r) for g, r in zip(got, ref, strict=True))
    b, h, n, nk, group = 1, 2, 400, 520, 192
    q, k, v = (_normal(ks[i], (b, h, n if i == 0 else nk, 128), bf) for i in range(3))
    up = tuple(a.astype(jnp.float32) for a in (q, k, v))
    if op == "dense_attention":
        got = attn_api.dense_attention(q, k, v, group=group, implementation="mosaic_gpu")
        ref = attn_api.dense_attention(*up, group=group, implementation="xla")
    elif op == "dense_attention_colsum":
        prev = attn_api.dense_attention(*up, group=group, implementation="xla")[1] + 0.3
        got = attn_api.dense_attention_colsum(q, k, v, prev, group=group, implementation="mosaic_gpu")
        ref = attn_api.dense_attention_colsum(*up, prev, group=group, implementation="xla")
    else:
        g, kcap = -(-n // group), 192
        idx = jnp.argsort(jax.random.uniform(ks[3], (b, h, g, nk)), axis=-1)[..., :kcap].astype(jnp.int32)
        counts = jax.random.randint(ks[4], (b, h, g), 1, kcap + 1)
        got = (attn_api.sparse_attention(q, k, v, idx, counts, group=group, implementation="mosaic_gpu"),)
        ref = (attn_api.sparse_attention(*up, idx, counts, group=group, implementation="xla"),)
    return max(_rel(g, r) for g, r in zip(got, ref, strict=True))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pallas_kernels.smoke",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", choices=OPS, action="append", help="run only this op (repeatable)")
    a = p.parse_args(argv)
    worst = 0.0
    for op in a.only or OPS:
        err = run(op)
        worst = max(worst, err)
        print(f"{op:<24} relative error vs xla: {err:.2e}", flush=True)
    return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
