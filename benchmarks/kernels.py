"""Side-by-side timings of the Mosaic GPU kernels against cuDNN / XLA at production shapes.

Usage:
  python -m benchmarks.kernels                      # every model shape, attention and MLP
  python -m benchmarks.kernels --models flux --reps 20
  python -m benchmarks.kernels --only mlp
  python -m benchmarks.kernels --lower-only         # on any machine: every variant cross-lowers for CUDA
  python -m benchmarks.kernels --tune --models flux wan1.3b   # sweep TuningConfigs, write the tuned table

Attention (B = 1, 24 or 12 heads x 128): dense cuDNN (jax.nn.dot_product_attention), our dense kernel
(o + lse), and our column-sparse kernel at 93% and 83.5% sparsity (kept keys rounded up to 128 per query group),
all in one run so the ratios compare like with like. MLP: the column-sparse delta at 70% sparsity against the
dense XLA MLP (C 3072, F 12288, N 4352). TFLOP/s counts only the selected work (4 N K D per head for attention,
2 x 2 N K C for the MLP). Times are medians over ``--reps`` runs after warm-up, each ending in
block_until_ready, rotating over two input sets. Without a Hopper GPU the script runs a tiny interpret-mode
correctness check, says that timings need a GPU, and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

# (heads, tokens) per model: Hunyuan 720p 129 frames, Flux 1024x1024 with 256 text tokens, Wan2.1-1.3B 480p 81 frames.
MODELS = {"hunyuan": (24, 118_800), "flux": (24, 4352), "wan1.3b": (12, 32_760)}
SPARSITIES = (0.93, 0.835)
MLP_SHAPE = dict(n=4352, c=3072, f=12288, sparsity=0.70)


def _on_hopper() -> bool:
    try:
        dev = jax.devices("gpu")[0]
    except RuntimeError:
        return False
    return getattr(dev, "compute_capability", "") in ("9.0", "9.0a")


def _time(fn, arg_sets, reps: int, warmup: int = 3) -> float:
    """Median wall time (s) of fn(*args), rotating over arg_sets, each call synchronised."""
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    times = []
    for i in range(reps):
        args = arg_sets[i % len(arg_sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _strided_selection(key, h: int, g: int, n: int, k: int) -> jax.Array:
    """Duplicate-free scattered key lists [1, H, G, K]: a random start and a fixed stride per group."""
    stride = max(1, n // k)
    start = jax.random.randint(key, (1, h, g, 1), 0, n, jnp.int32)
    return ((start + stride * jnp.arange(k, dtype=jnp.int32)[None, None, None, :]) % n).astype(jnp.int32)


class _Inputs:
    """Random device arrays, or (``abstract``) ShapeDtypeStructs for cross-lowering without allocating."""

    def __init__(self, seed: int, abstract: bool):
        self.key, self.abstract = jax.random.key(seed), abstract

    def _next(self):
        self.key, sub = jax.random.split(self.key)
        return sub

    def normal(self, shape, dtype=jnp.bfloat16, scale=1.0):
        if self.abstract:
            return jax.ShapeDtypeStruct(shape, dtype)
        return (scale * jax.random.normal(self._next(), shape, jnp.float32)).astype(dtype)

    def derived(self, fn, shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype) if self.abstract else fn(self._next())


def attention_variants(model: str, abstract: bool):
    """(label, jitted fn, two argument sets, flops of selected work) for one model's attention shape."""
    from pallas_kernels.attention import mosaic_gpu as mg

    h, n = MODELS[model]
    d, group = 128, 192
    g = -(-n // group)
    inp = _Inputs(0, abstract)
    sets = [tuple(inp.normal((1, h, n, d)) for _ in range(3)) for _ in range(2)]
    cudnn_sets = [tuple(inp.normal((1, n, h, d)) for _ in range(3)) for _ in range(2)]  # [B, N, H, D]
    dense_flops = 4.0 * h * n * n * d
    variants = [
        (
            "dense cuDNN",
            jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")),
            cudnn_sets,
            dense_flops,
        ),
        ("dense mosaic_gpu", jax.jit(lambda q, k, v: mg.dense_attention(q, k, v)), sets, dense_flops),
    ]
    sparse = jax.jit(lambda q, k, v, idx, counts: mg.sparse_attention(q, k, v, idx, counts))
    for sp in SPARSITIES:
        kept = -(-round((1.0 - sp) * n) // 128) * 128
        idx = inp.derived(lambda key, kept=kept: _strided_selection(key, h, g, n, kept), (1, h, g, kept))
        counts = inp.derived(lambda key, kept=kept: jnp.full((1, h, g), kept, jnp.int32), (1, h, g))
        sel_sets = [(*qkv, idx, counts) for qkv in sets]
        variants.append((f"sparse {sp:.1%} K={kept}", sparse, sel_sets, 4.0 * h * n * kept * d))
    return variants


def mlp_variants(abstract: bool):
    """Dense XLA MLP and the sparse delta at MLP_SHAPE, as in ``attention_variants``."""
    from pallas_kernels.mlp import mosaic_gpu as mm

    n, c, f, sp = MLP_SHAPE["n"], MLP_SHAPE["c"], MLP_SHAPE["f"], MLP_SHAPE["sparsity"]
    kept = -(-round((1.0 - sp) * f) // 256) * 256
    g = n // 128
    inp = _Inputs(1, abstract)
    w1, w2 = inp.normal((f, c), scale=c**-0.5), inp.normal((f, c), scale=f**-0.5)
    b1 = inp.normal((f,), jnp.float32, scale=0.1)
    idx = inp.derived(
        lambda key: jnp.argsort(jax.random.uniform(key, (1, g, f)), axis=-1)[..., :kept].astype(jnp.int32),
        (1, g, kept),
    )
    counts = inp.derived(lambda key: jnp.full((1, g), kept, jnp.int32), (1, g))
    xs = [inp.normal((1, n, c)) for _ in range(2)]
    act, out = inp.normal((1, n, f)), inp.normal((1, n, c))

    def dense_mlp(x, w1, b1, w2):
        z = jnp.einsum("bnc,fc->bnf", x, w1, preferred_element_type=jnp.float32) + b1[None, None, :]
        a = jax.nn.gelu(z, approximate=True).astype(x.dtype)
        return jnp.einsum("bnf,fc->bnc", a, w2, preferred_element_type=jnp.float32).astype(x.dtype)

    sparse = jax.jit(lambda *args: mm.sparse_mlp_delta(*args))
    return [
        ("dense XLA MLP", jax.jit(dense_mlp), [(x, w1, b1, w2) for x in xs], 4.0 * n * f * c),
        (
            f"sparse MLP {sp:.0%} K={kept}",
            sparse,
            [(x, w1, b1, w2, idx, counts, act, out) for x in xs],
            4.0 * n * kept * c,
        ),
    ]


def run_variants(title: str, variants, reps: int) -> list[str]:
    """Times every variant in one run; ratios are against the first (the baseline) and the second."""
    times = []
    for _, fn, sets, _ in variants:
        try:
            times.append(_time(fn, sets, reps))
        except Exception as e:  # one failing variant must not hide the others' figures
            times.append(f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
    rows = []
    for i, ((label, _, _, flops), t) in enumerate(zip(variants, times, strict=True)):
        if isinstance(t, str):
            rows.append(f"{title:8s} {label:24s} {t}")
            continue
        row = f"{title:8s} {label:24s} {t * 1e3:9.2f} ms {flops / t / 1e12:7.1f} TFLOP/s"
        for j in range(min(i, 2)):
            if not isinstance(times[j], str):
                row += f"   x{times[j] / t:5.2f} vs {variants[j][0]}"
        rows.append(row)
    return rows


def tuning_candidates(mode: str, group: int):
    """TuningConfigs swept by ``--tune`` for one mode and query group (those over the SMEM budget fail and are
    reported, not hidden)."""
    from pallas_kernels.attention import mosaic_gpu as mg

    base = mg.default_config(group, sparse=mode == "sparse")
    if mode == "dense":
        grid = [dict(block_kv=bk, max_concurrent_steps=st) for bk in (64, 128) for st in (2, 3)]
    else:
        grid = [dict(gather="rows_staged", block_kv=64, max_concurrent_steps=st) for st in (2, 3, 4)]
        grid += [dict(gather="pregathered", block_kv=bk, max_concurrent_steps=st) for bk in (64, 128) for st in (2, 3)]
    return [dataclasses.replace(base, **kw) for kw in grid]


def tune(models, groups, reps: int, out_path) -> list[str]:
    """Times every candidate config per (model shape, group, mode); writes the best of each to ``out_path``."""
    from pallas_kernels.attention import mosaic_gpu as mg

    rows, entries = [], []
    for model in models:
        h, n = MODELS[model]
        d = 128
        inp = _Inputs(7, False)
        sets = [tuple(inp.normal((1, h, n, d)) for _ in range(3)) for _ in range(2)]
        for group in groups:
            g = -(-n // group)
            sels = []
            for sp in SPARSITIES:
                kept = -(-round((1.0 - sp) * n) // 128) * 128
                idx = _strided_selection(inp._next(), h, g, n, kept)
                sels.append((sp, [(*qkv, idx, jnp.full((1, h, g), kept, jnp.int32)) for qkv in sets]))
            for mode in ("dense", "sparse"):
                results = []
                for cfg in tuning_candidates(mode, group):
                    gather = cfg.gather if mode == "sparse" else ""
                    label = f"{mode} g{group} {gather} bk{cfg.block_kv} st{cfg.max_concurrent_steps}"
                    try:
                        if mode == "dense":
                            fn = jax.jit(lambda q, k, v, cfg=cfg: mg.dense_attention(q, k, v, config=cfg))
                            ms = {"dense": 1e3 * _time(fn, sets, reps)}
                        else:
                            fn = jax.jit(lambda q, k, v, i, c, cfg=cfg: mg.sparse_attention(q, k, v, i, c, config=cfg))
                            ms = {f"{sp:.3f}": 1e3 * _time(fn, ss, reps) for sp, ss in sels}
                    except Exception as e:  # over the SMEM budget, or a lowering limit: report and go on
                        rows.append(f"{model:8s} {label:40s} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                        continue
                    results.append((sum(ms.values()), cfg, ms))
                    rows.append(f"{model:8s} {label:40s} " + "  ".join(f"{k}: {v:8.3f} ms" for k, v in ms.items()))
                if results:
                    _, cfg, ms = min(results, key=lambda r: r[0])
                    rows.append(f"{model:8s} best {mode} g{group}: {cfg}")
                    entries.append(
                        dict(mode=mode, group=group, model=model, heads=h, n=n, config=dataclasses.asdict(cfg), ms=ms)
                    )
    table = dict(
        written_by=f"python -m benchmarks.kernels --tune --models {' '.join(models)} --reps {reps}",
        date=datetime.date.today().isoformat(),
        device=jax.devices()[0].device_kind,
        jax=jax.__version__,
        entries=entries,
    )
    with open(out_path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    rows.append(f"wrote {len(entries)} tuned entries to {out_path}")
    return rows


def lower_variants(title: str, variants) -> list[str]:
    """Cross-lowers every variant for CUDA (no GPU needed) and reports which ones lower."""
    rows = []
    for label, fn, sets, _ in variants:
        try:
            fn.trace(*sets[0]).lower(lowering_platforms=("cuda",))
            status = "lowers for cuda"
        except Exception as e:  # report and go on: cuDNN, for one, needs a GPU to lower
            status = f"does not lower here: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
        rows.append(f"{title:8s} {label:24s} {status}")
    return rows


def interpret_check() -> str:
    """A tiny interpret-mode run of the sparse attention kernel against the f32 reference (CPU)."""
    from pallas_kernels.attention import mosaic_gpu as mg
    from pallas_kernels.attention import reference

    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (1, 1, 128, 128), jnp.bfloat16) for kk in ks[:3])
    idx = jnp.argsort(jax.random.uniform(ks[3], (1, 1, 1, 128)), axis=-1)[..., :96].astype(jnp.int32)
    counts = jnp.full((1, 1, 1), 80, jnp.int32)
    cfg = mg.TuningConfig(num_compute_wgs=2, consumer_regs=232, producer_regs=40)
    o = mg.sparse_attention(q, k, v, idx, counts, config=cfg, interpret=True)
    ref = reference.sparse_attention_reference(q, k, v, idx, counts, group=128)
    err = float(jnp.max(jnp.abs(o.astype(jnp.float32) - ref.astype(jnp.float32))))
    return f"interpret-mode sparse attention (N=128, K=80 of 96): max |o - ref| = {err:.2e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS), help="attention shapes")
    parser.add_argument("--only", choices=("attention", "mlp"), default=None, help="run one kernel family")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per variant (median reported)")
    parser.add_argument("--lower-only", action="store_true", help="cross-lower every variant for CUDA; no GPU needed")
    parser.add_argument("--tune", action="store_true", help="sweep TuningConfigs per shape and write the tuned table")
    parser.add_argument("--groups", nargs="+", type=int, default=[192], choices=(128, 192), help="--tune query groups")
    parser.add_argument("--tune-out", default=None, help="--tune output (default: the package's tuned_configs.json)")
    args = parser.parse_args(argv)
    # Interpret mode runs each warpgroup on XLA's CPU pool and can hang with fewer threads than warpgroups;
    # this must precede the first backend initialisation.
    try:
        jax.config.update("jax_num_cpu_devices", 8)
    except RuntimeError:  # backends already initialised by the caller, which then owns this setting
        pass
    groups = []
    if args.only in (None, "attention"):
        groups += [(m, lambda abstract, m=m: attention_variants(m, abstract)) for m in args.models]
    if args.only in (None, "mlp"):
        groups.append(("mlp", mlp_variants))
    if args.lower_only:
        for title, make in groups:
            print("\n".join(lower_variants(title, make(True))))
        return 0
    if not _on_hopper():
        print("benchmarks.kernels needs a Hopper (sm_90) GPU for timings; running an interpret-mode check instead.")
        print(interpret_check())
        return 0
    print(f"device: {jax.devices()[0].device_kind}; median of {args.reps} runs after warm-up")
    if args.tune:
        from pallas_kernels.attention import mosaic_gpu as mg

        out = args.tune_out or mg.TUNED_CONFIGS_PATH
        print("\n".join(tune(args.models, args.groups, args.reps, out)), flush=True)
        return 0
    for title, make in groups:
        print("\n".join(run_variants(title, make(False), args.reps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
