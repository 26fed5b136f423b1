"""Text to image with FLUX.1 and Chipmunk: ``python -m models.flux.generate``.

The checkpoint is a directory written by ``python -m convert_weights flux-pipeline``. One image is written to
--out; several (more prompts or --num-images) to ``<stem>_<i>.png``, in prompt order then image order. With
--loop, after the first generation further prompts are read from stdin, one per line, and written to
``<stem>-<round>[_<i>].png`` without recompiling the denoising steps (an empty line or EOF ends the loop).

examples:
  python -m models.flux.generate --checkpoint ckpt/flux-dev-pipeline --prompt "a red fox in snow" --out fox.png
  python -m models.flux.generate --checkpoint ckpt/flux-dev-pipeline --prompt "a cat" --prompt "a dog" \\
      --num-images 2 --width 1280 --height 768 --seed 3 --out pets.png
  python -m models.flux.generate --checkpoint ckpt/flux-dev-pipeline --prompt "a cat" --dense --out dense.png
  python -m models.flux.generate --checkpoint ckpt/flux-schnell-pipeline --prompt "a cat" --loop --out cat.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.flux.sample import UsageError, chipmunk_and_size


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m models.flux.generate",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="converted pipeline directory (convert_weights flux-pipeline)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--out", default="out.png", help="output PNG path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50 dev, 4 schnell)")
    p.add_argument("--guidance", type=float, default=3.5, help="embedded guidance scale (dev only)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chipmunk-config", help="reference chipmunk-config.yml (on top of the Flux preset)")
    mode.add_argument("--dense", action="store_true", help="plain dense Flux (no Chipmunk)")
    p.add_argument("--backend", default="auto", help="Chipmunk operator backend: auto, xla, reference, mosaic_gpu")
    p.add_argument("--dtype", default=None, help="transformer compute dtype (default: as stored)")
    p.add_argument(
        "--t5-max-length", type=int, default=None, help="T5 tokens per prompt (default 512 dev, 256 schnell)"
    )
    p.add_argument(
        "--attention-impl",
        default="auto",
        choices=("auto", "xla", "cudnn"),
        help="dense attention; auto: cudnn for bf16/fp16 on a GPU, else xla",
    )
    p.add_argument("--loop", action="store_true", help="then read more prompts from stdin, one per line")
    p.add_argument("--no-progress", action="store_true")
    return p


def prepare(args):
    """Validates everything that can be checked without compute; returns the Chipmunk config (None: dense)."""
    from models.flux.pipeline import check_pipeline_dir

    try:
        check_pipeline_dir(args.checkpoint)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    tok_files = {
        "tokenizer_2": [["tokenizer.json"]],
        "tokenizer": [["tokenizer.json"], ["vocab.json", "merges.txt"]],
    }
    for sub, alternatives in tok_files.items():
        d = Path(args.checkpoint) / sub
        if not any(all((d / f).exists() for f in alt) for alt in alternatives):
            raise UsageError(f"{d} lacks the tokenizer files (one of {[' + '.join(a) for a in alternatives]})")
    if not args.prompt:
        raise UsageError("give at least one --prompt")
    if any(not p.strip() for p in args.prompt):
        raise UsageError("--prompt must not be empty")
    chipmunk = chipmunk_and_size(args)
    for name in ("steps", "num_images", "t5_max_length"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    out_dir = Path(args.out).absolute().parent
    if not out_dir.is_dir():
        raise UsageError(f"output directory {out_dir} does not exist")
    if Path(args.out).suffix.lower() != ".png":
        raise UsageError(f"--out must be a .png path, got {args.out}")
    return chipmunk


def output_paths(out: str, n: int, round_: int | None = None) -> list[Path]:
    """PNG paths of one generation of ``n`` images (see the module docstring)."""
    path = Path(out)
    stem = path.stem if round_ is None else f"{path.stem}-{round_}"
    if n == 1:
        return [path.with_name(stem + path.suffix)]
    return [path.with_name(f"{stem}_{i}{path.suffix}") for i in range(n)]


def _run_once(pipe, args, chipmunk, prompts, impl, round_=None) -> None:
    from PIL import Image

    out = pipe.generate(
        prompts,
        width=args.width,
        height=args.height,
        steps=args.steps,
        seed=args.seed,
        guidance=args.guidance,
        chipmunk=chipmunk,
        num_images=args.num_images,
        backend=args.backend,
        attention_impl=impl,
        progress=not args.no_progress,
    )
    paths = output_paths(args.out, out.images.shape[0], round_)
    for img, path in zip(out.images, paths, strict=True):
        Image.fromarray(img, mode="RGB").save(path)
    cfg = pipe.transformer.cfg
    mode = "dense" if chipmunk is None else "chipmunk"
    steps = args.steps or (50 if cfg.guidance_embed else 4)
    print(f"{mode} FLUX.1-{'dev' if cfg.guidance_embed else 'schnell'} {args.width}x{args.height}, {steps} steps")
    print(out.generation.report.format())
    print("wrote " + ", ".join(str(p) for p in paths))


def main(argv: list[str] | None = None, stdin=None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        chipmunk = prepare(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from models.flux.pipeline import FluxPipeline
    from models.flux.sampling import default_attention_impl

    pipe = FluxPipeline.load(args.checkpoint, dtype=args.dtype, t5_max_length=args.t5_max_length)
    impl = default_attention_impl(pipe.transformer.dtype) if args.attention_impl == "auto" else args.attention_impl
    _run_once(pipe, args, chipmunk, args.prompt, impl)
    if args.loop:
        stdin = stdin or sys.stdin
        round_ = 1
        while True:
            print("prompt> ", end="", flush=True)
            line = stdin.readline()
            if not line.strip():
                break
            _run_once(pipe, args, chipmunk, [line.strip()], impl, round_)
            round_ += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
