"""Training-recipe search for the tiny demo model: train each recipe, sample it, score recognisable classes.

For every recipe this trains the tiny class-conditioned Flux with ``models.tiny.train.train`` (the same code as
``python -m models.tiny.train``), samples the 12 classes x 8 seeds with 50 Euler steps (--sample-steps) and prints
one JSON line: loss, steps done, time, and for each classifier-free guidance scale of the recipe the share of
samples whose shape and colour read back from the pixels (``models.tiny.dataset.recognition_rate``). The dataset
is drawn once into pools (one per image size) by --workers processes (float16, indices wrapping around past --pool
images), so a GPU is not starved; with a pool at least steps x batch large the batches are exactly those of the
training CLI.

A recipe is a JSON object: name, hidden (width), hd (head channels, default 64), dd / ds (double / single
blocks, default 2 / 4), lr, batch, steps, budget (seconds), p_uncond and keep (``TrainConfig.p_uncond`` /
``token_keep``), scales (guidance scales to sample with, default [1]; scales other than 1 need p_uncond > 0),
and optionally stages: a list of {size, batch, steps, lr} trained one after the other (e.g. 32 px, then 64 px).

Two recipe sets:
  gpu    the recipes of docs/DEMO.md's first table (how the shipped GPU recipe was chosen).
  cpu20  what 20 minutes on 2 CPU cores can train: the steps of each recipe are what this machine's 2 cores do
         in 1140 s (20 minutes less compilation), from `--throughput` on that machine; run them on a GPU.

--throughput SECONDS times each recipe's training step here (after compiling it) and prints the images per
second and the steps that fit into --cpu-minutes (less the measured compile time): how the cpu20 steps were set.

Figures in docs/DEMO.md came from one H200 run each of
  PYTHONPATH=. python3 benchmarks/tiny_recipes.py --out $OUT                  # gpu set, 550 s
  PYTHONPATH=. python3 benchmarks/tiny_recipes.py --set cpu20 --pool 65536    # about 20 minutes
and, on the 2-core development machine, `python benchmarks/tiny_recipes.py --set cpu20 --throughput 8`.

examples:
  python benchmarks/tiny_recipes.py --out out/recipes
  python benchmarks/tiny_recipes.py --recipes '[{"name": "w128", "hidden": 128, "batch": 64, "steps": 4000}]'
  python benchmarks/tiny_recipes.py --set cpu20 --throughput 8    # images/s of each recipe on this machine
  python benchmarks/tiny_recipes.py --smoke      # 5 steps of the first recipe on a small pool (a CPU check)
  python benchmarks/tiny_recipes.py --score out/tiny-cpu20 --scales 1,4.5    # score a trained checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import time
from multiprocessing import get_context

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.flux.model import position_ids, rope_table
from models.tiny import dataset
from models.tiny import model as tm
from models.tiny import sampling as ts
from models.tiny import train as tt

GPU_RECIPES = [
    {"name": "w96_b8", "hidden": 96, "batch": 8, "lr": 1e-3, "steps": 1500, "budget": 120},
    {"name": "w96_b32", "hidden": 96, "batch": 32, "lr": 2e-3, "steps": 1500, "budget": 120},
    {"name": "w192_b32", "hidden": 192, "batch": 32, "lr": 1e-3, "steps": 1500, "budget": 120},
    {"name": "w192_b64", "hidden": 192, "batch": 64, "lr": 1e-3, "steps": 6000, "budget": 150},
    {"name": "w256_b64", "hidden": 256, "dd": 3, "ds": 6, "batch": 64, "lr": 7e-4, "steps": 6000, "budget": 150},
]

_CFG = {"p_uncond": 0.1, "scales": [1, 3, 4.5, 6]}
# Steps: 1140 s x the images/s that `--throughput` measured on the 2-core development machine / batch.
CPU20_RECIPES = [
    {"name": "w96", "hidden": 96, "batch": 8, "lr": 2e-3, "steps": 4060},
    {
        "name": "w96_32px_then_64px",
        "hidden": 96,
        "lr": 2e-3,
        "stages": [{"size": 32, "batch": 32, "steps": 3370}, {"size": 64, "batch": 8, "steps": 1015}],
    },
    {"name": "w96_cfg", "hidden": 96, "batch": 8, "lr": 2e-3, "steps": 4060, **_CFG},
    {"name": "w96_keep0.5_cfg", "hidden": 96, "batch": 8, "lr": 2e-3, "steps": 8000, "keep": 0.5, **_CFG},
    # 60 minutes: where the curve goes with three times the images of w96_cfg.
    {"name": "w96_cfg_x3", "hidden": 96, "batch": 8, "lr": 2e-3, "steps": 12180, **_CFG},
]
RECIPE_SETS = {"gpu": GPU_RECIPES, "cpu20": CPU20_RECIPES}


def _chunk(args: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    start, size = args
    imgs, labels = dataset.batch(0, start, 1024, size)
    return imgs.astype(np.float16), labels


def _stages(r: dict) -> list[dict]:
    """The recipe's training stages (one at 64 px unless it lists several)."""
    top = {"size": tm.IMAGE_SIZE, "batch": r.get("batch"), "steps": r.get("steps"), "lr": r.get("lr", 1e-3)}
    stages = [dict(top, **s) for s in r.get("stages", [{}])]
    for s in stages:
        if s["batch"] is None or s["steps"] is None:
            raise ValueError(f"recipe {r.get('name')!r}: every stage needs batch and steps")
    return stages


def _config(r: dict):
    return tm.tiny_flux_config_for(r["hidden"], r.get("dd", 2), r.get("ds", 4), head_dim=r.get("hd", 64))


def _train_config(r: dict, stage: dict, index: int) -> tt.TrainConfig:
    return tt.TrainConfig(
        batch=stage["batch"],
        lr=stage["lr"],
        seed=index,
        p_uncond=r.get("p_uncond", 0.0),
        token_keep=r.get("keep", 1.0),
    )


def throughput(r: dict, seconds: float, cpu_minutes: float) -> dict:
    """Images per second of the recipe's (first-stage) training step on this machine, and the steps that fit
    ``cpu_minutes`` of training less the compile time (data drawing, about 0.6 ms per 64 px image, included)."""
    stage = _stages(r)[0]
    cfg, tc = _config(r), _train_config(r, stage, 0)
    h, w = tm.token_grid(stage["size"])
    rope = rope_table(position_ids(tm.TXT_LEN, h, w), cfg.axes_dim, cfg.theta)
    graphdef, params = nnx.split(tm.init_model(cfg))
    ema, opt = jax.tree.map(jnp.copy, params), tt._adam_init(params)
    step = tt.make_train_step(graphdef, tc, rope)
    key, lr = jax.random.key(0), jnp.float32(tc.lr)

    def one(n, params, ema, opt):
        imgs, labels = dataset.batch(0, n * tc.batch, tc.batch, stage["size"])
        out = step(params, ema, opt, tm.image_to_tokens(jnp.asarray(imgs)), jnp.asarray(labels), key, lr)
        float(out[3])
        return out[:3]

    t0 = time.perf_counter()
    params, ema, opt = one(0, params, ema, opt)
    compile_s = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += 1
        params, ema, opt = one(n, params, ema, opt)
    img_s = n * tc.batch / (time.perf_counter() - t0)
    fit = int((60.0 * cpu_minutes - compile_s) * img_s / tc.batch)
    return {"name": r["name"], "images_per_s": round(img_s, 1), "compile_s": round(compile_s, 1), "steps_fit": fit}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/tiny_recipes.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--set", default="gpu", choices=sorted(RECIPE_SETS), help="built-in recipe set")
    p.add_argument("--recipes", default=None, help="JSON list of recipes (instead of --set)")
    p.add_argument("--pool", type=int, default=131072, help="images drawn ahead into memory (per image size)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="processes drawing the pool")
    p.add_argument("--out", default=None, help="write each recipe's samples (.npy) and EMA checkpoint here")
    p.add_argument("--smoke", action="store_true", help="5 steps of the first recipe, pool of 1024, 12 samples")
    p.add_argument(
        "--throughput", type=float, default=None, metavar="SECONDS", help="only time each recipe's step here"
    )
    p.add_argument("--cpu-minutes", type=float, default=20.0, help="training time --throughput fits steps into")
    p.add_argument("--score", default=None, metavar="CKPT", help="only score this checkpoint directory (no training)")
    p.add_argument("--scales", default="1", help="with --score: comma-separated guidance scales")
    p.add_argument("--sample-steps", type=int, default=50, help="Euler steps of the scored samples")
    return p


def score(ckpt: str, scales: list[float], samples_per_class: int = 8, steps: int = 50) -> dict:
    """Recognition rates of a trained checkpoint's samples (12 classes x samples_per_class, ``steps`` Euler steps)."""
    model, meta = tm.load_checkpoint(ckpt)
    want = np.tile(np.arange(dataset.NUM_CLASSES), samples_per_class)
    row = {"ckpt": ckpt, "command": meta.get("command"), "steps": meta.get("steps")}
    for s, imgs in ts.guided_images(model, want, scales, steps=steps, seed=1).items():
        rate = dataset.recognition_rate(imgs, want)
        row[f"class@{s:g}"] = round(float(rate["class"]), 3)
        row[f"shape@{s:g}"] = round(float(rate["shape"]), 3)
    return row


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.score:
        scales = [float(x) for x in args.scales.split(",")]
        print(json.dumps(score(args.score, scales, steps=args.sample_steps)), flush=True)
        return 0
    recipes = json.loads(args.recipes) if args.recipes else RECIPE_SETS[args.set]
    for r in recipes:
        _stages(r)
        if any(s != 1 for s in r.get("scales", [1])) and not r.get("p_uncond"):
            raise ValueError(f"recipe {r.get('name')!r}: guidance scales other than 1 need p_uncond > 0")
    if args.throughput is not None:
        for r in recipes:
            print(json.dumps(throughput(r, args.throughput, args.cpu_minutes)), flush=True)
        return 0
    pool_n, samples_per_class = (1024, 1) if args.smoke else (args.pool, 8)
    if args.smoke:
        recipes = [dict(recipes[0], steps=5, stages=[dict(s, steps=5) for s in _stages(recipes[0])])]
    sizes = sorted({s["size"] for r in recipes for s in _stages(r)})
    t0 = time.perf_counter()
    pools = {}
    with get_context("spawn").Pool(max(1, args.workers)) as p:
        for size in sizes:
            parts = p.map(_chunk, [(start, size) for start in range(0, pool_n, 1024)])
            pools[size] = (
                np.concatenate([x[0] for x in parts])[:pool_n],
                np.concatenate([x[1] for x in parts])[:pool_n],
            )
    print(f"pools of {pool_n} images ({sizes} px) in {time.perf_counter() - t0:.1f} s", flush=True)

    def pool_batch(seed, start, count, size=tm.IMAGE_SIZE):
        images, labels = pools[size]
        idx = (np.arange(start, start + count) + 7919 * seed) % len(images)
        return images[idx].astype(np.float32), labels[idx]

    draw = tt.dataset.batch
    tt.dataset.batch = pool_batch  # train() draws through models.tiny.dataset.batch
    try:
        for r in recipes:
            cfg = _config(r)
            model, losses, steps, t = None, [], [], time.perf_counter()
            for i, stage in enumerate(_stages(r)):
                model, hist = tt.train(
                    cfg,
                    _train_config(r, stage, i),
                    budget_s=r.get("budget", 600),
                    max_steps=stage["steps"],
                    image_size=stage["size"],
                    progress=False,
                    log_every=0,
                    init=model,
                )
                losses, steps = hist["loss"], steps + [hist["steps"]]
            train_s = time.perf_counter() - t
            want = np.tile(np.arange(dataset.NUM_CLASSES), samples_per_class)
            scales = r.get("scales", [1])
            images = ts.guided_images(model, want, scales, steps=args.sample_steps, seed=1)
            n_params = sum(v.size for v in jax.tree.leaves(nnx.state(model)))
            row = dict(r, params=int(n_params), train_s=round(train_s, 1), steps_done=steps)
            row["loss"] = round(float(np.mean(losses[-200:])), 5)
            for s, imgs in images.items():
                rate = dataset.recognition_rate(imgs, want)
                row[f"class@{s:g}"] = round(float(rate["class"]), 3)
                row[f"shape@{s:g}"] = round(float(rate["shape"]), 3)
            print(json.dumps(row), flush=True)
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                best = images[float(scales[-1])]
                np.save(os.path.join(args.out, f"{r['name']}_samples.npy"), (best * 255).astype(np.uint8))
                tm.save_checkpoint(model, os.path.join(args.out, f"{r['name']}_ckpt"), {"recipe": r, "result": row})
    finally:
        tt.dataset.batch = draw
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
