"""Dense vs Chipmunk denoising-step time of the Mochi 1 transformer (random weights, CFG batch 2), one run.

Builds the model once with random weights and times, in the same process, jitted model calls on the CFG batch
[cond; uncond]: the plain dense model, and Chipmunk with the Mochi preset (sparse joint attention over [video in
voxel order; text], top_keys 0.15, local_voxels 1, full steps {0, 1, 15, 30, 45, 60}) running its first
``--steps`` steps (warm-up, mask, then sparse steps) with its cache carried. Every step kind is compiled ahead of
time (compile times printed apart), then each call is timed to completion. The table gives per-kind times, the
dense / kind ratio, and the 64-step projection from the preset's schedule.

The default is the release shape: Mochi 1 preview (10.0B parameters, bf16), 163 frames at 848x480 -> latent
28 x 60 x 106 -> 44,520 video tokens, 256 text tokens, CFG batch 2: a GPU job (H200: ~26 GB of Chipmunk
attention cache besides the 20 GB of weights). ``--tiny`` is a CPU smoke run of a tiny model (seconds); the
size options reduce the model or the video for anything in between (the output says REDUCED).

examples:
  python benchmarks/mochi_step.py                         # GPU: the release shape
  python benchmarks/mochi_step.py --layers 8 --steps 4    # GPU: 8 of the 48 layers, same video
  python benchmarks/mochi_step.py --tiny                  # CPU: tiny model and video
  python benchmarks/mochi_step.py --tiny --json out/mochi_tiny.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import chipmunk_jax as cj
from chipmunk_jax.schedules import AttnKind, StepPlan, step_kinds
from models.mochi import (
    MOCHI_1_PREVIEW,
    ChipmunkRun,
    MochiConfig,
    forward,
    init_mochi_cache,
    mochi_static_mask,
    post_patch_grid,
    tiny_config,
)
from models.mochi.generate import random_model
from models.mochi.sampling import latent_size

RELEASE = dict(frames=163, size="848x480", text_len=256, steps=5, dense_steps=2, dtype="bf16")
# --tiny: 4 layers (2 dense in the preset + 2 sparse), 2 heads x 16; latent 4 x 24 x 32 -> 768 video tokens.
TINY = dict(frames=19, size="256x192", text_len=8, steps=4, dense_steps=2, dtype="fp32")
DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(
        prog="python benchmarks/mochi_step.py",
        description="\n\n".join(doc[:3]),
        epilog="\n\n".join(doc[3:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tiny", action="store_true", help="tiny model and video for a CPU smoke run (seconds)")
    p.add_argument("--layers", type=int, help="transformer blocks (default 48; 4 with --tiny)")
    p.add_argument("--heads", type=int, help="attention heads of 128 (default 24; --tiny: 2 of 16)")
    p.add_argument("--frames", type=int, help="video frames, 6k+1 (default 163; 19 with --tiny)")
    p.add_argument("--size", help="WIDTHxHEIGHT in pixels, multiples of 16 (default 848x480; 256x192 with --tiny)")
    p.add_argument("--text-len", type=int, help="valid T5 tokens of every prompt (default 256; 8 with --tiny)")
    p.add_argument("--steps", type=int, help="Chipmunk steps to time from step 0 (>= 3; default 5; 4 with --tiny)")
    p.add_argument("--dense-steps", type=int, help="dense model calls to time (default 2)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="parameter dtype (default bf16; fp32 with --tiny)")
    p.add_argument("--backend", default="auto", help="Chipmunk operator backend (auto, xla, mosaic_gpu, reference)")
    p.add_argument(
        "--attention-impl",
        default="auto",
        choices=("auto", "xla", "cudnn"),
        help="dense attention for the baseline and Chipmunk's dense layers; auto: cudnn for 16-bit on a GPU",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return p


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent (F, H, W) of a ``frames`` x ``height`` x ``width`` video under Mochi's VAE (6x time, first frame
    kept; 8x space): ``models.mochi.sampling.latent_size``, which names the nearest valid sizes."""
    return latent_size(frames, height, width)


def model_config(args) -> tuple[MochiConfig, bool]:
    """The architecture to time and whether it is reduced from the release."""
    if args.tiny:
        cfg = tiny_config(num_layers=4)
        return cfg.replace(**{k: v for k, v in (("num_layers", args.layers), ("heads", args.heads)) if v}), True
    cfg = MOCHI_1_PREVIEW.replace(
        num_layers=args.layers or MOCHI_1_PREVIEW.num_layers, heads=args.heads or MOCHI_1_PREVIEW.heads
    )
    return cfg, cfg != MOCHI_1_PREVIEW


def _kind(plan: StepPlan | None) -> str:
    """'dense' for the plain model, else the Chipmunk kind of the sparsified layers ('warmup', 'mask', ...)."""
    if plan is None:
        return "dense"
    kinds = [k for k in plan.attn if k is not AttnKind.DENSE]
    return kinds[0].value if kinds else "dense-layers"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    on_gpu = jax.devices()[0].platform == "gpu"
    sizes = ("layers", "heads", "frames", "size", "text_len")
    if not on_gpu and not args.tiny and all(getattr(args, s) is None for s in sizes):
        print(
            "error: the release shape (10B parameters, 44,520 video tokens) needs a GPU; use --tiny for a CPU smoke "
            "run, or reduce with --layers / --heads / --frames / --size",
            file=sys.stderr,
        )
        return 2
    defaults = TINY if args.tiny else RELEASE
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults[name]
    frames, size, text_len = pick("frames"), pick("size"), pick("text_len")
    steps, dense_steps, dtype = pick("steps"), pick("dense_steps"), DTYPES[pick("dtype")]
    if steps < 3 or dense_steps < 1:
        raise SystemExit("error: --steps must be >= 3 (warm-up, mask, sparse) and --dense-steps >= 1")
    width, height = (int(v) for v in size.lower().split("x"))
    cfg, reduced = model_config(args)
    latent = latent_shape(frames, height, width)
    grid = post_patch_grid(cfg, *latent)
    tokens = math.prod(grid)
    reduced = reduced or (frames, width, height) != (RELEASE["frames"], 848, 480)

    ck = cj.preset("mochi")
    if cfg.num_layers <= ck.attn.first_n_dense_layers:
        raise SystemExit(f"error: --layers must exceed the preset's {ck.attn.first_n_dense_layers} dense layers")
    impl = None
    if args.attention_impl == "cudnn" or (args.attention_impl == "auto" and on_gpu and dtype == jnp.bfloat16):
        impl = "cudnn"
    print(
        f"Mochi 1 transformer: {cfg.num_layers} layers, {cfg.heads} heads x {cfg.head_dim} (width {cfg.dim}, "
        f"text width {cfg.text_width})"
        + (" -- REDUCED (the release: 48 layers, 24 heads x 128, 163 x 848x480)" if reduced else "")
        + f"; video {frames} x {width}x{height} -> latent {'x'.join(map(str, latent))} -> {tokens} tokens, "
        f"text {text_len}, CFG batch 2, {jnp.dtype(dtype).name} random weights; device {jax.devices()[0]}"
    )
    print(f"dense attention: {impl or 'xla'}; Chipmunk backend: {args.backend}; preset mochi")

    from flax import nnx

    t0 = time.perf_counter()
    # Random weights: numpy draws for small models (compiling the initialisers costs more on CPU), else one
    # jitted initialisation on the device.
    model = random_model(cfg, dtype, args.seed, host=cfg.num_layers * cfg.dim * cfg.ffn_dim < 50_000_000)
    graphdef, state = nnx.split(model)
    jax.block_until_ready(state)
    n_params = sum(x.size for x in jax.tree.leaves(state))
    print(f"init: {time.perf_counter() - t0:.1f} s ({n_params:,} parameters)")

    rng = np.random.default_rng(args.seed)
    lat = jnp.asarray(rng.standard_normal((1, cfg.in_channels, *latent)), dtype)
    lat = jnp.concatenate([lat, lat], axis=0)  # CFG: the same latents for cond and uncond
    text = jnp.asarray(rng.standard_normal((2, text_len, cfg.text_dim)), dtype)
    mask = jnp.ones((2, text_len), bool)  # every row has exactly text_len valid tokens (Chipmunk's requirement)
    key = jax.random.key(args.seed)
    sm = mochi_static_mask(cfg, ck, grid, text_len, jax.random.fold_in(key, 1 << 20))
    static = (jnp.asarray(sm.mask), jnp.asarray(sm.sparse_group))
    schedule = step_kinds(ck, ck.steps, cfg.num_layers)
    timed_plans = [schedule.steps[t] for t in range(steps)]

    def step_fn(run: ChipmunkRun | None):
        def f(state, latents, timestep, text, text_mask, cache, rng, step, static_mask):
            return forward(
                graphdef,
                state,
                latents,
                timestep,
                text,
                text_mask,
                cache,
                chipmunk=run,
                rng=rng,
                step=step,
                static_mask=static_mask,
                attention_impl=impl,
            )

        return jax.jit(f, donate_argnums=(5,))

    def new_cache():
        return init_mochi_cache(cfg, ck, batch=2, grid=grid, text_len=text_len, dtype=dtype, step_caching=False)

    cache = new_cache()
    cache_bytes = cj.cache_nbytes(cache)
    print(f"Chipmunk attention cache: {cache_bytes / 2**30:.2f} GiB ({cfg.num_layers - 2} sparsified layers)")
    ts = lambda t: jnp.full((2,), 1000.0 * (1.0 - t / ck.steps), jnp.float32)

    # Ahead-of-time compilation of each distinct step kind (compile time excluded from the step times).
    compiled, compile_s = {}, {}
    for plan in [None, *dict.fromkeys(timed_plans)]:
        t0 = time.perf_counter()
        if plan is None:
            args_ = (state, lat, ts(0), text, mask, None, None, jnp.int32(0), None)
        else:
            args_ = (state, lat, ts(0), text, mask, cache, key, jnp.int32(0), static)
        run = None if plan is None else ChipmunkRun(ck, plan, text_len, args.backend)
        compiled[plan] = step_fn(run).lower(*args_).compile()
        compile_s[_kind(plan)] = time.perf_counter() - t0
    print("compile: " + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()))

    times: dict[str, list[float]] = {}

    def timed(plan, *a):
        t0 = time.perf_counter()
        out = compiled[plan](*a)
        jax.block_until_ready(out)
        times.setdefault(_kind(plan), []).append(time.perf_counter() - t0)
        return out

    for t in range(dense_steps):
        timed(None, state, lat, ts(t), text, mask, None, None, jnp.int32(t), None)
    for t, plan in enumerate(timed_plans):
        _, cache = timed(plan, state, lat, ts(t), text, mask, cache, key, jnp.int32(t), static)

    t_dense = float(np.mean(times["dense"]))
    mean = {k: float(np.mean(v)) for k, v in times.items()}
    print(f"\n{'step kind':<18}{'calls':>6}{'mean ms':>12}{'min ms':>12}{'dense / kind':>14}")
    for k, v in times.items():
        label = "dense (no Chipmunk)" if k == "dense" else f"chipmunk {k}"
        print(f"{label:<18}{len(v):>6}{1e3 * mean[k]:>12.1f}{1e3 * min(v):>12.1f}{t_dense / mean[k]:>13.3f}x")
    # Projection over the preset's generation: each step at its kind's measured mean (a kind not timed here,
    # e.g. 'full', at the mask step's cost, its closest measured relative).
    per_step = [mean.get(_kind(p), mean["mask"]) for p in schedule.steps]
    kinds_count = {k: sum(_kind(p) == k for p in schedule.steps) for k in dict.fromkeys(map(_kind, schedule.steps))}
    total_chip, total_dense = float(sum(per_step)), ck.steps * t_dense
    print(
        f"\n{ck.steps}-step projection (preset mochi: "
        + ", ".join(f"{n} {k}" for k, n in kinds_count.items())
        + f"): dense {total_dense:.2f} s, chipmunk {total_chip:.2f} s, {total_dense / total_chip:.3f}x"
    )
    print(f"sparse-step speedup (dense / sparse): {t_dense / mean['sparse']:.3f}x")
    if reduced:
        print("NOTE: reduced shapes; the ratios are not those of the release model (run the default on a GPU).")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = dict(
            config=cfg.to_dict(),
            reduced=reduced,
            video=dict(frames=frames, width=width, height=height, latent=latent, tokens=tokens, text_len=text_len),
            dtype=jnp.dtype(dtype).name,
            device=str(jax.devices()[0]),
            attention_impl=impl or "xla",
            backend=args.backend,
            compile_s=compile_s,
            step_s=times,
            projection=dict(steps=ck.steps, dense_s=total_dense, chipmunk_s=total_chip, kinds=kinds_count),
            cache_bytes=cache_bytes,
        )
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
