"""Dense vs Chipmunk denoising-step time of a Wan2.1 transformer (random bf16 weights, CFG batch), one run.

Runs the same model twice through the Wan sampler (CFG: one model call on the [cond; uncond] batch, UniPC):
dense (Chipmunk off) and Chipmunk with the Wan preset (sparse self-attention, full steps {0, 1, 10, 40},
step caching), and prints per-kind step times (compile excluded), the sparse-step / dense-step ratio and the
50-step projection from the preset's schedule (skipped steps at their measured cost, or 0 when the run was too
short to reach one: say so). On a GPU the defaults are the real shapes (T2V-1.3B, 81 frames at 832x480; use
--variant t2v-14b --size 1280x720 for the 14B at 720p); on CPU the model and video are REDUCED (stated in the
output) so that the run takes about a minute.

examples:
  python benchmarks/wan_step.py                                   # GPU: T2V-1.3B, 81 x 832x480
  python benchmarks/wan_step.py --variant t2v-14b --size 1280x720 # GPU: T2V-14B at 720p
  python benchmarks/wan_step.py --layers 4 --heads 4 --frames 17 --size 384x256 --steps 4   # the CPU default
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import chipmunk_jax as cj
from chipmunk_jax.schedules import step_kinds
from models.flux.sampling import default_attention_impl
from models.wan.config import CONFIGS
from models.wan.generate import TEXT_LEN, random_model
from models.wan.sampling import generate, latent_size

# Reduced CPU shapes: 4 layers (2 dense in the preset + 2 sparse) of width 4 x 128, 1920 video tokens.
CPU = dict(layers=4, heads=4, frames=17, size="384x256", steps=4, text_len=64)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/wan_step.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--variant", default="t2v-1.3b", choices=("t2v-1.3b", "t2v-14b"))
    p.add_argument("--layers", type=int, help="transformer blocks (default: the variant's on GPU, 4 on CPU)")
    p.add_argument("--heads", type=int, help="attention heads of 128 (default: the variant's on GPU, 4 on CPU)")
    p.add_argument("--frames", type=int, help="video frames, 4k+1 (default 81 on GPU, 17 on CPU)")
    p.add_argument("--size", help="WIDTHxHEIGHT (default 832x480 on GPU, 384x256 on CPU)")
    p.add_argument(
        "--steps", type=int, help="Chipmunk steps to time (default 12 on GPU: reaches a skipped step; 4 CPU)"
    )
    p.add_argument("--dense-steps", type=int, default=2, help="dense steps to time")
    p.add_argument("--text-len", type=int, help=f"text tokens (default {TEXT_LEN} on GPU, 64 on CPU)")
    p.add_argument("--backend", default="auto", help="Chipmunk operator backend")
    p.add_argument(
        "--attention-impl",
        default="auto",
        choices=("auto", "xla", "cudnn"),
        help="dense attention for the baseline and the dense layers; auto: cudnn on a GPU, else xla",
    )
    return p


def _mean(report, pred) -> float:
    ts = [t for label, v in report.step_times.items() if pred(label) for t in v]
    return float(np.mean(ts)) if ts else float("nan")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    on_gpu = jax.devices()[0].platform == "gpu"
    full = CONFIGS[args.variant]
    pick = lambda name, gpu: getattr(args, name) if getattr(args, name) is not None else (gpu if on_gpu else CPU[name])
    layers, heads = pick("layers", full.num_layers), pick("heads", full.heads)
    frames, size, steps = pick("frames", 81), pick("size", "832x480"), pick("steps", 12)
    text_len = pick("text_len", TEXT_LEN)
    width, height = (int(v) for v in size.split("x"))
    f, h, w = latent_size(frames, height, width)
    dim = heads * full.head_dim
    ffn = full.ffn_dim if heads == full.heads else int(round(full.ffn_dim * dim / full.dim / 128)) * 128
    cfg = full.replace(num_layers=layers, heads=heads, dim=dim, ffn_dim=ffn)
    reduced = (layers, heads) != (full.num_layers, full.heads) or frames < 81 or width * height < 832 * 480
    tokens = f * (h // 2) * (w // 2)
    print(
        f"Wan2.1 {args.variant} architecture: {layers} layers, {heads} heads x 128 (dim {dim}, ffn {ffn})"
        + (
            " -- REDUCED (the real model: " + f"{full.num_layers} layers, {full.heads} heads, 81 x 832x480)"
            if reduced
            else ""
        )
        + f"; video {frames} x {width}x{height} -> {tokens} tokens, text {text_len}, CFG batch 2, bf16 random"
        + f" weights; device {jax.devices()[0]}"
    )
    t0 = time.perf_counter()
    model = random_model(cfg, jnp.bfloat16)
    print(f"init: {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(0)
    text = jnp.asarray(rng.standard_normal((1, text_len, cfg.text_dim)), jnp.bfloat16)
    neg = jnp.asarray(rng.standard_normal((1, text_len, cfg.text_dim)), jnp.bfloat16)
    impl = default_attention_impl(jnp.bfloat16) if args.attention_impl == "auto" else args.attention_impl
    print(f"dense attention: {impl or 'xla'}; Chipmunk backend: {args.backend}")
    common = dict(frames=frames, height=height, width=width, attention_impl=impl, progress=False)

    dense = generate(model, text, neg, steps=args.dense_steps, chipmunk=None, **common)
    wan = cj.preset("wan")
    chip = generate(model, text, neg, steps=steps, chipmunk=wan, backend=args.backend, **common)
    print("\n== dense ==\n" + dense.report.format())
    print("\n== chipmunk (wan preset) ==\n" + chip.report.format())

    t_dense = _mean(dense.report, lambda label: True)
    t_sparse = _mean(chip.report, lambda label: "attn=sparse" in label)
    by_kind = {label: float(np.mean(v)) for label, v in chip.report.step_times.items()}
    skip_measured = "skip" in by_kind
    by_kind.setdefault("skip", 0.0)
    sched = step_kinds(wan, 50, cfg.num_layers)
    total_chip = sum(by_kind.get(p.label, t_sparse) for p in sched.steps)
    print("\n== summary ==")
    print(f"dense step: {1e3 * t_dense:.1f} ms; chipmunk sparse step: {1e3 * t_sparse:.1f} ms")
    print(f"sparse-step speedup (dense / sparse): {t_dense / t_sparse:.3f}x")
    print(
        f"50-step projection (wan preset: 4 full steps, {sum(p.skip for p in sched.steps)} skipped): dense "
        f"{50 * t_dense:.2f} s, chipmunk {total_chip:.2f} s, {50 * t_dense / total_chip:.3f}x"
        + ("" if skip_measured else " (skipped steps counted as 0 s: none was reached in this run)")
    )
    if reduced:
        print("NOTE: reduced shapes; layers 0-1 are dense in the preset and the video is short, so the ratios are")
        print("      not those of the real model (run on a GPU for the full-size figures).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
