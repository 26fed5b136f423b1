"""Dense vs Chipmunk denoising-step time of the FLUX.1-dev architecture (random bf16 weights), one run.

Runs the same model twice through the sampler: dense (Chipmunk off) and Chipmunk with the Flux preset, and
prints per-kind step times (compile excluded), the sparse-step / dense-step ratio, and the 50-step
projection from the preset's schedule. On CPU the depth is reduced (stated in the output).

examples:
  python benchmarks/flux_step.py                      # GPU: full size, 1280x768
  python benchmarks/flux_step.py --layers 2,2 --width 256 --height 256   # quick CPU check
  python benchmarks/flux_step.py --attention-impl cudnn --steps 12
  python benchmarks/flux_step.py --generation 50      # whole generations: dense, chipmunk, chipmunk + step caching
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import chipmunk_jax as cj
from chipmunk_jax.schedules import step_kinds
from models.flux.config import FLUX_DEV
from models.flux.sample import random_model
from models.flux.sampling import default_attention_impl, generate

CPU_LAYERS = (2, 1)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/flux_step.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--layers", help="double,single block counts (default: 19,38 on GPU, 2,1 on CPU)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--txt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=12, help="Chipmunk steps to time (>= 3: warm-up, mask, sparse)")
    p.add_argument("--dense-steps", type=int, default=3, help="dense steps to time")
    p.add_argument("--backend", default="auto", help="Chipmunk operator backend")
    p.add_argument(
        "--attention-impl",
        default="auto",
        choices=("auto", "xla", "cudnn"),
        help="dense attention (jax.nn.dot_product_attention) for the baseline and Chipmunk's dense layers; "
        "auto: cudnn on a GPU, else xla",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--generation",
        type=int,
        metavar="STEPS",
        help="instead of per-kind step times: time whole STEPS-step generations, dense vs chipmunk without and "
        "with step caching (compile time reported separately)",
    )
    p.add_argument(
        "--only-runs",
        nargs="+",
        metavar="NAME",
        help="with --generation: run only these (plus dense), e.g. 'chipmunk attention only'",
    )
    return p


def _generations(model, txt, y, args, common) -> None:
    flux = cj.preset("flux")
    runs = {
        "dense": None,
        "chipmunk": dataclasses.replace(flux, step_caching=dataclasses.replace(flux.step_caching, is_enabled=False)),
        "chipmunk + step caching": dataclasses.replace(
            flux, step_caching=dataclasses.replace(flux.step_caching, is_enabled=True)
        ),
    }
    attn_only = dataclasses.replace(flux, mlp=dataclasses.replace(flux.mlp, is_enabled=False))
    runs["chipmunk attention only"] = dataclasses.replace(
        attn_only, step_caching=dataclasses.replace(flux.step_caching, is_enabled=False)
    )
    runs["chipmunk attention only + step caching"] = dataclasses.replace(
        attn_only, step_caching=dataclasses.replace(flux.step_caching, is_enabled=True)
    )
    totals = {}
    for name, ck in runs.items():
        if args.only_runs and name not in args.only_runs and name != "dense":
            continue
        gen = generate(model, txt, y, steps=args.generation, chipmunk=ck, backend=args.backend, **common)
        rep = gen.report
        totals[name] = rep.total_s
        print(f"\n== {name}: {args.generation} steps ==\n" + rep.format())
    print("\n== summary (denoising wall time, compile excluded) ==")
    for name, total in totals.items():
        print(f"{name:<40} {total:8.2f} s  {totals['dense'] / total:6.3f}x")


def _mean(report, pred) -> float:
    ts = [t for label, v in report.step_times.items() if pred(label) for t in v]
    return float(np.mean(ts)) if ts else float("nan")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    platform = jax.devices()[0].platform
    if args.layers:
        nd, ns = (int(x) for x in args.layers.split(","))
    else:
        nd, ns = (FLUX_DEV.depth_double, FLUX_DEV.depth_single) if platform == "gpu" else CPU_LAYERS
    cfg = FLUX_DEV.replace(depth_double=nd, depth_single=ns)
    reduced = (nd, ns) != (FLUX_DEV.depth_double, FLUX_DEV.depth_single)
    print(
        f"FLUX.1-dev architecture, {nd} double + {ns} single blocks"
        + (" (REDUCED depth; the full model has 19 + 38)" if reduced else " (full depth)")
        + f", {args.width}x{args.height}, batch {args.batch}, bf16 random weights, device {jax.devices()[0]}"
    )
    t0 = time.perf_counter()
    model = random_model(cfg, jnp.bfloat16)
    print(f"init: {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(0)
    txt = jnp.asarray(rng.standard_normal((args.batch, args.txt_len, cfg.context_dim)), jnp.bfloat16)
    y = jnp.asarray(rng.standard_normal((args.batch, cfg.vec_dim)), jnp.bfloat16)
    impl = default_attention_impl(jnp.bfloat16) if args.attention_impl == "auto" else args.attention_impl
    print(f"dense attention: {impl or 'xla'}; Chipmunk backend: {args.backend}")
    common = dict(width=args.width, height=args.height, attention_impl=impl, progress=False)
    if args.generation:
        _generations(model, txt, y, args, common)
        return 0

    dense = generate(model, txt, y, steps=args.dense_steps, chipmunk=None, **common)
    flux = cj.preset("flux")
    chip = generate(model, txt, y, steps=args.steps, chipmunk=flux, backend=args.backend, **common)
    print("\n== dense ==\n" + dense.report.format())
    print("\n== chipmunk (flux preset) ==\n" + chip.report.format())

    t_dense = _mean(dense.report, lambda label: True)
    t_sparse = _mean(chip.report, lambda label: "attn=sparse" in label)
    by_kind = {label: float(np.mean(v)) for label, v in chip.report.step_times.items()}
    sched = step_kinds(flux, 50, cfg.num_layers)
    total_chip = sum(by_kind.get(p.label, t_sparse) for p in sched.steps)
    print("\n== summary ==")
    print(f"dense step: {1e3 * t_dense:.1f} ms; chipmunk sparse step: {1e3 * t_sparse:.1f} ms")
    print(f"sparse-step speedup (dense / sparse): {t_dense / t_sparse:.3f}x")
    print(
        f"50-step projection: dense {50 * t_dense:.2f} s, chipmunk {total_chip:.2f} s, {50 * t_dense / total_chip:.3f}x"
    )
    if reduced:
        print("NOTE: reduced depth; layers 0-1 are dense in the preset, so ratios understate the full model's.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
