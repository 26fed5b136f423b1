"""Fidelity and speed of Chipmunk against the dense model: ``python -m chipmunk_jax.evaluate``.

For a model and checkpoint, samples the same seeds dense and with a Chipmunk config and reports, against dense:
PSNR and SSIM of the final images, the relative L2 error of the latents after every denoising step, the
achieved attention / MLP sparsity, and the denoising time (compile excluded). ``--sweep-top-keys`` repeats the
Chipmunk run for several attention ``top_keys`` and writes a markdown table and a PNG plot.

Supported models (``--model``):
  tiny   the pixel-space tiny Flux of ``models.tiny`` (default checkpoint: the shipped ``models/tiny/checkpoint``;
         ``--random-weights`` for a randomly initialised small one). Presets are scaled to its token count by
         ``models.tiny.sampling.tiny_preset``.
Other models plug in through ``EvalModel`` (``sample(seed, chipmunk) -> Trajectory`` and ``adapt(config)``)
and an entry in ``MODELS``; a FLUX.1 entry needs a VAE decode and prompt embeddings, which are not wired yet.

examples:
  python -m chipmunk_jax.evaluate                                   # shipped tiny model, Flux preset
  python -m chipmunk_jax.evaluate --config chipmunk-config.yml      # a reference YAML on top of the preset
  python -m chipmunk_jax.evaluate --sweep-top-keys 0.05,0.1,0.165,0.3,0.5 --out-dir out/eval
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np

from chipmunk_jax import metrics
from chipmunk_jax.config import ChipmunkConfig, load_config, preset


class EvalModel(Protocol):
    """What ``evaluate`` needs from a model family."""

    name: str

    def adapt(self, config: ChipmunkConfig) -> ChipmunkConfig:
        """The config as this model runs it (e.g. tile sizes scaled to its token count)."""
        ...

    def sample(self, seed: int, chipmunk: ChipmunkConfig | None) -> Any:
        """One generation: an object with ``images`` [B, H, W, 3] in [0, 1], per-step ``latents``
        [steps, B, ...] and the sampler ``report``."""
        ...


@dataclasses.dataclass
class TinyEvalModel:
    """The tiny pixel-space Flux (``models.tiny``): one image per label per seed."""

    model: Any
    labels: np.ndarray
    steps: int
    backend: str = "auto"
    name: str = "tiny"

    def adapt(self, config: ChipmunkConfig) -> ChipmunkConfig:
        from models.tiny.sampling import tiny_preset

        return tiny_preset(config)

    def sample(self, seed: int, chipmunk: ChipmunkConfig | None):
        from models.tiny.sampling import sample_trajectory

        return sample_trajectory(
            self.model, self.labels, steps=self.steps, seed=seed, chipmunk=chipmunk, backend=self.backend
        )


def _tiny(args) -> TinyEvalModel:
    from models.tiny import dataset
    from models.tiny.model import CHECKPOINT_DIR, load_checkpoint, tiny_flux_config_for

    if args.random_weights:
        from flax import nnx

        from models.flux.model import Flux

        # Flux's own random init (not the adaLN-zero training init, whose output is identically zero).
        model = Flux(tiny_flux_config_for(32, 1, 2), rngs=nnx.Rngs(args.seeds[0]), dtype=jnp.float32)
    else:
        model, _ = load_checkpoint(args.ckpt or CHECKPOINT_DIR)
    n = dataset.NUM_CLASSES if args.images is None else args.images
    return TinyEvalModel(model, np.arange(n) % dataset.NUM_CLASSES, args.steps, args.backend)


MODELS: dict[str, Callable[[argparse.Namespace], EvalModel]] = {"tiny": _tiny}


@dataclasses.dataclass
class Row:
    """Chipmunk against dense for one config, over all seeds."""

    label: str
    top_keys: float
    psnr_mean: float
    psnr_min: float
    ssim_mean: float
    ssim_min: float
    step_rel_err: list[float]
    attn_sparsity: float | None
    mlp_sparsity: float | None
    dense_s: float
    chipmunk_s: float
    dense_step_ms: float
    chipmunk_step_ms: dict[str, float]

    @property
    def speedup(self) -> float:
        return self.dense_s / self.chipmunk_s


def compare(em: EvalModel, config: ChipmunkConfig, seeds: Sequence[int], dense: dict[int, Any], label: str) -> Row:
    """Samples every seed with ``config`` and compares with the dense generations ``dense[seed]``."""
    psnr, ssim, errs, chip_s, dense_s = [], [], [], 0.0, 0.0
    stats: dict[str, list[float]] = {}
    kinds: dict[str, list[float]] = {}
    dense_steps: list[float] = []
    for seed in seeds:
        c = em.sample(seed, config)
        d = dense[seed]
        psnr.append(np.asarray(metrics.psnr(jnp.asarray(c.images), jnp.asarray(d.images))))
        ssim.append(np.asarray(metrics.ssim(jnp.asarray(c.images), jnp.asarray(d.images))))
        pairs = zip(c.latents, d.latents, strict=True)
        errs.append(np.stack([np.asarray(metrics.relative_l2(jnp.asarray(a), jnp.asarray(b))) for a, b in pairs]))
        chip_s += c.report.total_s
        dense_s += d.report.total_s
        dense_steps += [t for ts in d.report.step_times.values() for t in ts]
        for k, ts in c.report.step_times.items():
            kinds.setdefault(k, []).extend(ts)
        for k, v in c.report.stats.items():
            stats.setdefault(k, []).append(v)
    p, s = np.concatenate(psnr), np.concatenate(ssim)
    e = np.concatenate(errs, axis=1).mean(axis=1)
    return Row(
        label=label,
        top_keys=config.attn.top_keys,
        psnr_mean=float(p.mean()),
        psnr_min=float(p.min()),
        ssim_mean=float(s.mean()),
        ssim_min=float(s.min()),
        step_rel_err=[float(x) for x in e],
        attn_sparsity=float(np.mean(stats["attention sparsity"])) if "attention sparsity" in stats else None,
        mlp_sparsity=float(np.mean(stats["mlp sparsity"])) if "mlp sparsity" in stats else None,
        dense_s=dense_s,
        chipmunk_s=chip_s,
        dense_step_ms=1e3 * float(np.mean(dense_steps)),
        chipmunk_step_ms={k: 1e3 * float(np.mean(v)) for k, v in kinds.items()},
    )


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(rows: Sequence[Row]) -> str:
    """The results as a markdown table (one row per config)."""
    head = (
        "| config | attn top_keys | attn sparsity | mlp sparsity | PSNR dB (mean / min) | SSIM (mean / min) "
        "| latent rel. err (final / max step) | dense s | chipmunk s | speedup |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.top_keys:g} | {_fmt(r.attn_sparsity, '.3f')} | {_fmt(r.mlp_sparsity, '.3f')} "
            f"| {r.psnr_mean:.2f} / {r.psnr_min:.2f} | {r.ssim_mean:.4f} / {r.ssim_min:.4f} "
            f"| {r.step_rel_err[-1]:.4f} / {max(r.step_rel_err):.4f} | {r.dense_s:.2f} | {r.chipmunk_s:.2f} "
            f"| {r.speedup:.2f}x |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Plotting with Pillow alone (no matplotlib dependency).

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_plot(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    size: tuple[int, int] = (480, 360),
    log_y: bool = False,
):
    """A line chart of (name, xs, ys) series as a PIL image, with axes, ticks and a legend.

    Non-finite y values (e.g. an infinite PSNR) are left out.
    """
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 58, 12, 26, 40
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)

    def tr(y):
        return np.log10(y) if log_y else y

    def ok(y):
        return np.isfinite(y) and (y > 0 or not log_y)

    pts = [(x, tr(y)) for _, xs, ys in series for x, y in zip(xs, ys, strict=True) if ok(y)]
    if not pts:
        pts = [(0.0, 0.0), (1.0, 1.0)]
    xs_all, ys_all = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    x0, x1 = float(xs_all.min()), float(xs_all.max())
    y0, y1 = float(ys_all.min()), float(ys_all.max())
    x1, y1 = (x1 if x1 > x0 else x0 + 1.0), (y1 if y1 > y0 else y0 + 1.0)
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return left + (x - x0) / (x1 - x0) * (w - left - right), top + (y1 - y) / (y1 - y0) * (h - top - bottom)

    ink = (30, 30, 30)
    draw.rectangle([left, top, w - right, h - bottom], outline=ink)
    for i in range(5):
        xv = x0 + (x1 - x0) * i / 4
        yv = y0 + (y1 - y0) * i / 4
        gx, _ = px(xv, y0)
        _, gy = px(x0, yv)
        draw.line([gx, h - bottom, gx, h - bottom + 4], fill=ink)
        draw.text((gx - 12, h - bottom + 6), f"{xv:.3g}", fill=ink)
        draw.line([left - 4, gy, left, gy], fill=ink)
        draw.text((4, gy - 6), f"{10**yv:.3g}" if log_y else f"{yv:.3g}", fill=ink)
    draw.text((left, 6), title, fill=ink)
    draw.text(((w - left) // 2, h - 16), xlabel, fill=ink)
    draw.text((left + 4, top + 2), ylabel, fill=(90, 90, 90))
    for i, (name, xs, ys) in enumerate(series):
        col = _PALETTE[i % len(_PALETTE)]
        good = [px(x, tr(y)) for x, y in zip(xs, ys, strict=True) if ok(y)]
        if len(good) > 1:
            draw.line(good, fill=col, width=2)
        for gx, gy in good:
            draw.ellipse([gx - 3, gy - 3, gx + 3, gy + 3], fill=col)
        draw.text((w - right - 110, h - bottom - 14 * (len(series) - i)), name, fill=col)
    return img


def sweep_plot(rows: Sequence[Row], path: str) -> None:
    """Two panels: PSNR against attention top_keys, and the per-step latent error of every config."""
    from PIL import Image

    left = line_plot(
        [("PSNR (mean)", [r.top_keys for r in rows], [r.psnr_mean for r in rows])],
        title="Chipmunk vs dense: PSNR",
        xlabel="attn top_keys",
        ylabel="dB",
    )
    right = line_plot(
        [(f"top_keys {r.top_keys:g}", list(range(len(r.step_rel_err))), r.step_rel_err) for r in rows],
        title="latent relative L2 error per step",
        xlabel="step",
        ylabel="rel. err",
        log_y=True,
    )
    out = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), (255, 255, 255))
    out.paste(left, (0, 0))
    out.paste(right, (left.width, 0))
    out.save(path)


# ---------------------------------------------------------------------------------------------------------


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m chipmunk_jax.evaluate",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--ckpt", default=None, help="checkpoint (tiny: default the shipped models/tiny/checkpoint)")
    p.add_argument("--random-weights", action="store_true", help="a small randomly initialised model (checks)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="flux", help="Chipmunk preset name (default: flux)")
    src.add_argument("--config", default=None, help="reference chipmunk-config.yml, applied on top of the Flux preset")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seeds", type=_ints, default=[0, 1], help="comma-separated seeds (default 0,1)")
    p.add_argument("--images", type=int, default=None, help="images per seed (tiny: default one per class)")
    p.add_argument("--sweep-top-keys", type=_floats, default=None, help="comma-separated attention top_keys")
    p.add_argument("--backend", default="auto", help="Chipmunk operator backend: auto, xla, reference")
    p.add_argument("--out-dir", default="out/evaluate", help="where the table, JSON and plot are written")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    em = MODELS[args.model](args)
    base = load_config(args.config, base="flux") if args.config else preset(args.preset)
    base = em.adapt(base)
    configs = [("preset" if not args.config else os.path.basename(args.config), base)]
    if args.sweep_top_keys:
        configs = [
            (f"top_keys={k:g}", base.replace(attn=dataclasses.replace(base.attn, top_keys=k)))
            for k in args.sweep_top_keys
        ]
    print(f"model {em.name}: {args.steps} steps, seeds {args.seeds}; dense reference first", flush=True)
    dense = {seed: em.sample(seed, None) for seed in args.seeds}
    rows = []
    for label, cfg in configs:
        row = compare(em, cfg, args.seeds, dense, label)
        rows.append(row)
        print(
            f"{label}: PSNR {row.psnr_mean:.2f} dB, SSIM {row.ssim_mean:.4f}, attn sparsity "
            f"{_fmt(row.attn_sparsity, '.3f')}, mlp sparsity {_fmt(row.mlp_sparsity, '.3f')}, "
            f"speedup {row.speedup:.2f}x",
            flush=True,
        )
    table = markdown_table(rows)
    print("\n" + table)
    if len(rows) == 1:
        r = rows[0]
        print(
            f"\ndense step: {r.dense_step_ms:.1f} ms; Chipmunk steps by kind (ms): "
            + ", ".join(f"{k} {v:.1f}" for k, v in r.chipmunk_step_ms.items())
        )
        print("latent relative error after each step: " + " ".join(f"{e:.2e}" for e in r.step_rel_err))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(
            {"args": {k: v for k, v in vars(args).items()}, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=2
        )
    sweep_plot(rows, os.path.join(args.out_dir, "plot.png"))
    print(f"wrote {args.out_dir}/table.md, results.json, plot.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
