"""Dense vs Chipmunk denoising-step time of the HunyuanVideo transformer (random bf16 weights), one run.

Times, in one process and on the same model, one dense model call and every Chipmunk step kind of the first
--steps steps of a 50-step generation with the HunyuanVideo preset (``chipmunk_jax.preset('hunyuan')``: sparse
joint attention at 5% of the keys + 1% random, full steps {0, 1, 10, 40}, step caching): warm-up (step 0),
mask (steps 1 and 10), sparse, and skipped steps (step caching: the output head only). Every executable is
compiled ahead of its timed calls (compile time reported apart). Prints per-kind step times, each kind's
ratio to the dense step, the achieved key density and cache memory, and the 50-step projection from the
preset's schedule. HunyuanVideo embeds its guidance (no CFG): batch 1.

The default is the release: the 13B transformer at 720x1280, 129 frames (latent 33x90x160 -> 33x45x80 =
118,800 video tokens after the (1, 2, 2) patch) with 256 text tokens: a GPU job (about 26 GB of weights plus
56 GB of Chipmunk attention cache). --tiny is a small CPU check of the same code path (REDUCED, stated in the
output): 3 double + 2 single blocks of width 2 x 64, 17 frames at 256x192 (960 video tokens), 32 text tokens.

examples:
  python benchmarks/hunyuan_step.py                                  # GPU: 13B, 129 x 1280x720, 12 steps
  python benchmarks/hunyuan_step.py --steps 11 --dense-steps 1       # shorter GPU run (reaches steps 7 and 10)
  python benchmarks/hunyuan_step.py --no-step-caching                # Chipmunk attention only
  python benchmarks/hunyuan_step.py --tiny                           # CPU, about half a minute
  python benchmarks/hunyuan_step.py --tiny --frames 33 --size 320x256 --valid-text 20
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import chipmunk_jax as cj
from chipmunk_jax.cache import cache_nbytes
from chipmunk_jax.sampler import flow_match_sigmas
from chipmunk_jax.schedules import step_kinds
from models.flux.sampling import default_attention_impl
from models.hunyuan_video import (
    HUNYUAN_VIDEO_13B,
    ChipmunkRun,
    forward,
    hunyuan_static_mask,
    init_hunyuan_cache,
    post_patch_grid,
)
from models.hunyuan_video.generate import random_model

GENERATION_STEPS = 50  # the schedule the timed steps are taken from (the pipeline's default)
FLOW_SHIFT = 7.0  # HunyuanVideo's scheduler shift
GUIDANCE = 6.0  # embedded guidance scale (the pipeline passes guidance * 1000)
# --tiny: 3 double + 2 single blocks (the preset keeps layers 0-1 dense, so both block kinds run sparse).
TINY = dict(double=3, single=2, heads=2, head_dim=64, frames=17, size="256x192", text_len=32)
TINY_CFG = dict(text_dim=64, pooled_dim=32, rope_axes_dim=(16, 24, 24))
FULL = dict(frames=129, size="1280x720", text_len=256)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/hunyuan_step.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tiny", action="store_true", help="small CPU configuration (REDUCED model and video)")
    p.add_argument("--double", type=int, help="double-stream blocks (default 20; 3 with --tiny)")
    p.add_argument("--single", type=int, help="single-stream blocks (default 40; 2 with --tiny)")
    p.add_argument("--heads", type=int, help="attention heads (default 24; 2 with --tiny)")
    p.add_argument("--frames", type=int, help="video frames, 4k+1 (default 129; 17 with --tiny)")
    p.add_argument("--size", help="WIDTHxHEIGHT in pixels, multiples of 16 (default 1280x720; 256x192 with --tiny)")
    p.add_argument("--text-len", type=int, help="padded prompt tokens (default 256; 32 with --tiny)")
    p.add_argument("--valid-text", type=int, help="valid (unpadded) prompt tokens (default: all of --text-len)")
    p.add_argument(
        "--steps",
        type=int,
        default=12,
        help="steps of the 50-step Chipmunk schedule to run (default 12: warm-up, 2 mask, 7 sparse, 2 skipped)",
    )
    p.add_argument("--dense-steps", type=int, default=2, help="timed dense model calls (default 2)")
    p.add_argument("--no-step-caching", action="store_true", help="Chipmunk attention without step caching")
    p.add_argument("--top-keys", type=float, help="override the preset's top_keys fraction (0.05)")
    p.add_argument("--backend", default="auto", help="Chipmunk operator backend (auto, xla, reference, ...)")
    p.add_argument(
        "--attention-impl",
        default="auto",
        choices=("auto", "xla", "cudnn"),
        help="dense attention for the baseline and Chipmunk's dense layers/steps; auto: cudnn on a GPU, else xla",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def _setup(args) -> tuple:
    """(config, frames, width, height, text_len, valid, reduced) from the arguments; errors before any compute."""
    on_gpu = jax.devices()[0].platform == "gpu"
    if not args.tiny and not on_gpu:
        raise SystemExit(
            "error: the full-size benchmark (13B, 118,800 video tokens) needs a GPU; pass --tiny for the CPU check"
        )
    base = TINY if args.tiny else dict(double=20, single=40, heads=24, head_dim=128, **FULL)
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else base[name]
    cfg = HUNYUAN_VIDEO_13B if not args.tiny else HUNYUAN_VIDEO_13B.replace(head_dim=base["head_dim"], **TINY_CFG)
    cfg = cfg.replace(depth_double=pick("double"), depth_single=pick("single"), heads=pick("heads"))
    frames, text_len = pick("frames"), pick("text_len")
    try:
        width, height = (int(v) for v in pick("size").lower().split("x"))
    except ValueError:
        raise SystemExit(f"error: --size must be WIDTHxHEIGHT, e.g. 1280x720, got {args.size!r}") from None
    if (frames - 1) % 4 or frames < 1:
        raise SystemExit(f"error: --frames must be 4k+1 (the VAE compresses time by 4), got {frames}")
    if width % 16 or height % 16:
        raise SystemExit(f"error: --size sides must be multiples of 16 (VAE 8 x patch 2), got {width}x{height}")
    valid = args.valid_text if args.valid_text is not None else text_len
    if not 0 < valid <= text_len:
        raise SystemExit(f"error: --valid-text must be in [1, {text_len}], got {valid}")
    if args.steps < 3 or args.steps > GENERATION_STEPS:
        raise SystemExit(f"error: --steps must be in [3, {GENERATION_STEPS}] (warm-up, mask, sparse)")
    reduced = (cfg.depth_double, cfg.depth_single, cfg.heads, cfg.head_dim) != (20, 40, 24, 128) or (
        frames,
        width * height,
    ) != (129, 1280 * 720)
    return cfg, frames, width, height, text_len, valid, reduced


def _density(cache) -> float:
    """Fraction of (query group, key) pairs the last mask step selected, over every sparsified layer."""
    a = cache.attn
    if a is None or a.mask_bits is None:
        return float("nan")
    n = a.out.shape[-2]
    # Per (layer, batch, head, group) counts inside one jit: the packed mask is ~13 GB at full size.
    counts = jax.jit(lambda b: jax.lax.population_count(b).sum(-1, dtype=jnp.int32))(a.mask_bits)
    return float(np.asarray(counts, np.float64).sum()) / (counts.size * n)


@dataclasses.dataclass
class Timings:
    """Per-kind step times (seconds) and compile times of one run."""

    steps: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    compile: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, label: str, seconds: float) -> None:
        self.steps.setdefault(label, []).append(seconds)

    def mean(self, label: str) -> float:
        return float(np.mean(self.steps[label])) if label in self.steps else float("nan")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cfg, frames, width, height, text_len, valid, reduced = _setup(args)
    lat_shape = (1, cfg.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)
    grid = post_patch_grid(cfg, *lat_shape[2:])
    n_vid = int(np.prod(grid))
    print(
        f"HunyuanVideo: {cfg.depth_double} double + {cfg.depth_single} single blocks, {cfg.heads} heads x "
        f"{cfg.head_dim} (width {cfg.hidden}, MLP {cfg.mlp_hidden})"
        + (" -- REDUCED (the release: 20 + 40 blocks, 24 x 128, 129 x 1280x720)" if reduced else "")
        + f"; video {frames} x {width}x{height} -> latent {lat_shape[2:]} -> {grid} = {n_vid:,} tokens, text "
        f"{text_len} ({valid} valid); batch 1 (embedded guidance), bf16 random weights; device {jax.devices()[0]}"
    )
    t0 = time.perf_counter()
    # bf16 random weights: numpy draws for --tiny (fast to set up on a CPU), else one jitted initialisation.
    model = random_model(cfg, jnp.bfloat16, args.seed, host=args.tiny)
    graphdef, state = nnx.split(model)
    print(f"init: {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(args.seed)
    bf = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    latents = jnp.asarray(rng.standard_normal(lat_shape), jnp.float32)
    text, pooled = bf(1, text_len, cfg.text_dim), bf(1, cfg.pooled_dim)
    mask = jnp.asarray(np.arange(text_len)[None, :] < valid)
    guidance = jnp.full((1,), GUIDANCE * 1000.0, jnp.float32)
    impl = default_attention_impl(jnp.bfloat16) if args.attention_impl == "auto" else args.attention_impl
    print(f"dense attention: {impl or 'xla'}; Chipmunk backend: {args.backend}")
    sigmas = flow_match_sigmas(GENERATION_STEPS, shift=FLOW_SHIFT)
    ts = lambda t: jnp.full((1,), float(sigmas[t]) * 1000.0, jnp.float32)

    # Dense baseline: the plain model (no cache), compiled ahead of the timed calls.
    dense = Timings()
    c0 = time.perf_counter()
    exe_dense = forward.lower(
        graphdef, state, latents, ts(0), text, mask, pooled, guidance, attention_impl=impl
    ).compile()
    dense.compile["dense"] = time.perf_counter() - c0
    for t in range(args.dense_steps):
        t0 = time.perf_counter()
        pred, _ = exe_dense(state, latents, ts(t), text, mask, pooled, guidance)
        jax.block_until_ready(pred)
        dense.add("dense", time.perf_counter() - t0)
    del exe_dense

    # Chipmunk: the first --steps steps of the 50-step schedule, on the Euler trajectory of its own predictions.
    ck = cj.preset("hunyuan")
    if args.no_step_caching:
        ck = ck.replace(step_caching=dataclasses.replace(ck.step_caching, is_enabled=False))
    if args.top_keys is not None:
        ck = ck.replace(attn=dataclasses.replace(ck.attn, top_keys=args.top_keys))
    schedule = step_kinds(ck, GENERATION_STEPS, cfg.num_layers)
    cache = init_hunyuan_cache(cfg, ck, batch=1, grid=grid, text_len=valid)
    key = jax.random.key(args.seed)
    sm = hunyuan_static_mask(cfg, ck, grid, valid, jax.random.fold_in(key, 10_000))
    static = (jnp.asarray(sm.mask), jnp.asarray(sm.sparse_group))
    head = jax.jit(lambda st, h, t: nnx.merge(graphdef, st).final_layer(h, t, pooled, guidance, grid))
    chip, exes, x = Timings(), {}, latents
    for t in range(args.steps):
        plan = schedule.steps[t]
        label = plan.label
        if label not in exes:
            c0 = time.perf_counter()
            if plan.skip:
                exes[label] = head.lower(state, cache.hidden, ts(t)).compile()
            else:
                exes[label] = forward.lower(
                    graphdef,
                    state,
                    x,
                    ts(t),
                    text,
                    mask,
                    pooled,
                    guidance,
                    cache,
                    chipmunk=ChipmunkRun(ck, plan, args.backend),
                    text_len=valid,
                    rng=key,
                    step=t,
                    static_mask=static,
                    attention_impl=impl,
                ).compile()
            chip.compile[label] = time.perf_counter() - c0
        t0 = time.perf_counter()
        if plan.skip:
            pred = exes[label](state, cache.hidden, ts(t))
        else:
            pred, cache = exes[label](
                state, x, ts(t), text, mask, pooled, guidance, cache, rng=key, step=t, static_mask=static
            )
        jax.block_until_ready(pred)
        chip.add(label, time.perf_counter() - t0)
        x = x + float(sigmas[t + 1] - sigmas[t]) * pred.astype(jnp.float32)

    if any(p.skip for p in schedule.steps) and "skip" not in chip.steps:
        # A skipped step is the output head alone: cheap to time even when the run stopped before one.
        c0 = time.perf_counter()
        exe = head.lower(state, cache.hidden, ts(args.steps)).compile()
        chip.compile["skip"] = time.perf_counter() - c0
        for _ in range(2):
            t0 = time.perf_counter()
            jax.block_until_ready(exe(state, cache.hidden, ts(args.steps)))
            chip.add("skip", time.perf_counter() - t0)

    t_dense = dense.mean("dense")
    print(f"\n{'step kind':<28}{'steps':>6}{'mean ms':>12}{'dense/kind':>12}{'compile s':>11}")
    print(
        f"{'dense':<28}{len(dense.steps['dense']):>6}{1e3 * t_dense:>12.1f}{1.0:>12.3f}{dense.compile['dense']:>11.1f}"
    )
    for label, times in chip.steps.items():
        m = float(np.mean(times))
        print(
            f"{'chipmunk ' + label:<28}{len(times):>6}{1e3 * m:>12.1f}{t_dense / m:>12.3f}{chip.compile[label]:>11.1f}"
        )
    by_kind = {label: chip.mean(label) for label in chip.steps}
    t_sparse = by_kind.get("attn=sparse,mlp=dense", float("nan"))
    missing = sorted({p.label for p in schedule.steps} - set(by_kind))
    total = sum(by_kind.get(p.label, t_sparse) for p in schedule.steps)
    n_skip = sum(p.skip for p in schedule.steps)
    print(f"\nselected key density (last mask step, sparsified layers): {_density(cache):.4f}")
    print(f"Chipmunk cache: {cache_nbytes(cache) / 2**20:,.1f} MiB")
    print(
        f"sparse-step speedup (dense / sparse): {t_dense / t_sparse:.3f}x\n"
        f"50-step projection ({len(ck.attn.full_step_schedule)} full steps, {n_skip} skipped): dense "
        f"{GENERATION_STEPS * t_dense:.2f} s, chipmunk {total:.2f} s, {GENERATION_STEPS * t_dense / total:.3f}x"
        + (f" (kinds not reached, counted as sparse steps: {missing})" if missing else "")
    )
    if reduced:
        print("NOTE: REDUCED shapes: attention is a small share of a step here, so the ratios are not those of")
        print("      the release (run the default on a GPU for the full-size figures).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
