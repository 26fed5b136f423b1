"""One Flux-sized layer on the CPU: dense step vs Chipmunk sparse step, measured side by side in one run.

Shapes default to FLUX.1-dev at 1280x768 (N = 512 text + 3840 image = 4352 tokens, 24 heads x 128,
C = 3072, F = 12288) with the Flux preset (attention top_keys 0.165 -> 672 of 4352 keys per query group;
MLP top_keys 0.3 + 5% random neurons). Caches come from real warm-up/full/mask steps on random inputs, so the
sparse steps run the selection sizes a generation would. float32 on the CPU (bf16 matmuls are emulated there).

Example:
  python -m benchmarks.cpu_sparse_vs_dense            # full Flux layer, ~3 minutes on 2 cores
  python -m benchmarks.cpu_sparse_vs_dense --quick    # quarter-size shapes, seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import chipmunk_jax as cj
from chipmunk_jax.schedules import AttnKind, MLPKind


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(
    n: int, heads: int, head_dim: int, width: int, hidden: int, repeats: int, backend: str, dtype=jnp.float32
) -> dict[str, float]:
    """Times dense and sparse attention/MLP steps for one layer; returns seconds per step by name."""
    cfg = cj.preset("flux")
    f32 = dtype
    keys = jax.random.split(jax.random.key(0), 12)
    q0, k0, v0 = (jax.random.normal(keys[i], (1, heads, n, head_dim), f32) for i in range(3))
    q1, k1, v1 = (a + 0.1 * jax.random.normal(keys[3 + i], a.shape, f32) for i, a in enumerate((q0, k0, v0)))
    x0 = jax.random.normal(keys[6], (1, n, width), f32)
    x1 = x0 + 0.1 * jax.random.normal(keys[7], x0.shape, f32)
    w1 = jax.random.normal(keys[8], (hidden, width), f32) / width**0.5
    w2 = jax.random.normal(keys[9], (hidden, width), f32) / hidden**0.5
    b1 = 0.1 * jax.random.normal(keys[10], (hidden,), f32)
    b2 = 0.1 * jax.random.normal(keys[11], (width,), f32)

    # Weights are arguments, never closed-over constants (XLA would constant-fold them).
    wts = (w1, b1, w2, b2)
    attn = jax.jit(
        lambda q, k, v, c, kind: cj.sparse_attention(q, k, v, c, kind=kind, config=cfg, backend=backend),
        static_argnames="kind",
    )
    mlp = jax.jit(
        lambda x, w, c, r, kind: cj.sparse_mlp(x, *w, c, kind=kind, config=cfg, backend=backend, rng=r),
        static_argnames="kind",
    )
    # Real caches: warm-up at step 0 and the mask step at step 1 (attention); full then a selection (MLP).
    ac = cj.init_attention_cache(cfg.attn, batch=1, heads=heads, seq_len=n, head_dim=head_dim, dtype=f32)
    _, ac = attn(q0, k0, v0, ac, kind=AttnKind.WARMUP)
    _, ac = attn(q1, k1, v1, ac, kind=AttnKind.MASK)
    mc = cj.init_mlp_cache(cfg.mlp, batch=1, seq_len=n, width=width, hidden=hidden, dtype=f32)
    _, mc = mlp(x0, wts, mc, jax.random.key(0), kind=MLPKind.FULL)
    _, mc_sel = mlp(x1, wts, mc, jax.random.key(1), kind=MLPKind.SPARSE_RECOMPUTE)
    r2 = jax.random.key(2)

    dense_attn = jax.jit(lambda q, k, v: cj.dense_attention(q, k, v, backend=backend))
    dense_mlp = jax.jit(lambda x, w: cj.dense_mlp(x, *w))
    both_dense = jax.jit(lambda q, k, v, x, w: (dense_attn(q, k, v), dense_mlp(x, w)))
    both_sparse = jax.jit(
        lambda q, k, v, x, w, a, m, r: (
            attn(q, k, v, a, kind=AttnKind.SPARSE)[0],
            mlp(x, w, m, r, kind=MLPKind.SPARSE_RECOMPUTE)[0],
        )
    )
    t = {
        "attn_dense": _time(dense_attn, q1, k1, v1, repeats=repeats),
        "attn_sparse": _time(lambda *a: attn(*a, kind=AttnKind.SPARSE)[0], q1, k1, v1, ac, repeats=repeats),
        "attn_mask_step": _time(lambda *a: attn(*a, kind=AttnKind.MASK)[0], q1, k1, v1, ac, repeats=repeats),
        "mlp_dense": _time(dense_mlp, x1, wts, repeats=repeats),
        "mlp_sparse_recompute": _time(
            lambda *a: mlp(*a, kind=MLPKind.SPARSE_RECOMPUTE)[0], x1, wts, mc, r2, repeats=repeats
        ),
        "mlp_sparse_reuse": _time(
            lambda *a: mlp(*a, kind=MLPKind.SPARSE_REUSE)[0], x1, wts, mc_sel, r2, repeats=repeats
        ),
        "layer_dense": _time(both_dense, q1, k1, v1, x1, wts, repeats=repeats),
        "layer_sparse": _time(both_sparse, q1, k1, v1, x1, wts, ac, mc, r2, repeats=repeats),
    }
    if jax.devices()[0].platform == "gpu":
        # The production dense baseline on a GPU: cuDNN flash attention in the [B, N, H, D] layout.
        def cudnn(q, k, v):
            with jax.numpy_dtype_promotion("standard"):
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")

        qt, kt, vt = (jnp.swapaxes(a, 1, 2).astype(jnp.bfloat16) for a in (q1, k1, v1))
        t["attn_cudnn"] = _time(jax.jit(cudnn), qt, kt, vt, repeats=repeats)
    kept_keys = int(ac.counts[0, 0, 0])
    kept_neurons = float(mc_sel.counts.mean())
    t["attn_density"] = kept_keys / n
    t["mlp_density"] = kept_neurons / hidden
    return t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4352, help="tokens (text + image); default Flux 1280x768")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--width", type=int, default=3072, help="model width C")
    p.add_argument("--hidden", type=int, default=12288, help="MLP hidden width F")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median reported)")
    p.add_argument("--backend", default="xla", choices=["xla", "reference", "auto", "mosaic_gpu"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="inputs, weights and caches")
    p.add_argument("--quick", action="store_true", help="quarter-size shapes (N 1088, 6 heads, C 768, F 3072)")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.heads, a.width, a.hidden = 1088, 6, 768, 3072
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; backend {a.backend}; {a.dtype}; "
        f"N={a.n}, heads={a.heads}x{a.head_dim}, C={a.width}, F={a.hidden}; Flux preset; median of {a.repeats}"
    )
    t = run(a.n, a.heads, a.head_dim, a.width, a.hidden, a.repeats, a.backend, jnp.dtype(a.dtype))
    print(f"selected: {100 * t['attn_density']:.1f}% of keys per query group, {100 * t['mlp_density']:.1f}% of neurons")
    rows = [
        ("attention", "attn_dense", "attn_sparse"),
        ("attention (mask step, for scale)", "attn_dense", "attn_mask_step"),
        ("MLP (sparse step, reselect neurons)", "mlp_dense", "mlp_sparse_recompute"),
        ("MLP (sparse step, reuse neurons)", "mlp_dense", "mlp_sparse_reuse"),
        ("attention + MLP (reselect)", "layer_dense", "layer_sparse"),
    ]
    print(f"{'':38s} {'dense ms':>10s} {'chipmunk ms':>12s} {'speed-up':>9s}")
    for name, d, s in rows:
        print(f"{name:38s} {1e3 * t[d]:10.2f} {1e3 * t[s]:12.2f} {t[d] / t[s]:8.2f}x")
    if "attn_cudnn" in t:
        print(
            f"{'attention vs cuDNN (bf16, [B, N, H, D])':38s} {1e3 * t['attn_cudnn']:10.2f} "
            f"{1e3 * t['attn_sparse']:12.2f} {t['attn_cudnn'] / t['attn_sparse']:8.2f}x"
        )


if __name__ == "__main__":
    main()
