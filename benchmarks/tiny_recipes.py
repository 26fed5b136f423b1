"""Training-recipe search for the tiny demo model: train each recipe, sample it, score recognisable classes.

For every recipe (width, depth, batch, learning rate, steps, time cap) this trains the tiny class-conditioned
Flux with ``models.tiny.train.train`` (the same code as ``python -m models.tiny.train``), samples the 12 classes
x 8 seeds with 50 Euler steps and prints one JSON line: loss, steps done, time, and the share of samples whose
shape and colour read back from the pixels (``models.tiny.dataset.recognition_rate``). The dataset is drawn once
into a pool by --workers processes (float16, indices wrapping around past --pool images), so the GPU is not
starved; with a pool at least steps x batch large the batches are exactly those of the training CLI.

The table in docs/DEMO.md ("How the recipe was chosen") came from one H200 run of:
  PYTHONPATH=. python3 benchmarks/tiny_recipes.py --out $OUT
(its default recipes; 550 s). A GPU job: on 2 CPU cores one recipe takes hours.

examples:
  python benchmarks/tiny_recipes.py --out out/recipes
  python benchmarks/tiny_recipes.py --recipes '[{"name": "w128", "hidden": 128, "batch": 64, "steps": 4000}]'
  python benchmarks/tiny_recipes.py --smoke      # 5 steps of the first recipe on a small pool (a CPU check)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from multiprocessing import get_context

import jax
import numpy as np
from flax import nnx

from models.tiny import dataset
from models.tiny import model as tm
from models.tiny import sampling as ts
from models.tiny import train as tt

DEFAULT_RECIPES = [
    {"name": "w96_b8", "hidden": 96, "batch": 8, "lr": 1e-3, "steps": 1500, "budget": 120},
    {"name": "w96_b32", "hidden": 96, "batch": 32, "lr": 2e-3, "steps": 1500, "budget": 120},
    {"name": "w192_b32", "hidden": 192, "batch": 32, "lr": 1e-3, "steps": 1500, "budget": 120},
    {"name": "w192_b64", "hidden": 192, "batch": 64, "lr": 1e-3, "steps": 6000, "budget": 150},
    {"name": "w256_b64", "hidden": 256, "dd": 3, "ds": 6, "batch": 64, "lr": 7e-4, "steps": 6000, "budget": 150},
]


def _chunk(start: int) -> tuple[np.ndarray, np.ndarray]:
    return dataset.batch(0, start, 1024)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/tiny_recipes.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipes", default=None, help="JSON list of recipes (default: the five of docs/DEMO.md)")
    p.add_argument("--pool", type=int, default=131072, help="images drawn ahead into memory")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="processes drawing the pool")
    p.add_argument("--out", default=None, help="write each recipe's samples (.npy) and EMA checkpoint here")
    p.add_argument("--smoke", action="store_true", help="5 steps of the first recipe, pool of 1024, 12 samples")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    recipes = json.loads(args.recipes) if args.recipes else DEFAULT_RECIPES
    pool_n, samples_per_class = (1024, 1) if args.smoke else (args.pool, 8)
    if args.smoke:
        recipes = [dict(recipes[0], steps=5)]
    t0 = time.perf_counter()
    with get_context("spawn").Pool(max(1, args.workers)) as p:
        parts = p.map(_chunk, range(0, pool_n, 1024))
    images = np.concatenate([x[0] for x in parts])[:pool_n].astype(np.float16)
    labels = np.concatenate([x[1] for x in parts])[:pool_n]
    print(f"pool of {len(images)} images in {time.perf_counter() - t0:.1f} s", flush=True)

    def pool_batch(seed, start, count, size=tm.IMAGE_SIZE):
        idx = np.arange(start, start + count) % len(images)
        return images[idx].astype(np.float32), labels[idx]

    draw = tt.dataset.batch
    tt.dataset.batch = pool_batch  # train() draws through models.tiny.dataset.batch
    try:
        for r in recipes:
            cfg = tm.tiny_flux_config_for(r["hidden"], r.get("dd", 2), r.get("ds", 4))
            tc = tt.TrainConfig(batch=r["batch"], lr=r.get("lr", 1e-3))
            t = time.perf_counter()
            model, hist = tt.train(
                cfg, tc, budget_s=r.get("budget", 600), max_steps=r["steps"], progress=False, log_every=0
            )
            train_s = time.perf_counter() - t
            want = np.tile(np.arange(dataset.NUM_CLASSES), samples_per_class)
            imgs, _ = ts.generate_images(model, want, steps=50, seed=1)
            rate = dataset.recognition_rate(imgs, want)
            n_params = sum(v.size for v in jax.tree.leaves(nnx.state(model)))
            row = dict(r, params=int(n_params), train_s=round(train_s, 1), steps_done=hist["steps"])
            row["loss"] = round(float(np.mean(hist["loss"][-200:])), 5)
            row.update({k: round(float(v), 3) for k, v in rate.items()})
            print(json.dumps(row), flush=True)
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                np.save(os.path.join(args.out, f"{r['name']}_samples.npy"), (imgs * 255).astype(np.uint8))
                tm.save_checkpoint(model, os.path.join(args.out, f"{r['name']}_ckpt"), {"recipe": r, "result": row})
    finally:
        tt.dataset.batch = draw
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
