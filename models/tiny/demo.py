"""Chipmunk on a real (tiny) trained model, on CPU: ``python -m models.tiny.demo``.

Loads the shipped tiny pixel-space Flux (``models/tiny/checkpoint``), samples one image per class with the same
seed dense and with Chipmunk (the Flux preset, tile sizes scaled to 258 tokens: see
``models.tiny.sampling.tiny_preset``), both through ``models.flux.sampling.generate``, and writes the two grids
side by side to a PNG. Prints the sampler's per-step-kind times and PSNR / SSIM of Chipmunk against dense.

examples:
  python -m models.tiny.demo                       # 50 steps, writes out/tiny_demo.png
  python -m models.tiny.demo --steps 20 --seed 3 --out /tmp/demo.png
"""

from __future__ import annotations

import argparse
import os
import time

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from chipmunk_jax import metrics
from models.tiny import dataset
from models.tiny.model import CHECKPOINT_DIR, load_checkpoint
from models.tiny.sampling import generate_images, tiny_preset

_BG = (255, 255, 255)
_INK = (20, 20, 20)


def image_grid(images: np.ndarray, cols: int, scale: int = 2, pad: int = 4) -> Image.Image:
    """Images [B, S, S, 3] in [0, 1] -> one RGB grid image (``cols`` per row, nearest-neighbour upscaled)."""
    b, s = images.shape[0], images.shape[1] * scale
    rows = -(-b // cols)
    grid = Image.new("RGB", (cols * (s + pad) + pad, rows * (s + pad) + pad), _BG)
    for i, img in enumerate(images):
        tile = Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).resize((s, s), Image.NEAREST)
        r, c = divmod(i, cols)
        grid.paste(tile, (pad + c * (s + pad), pad + r * (s + pad)))
    return grid


def side_by_side(panels: list[tuple[str, Image.Image]], footer: str = "") -> Image.Image:
    """Titled panels next to each other, with an optional footer line."""
    head, foot, gap = 22, 22 if footer else 0, 12
    w = sum(p.width for _, p in panels) + gap * (len(panels) + 1)
    h = max(p.height for _, p in panels) + head + foot
    out = Image.new("RGB", (w, h), _BG)
    draw = ImageDraw.Draw(out)
    x = gap
    for title, p in panels:
        draw.text((x + 4, 5), title, fill=_INK)
        out.paste(p, (x, head))
        x += p.width + gap
    if footer:
        draw.text((gap + 4, h - foot + 4), footer, fill=_INK)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m models.tiny.demo",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", default=str(CHECKPOINT_DIR), help="tiny checkpoint directory (default: the shipped one)")
    p.add_argument("--out", default="out/tiny_demo.png", help="output PNG")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (the Flux preset is tuned for 50)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (the same for dense and Chipmunk)")
    p.add_argument("--backend", default="auto", help="Chipmunk operator backend: auto, xla, reference")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    model, meta = load_checkpoint(args.ckpt)
    labels = np.arange(dataset.NUM_CLASSES)
    config = tiny_preset()
    print(f"model: {meta['num_params'] / 1e6:.2f}M parameters, trained {meta.get('steps')} steps ({args.ckpt})")
    print(f"sampling {len(labels)} classes, {args.steps} steps, seed {args.seed}: dense, then Chipmunk")
    dense, g_dense = generate_images(model, labels, steps=args.steps, seed=args.seed, progress=True)
    chip, g_chip = generate_images(
        model, labels, steps=args.steps, seed=args.seed, chipmunk=config, backend=args.backend, progress=True
    )
    psnr = np.asarray(metrics.psnr(jnp.asarray(chip), jnp.asarray(dense)))
    ssim = np.asarray(metrics.ssim(jnp.asarray(chip), jnp.asarray(dense)))
    print("\n== dense ==\n" + g_dense.report.format())
    print("\n== Chipmunk (Flux preset, tiny tiles) ==\n" + g_chip.report.format())
    speed = g_dense.report.total_s / g_chip.report.total_s
    print(f"\ndenoising time dense / Chipmunk: {speed:.2f}x (compile excluded; CPU, XLA ops)")
    print(
        f"fidelity vs dense: PSNR mean {psnr.mean():.2f} dB (min {psnr.min():.2f}), "
        f"SSIM mean {ssim.mean():.4f} (min {ssim.min():.4f})"
    )
    rec_dense = dataset.recognition_rate(dense, labels)
    rec_chip = dataset.recognition_rate(chip, labels)
    print(
        f"class read back from the pixels (shape and colour right): dense {rec_dense['class']:.0%}, "
        f"Chipmunk {rec_chip['class']:.0%} of {len(labels)} images"
    )
    cols = len(dataset.COLOURS)
    footer = f"{args.steps} steps, seed {args.seed}; PSNR {psnr.mean():.1f} dB, SSIM {ssim.mean():.3f} vs dense"
    png = side_by_side(
        [("dense", image_grid(dense, cols)), ("Chipmunk (flux preset)", image_grid(chip, cols))], footer=footer
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    png.save(args.out)
    print(f"rows: {', '.join(dataset.SHAPES)}; columns: {', '.join(dataset.COLOURS)}")
    print(f"wrote {args.out} ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
