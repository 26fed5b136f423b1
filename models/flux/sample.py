"""Sample FLUX.1 latents with Chipmunk: ``python -m models.flux.sample``.

Prompt embeddings come from an .npz with two arrays:
  ``t5``           [B, L, 4096] T5-XXL token embeddings (L = 512 for dev, 256 for schnell, any L works),
  ``clip_pooled``  [B, 768] pooled CLIP-L embedding.
B = 1 is repeated to --batch. The output .npy holds the final latents in VAE layout [B, 16, H/8, W/8]
(unscaled: apply the Flux VAE's scaling/shift factors before decoding, as diffusers does).

examples:
  # 1280x768, 50 steps, Chipmunk with the Flux preset (reference defaults):
  python -m models.flux.sample --ckpt ckpt/flux-dev --embeddings prompt.npz --out latents.npy
  # the reference YAML config, or the dense model for comparison:
  python -m models.flux.sample --ckpt ckpt/flux-dev --embeddings prompt.npz --chipmunk-config chipmunk-config.yml
  python -m models.flux.sample --ckpt ckpt/flux-dev --embeddings prompt.npz --dense
  # no checkpoint: full architecture with random weights (or a tiny one, for a quick CPU check)
  python -m models.flux.sample --random-weights --width 1280 --height 768 --steps 50
  python -m models.flux.sample --random-weights --tiny --width 256 --height 256 --steps 12
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from models.video_io import UsageError, add_compute_arguments, attention_impl, exits_on_usage_error

EMB_T5, EMB_POOLED = "t5", "clip_pooled"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m models.flux.sample",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="converted checkpoint directory (python -m convert_weights flux ...)")
    src.add_argument("--random-weights", action="store_true", help="random weights, no checkpoint")
    p.add_argument("--variant", choices=("dev", "schnell"), default="dev", help="architecture for --random-weights")
    p.add_argument("--tiny", action="store_true", help="with --random-weights: a tiny config (CPU checks)")
    p.add_argument("--embeddings", help=f"prompt embeddings .npz with '{EMB_T5}' and '{EMB_POOLED}' arrays")
    p.add_argument("--txt-len", type=int, default=512, help="text tokens of random embeddings (no --embeddings)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50 dev, 4 schnell)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=3.5, help="embedded guidance scale (dev only)")
    p.add_argument("--batch", type=int, default=None, help="images per call (default: the embeddings' batch)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chipmunk-config", help="reference chipmunk-config.yml (on top of the Flux preset)")
    mode.add_argument("--dense", action="store_true", help="plain dense Flux (no Chipmunk)")
    add_compute_arguments(p)
    p.add_argument("--out", default="latents.npy", help="output .npy of the final latents [B, 16, H/8, W/8]")
    p.add_argument("--no-progress", action="store_true")
    return p


def _model_config(args):
    from models.flux.config import CONFIGS, tiny_config
    from models.flux.load import read_flux_manifest

    if args.ckpt:
        if args.tiny:
            raise UsageError("--tiny only goes with --random-weights")
        from models.flux.config import FluxConfig

        try:
            manifest = read_flux_manifest(args.ckpt)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from e
        return FluxConfig.from_dict(manifest["config"]), manifest["dtype"]
    cfg = tiny_config(guidance_embed=args.variant == "dev") if args.tiny else CONFIGS[args.variant]
    return cfg, "bfloat16"


def _embeddings(args, cfg):
    if args.embeddings is None:
        if not args.random_weights:
            raise UsageError("--embeddings is required with --ckpt")
        b = args.batch or 1
        rng = np.random.default_rng(args.seed)
        return (
            rng.standard_normal((b, args.txt_len, cfg.context_dim)).astype(np.float32),
            rng.standard_normal((b, cfg.vec_dim)).astype(np.float32),
        )
    if not os.path.exists(args.embeddings):
        raise UsageError(f"embeddings file {args.embeddings} does not exist")
    with np.load(args.embeddings) as data:
        missing = [k for k in (EMB_T5, EMB_POOLED) if k not in data]
        if missing:
            raise UsageError(f"{args.embeddings} lacks {missing}; it has {sorted(data.files)}")
        t5, pooled = data[EMB_T5], data[EMB_POOLED]
    if t5.ndim != 3 or t5.shape[2] != cfg.context_dim:
        raise UsageError(f"'{EMB_T5}' must be [B, L, {cfg.context_dim}], got {t5.shape}")
    if pooled.shape != (t5.shape[0], cfg.vec_dim):
        raise UsageError(
            f"'{EMB_POOLED}' must be [{t5.shape[0]}, {cfg.vec_dim}] (batch of '{EMB_T5}'), got {pooled.shape}"
        )
    b = args.batch or t5.shape[0]
    if t5.shape[0] not in (1, b):
        raise UsageError(f"--batch {b} does not match the embeddings' batch {t5.shape[0]} (use 1 or {t5.shape[0]})")
    if t5.shape[0] == 1 and b > 1:
        t5, pooled = np.repeat(t5, b, 0), np.repeat(pooled, b, 0)
    return t5.astype(np.float32), pooled.astype(np.float32)


def chipmunk_and_size(args):
    """The Chipmunk config of --dense / --chipmunk-config (None = dense), after checking --width/--height."""
    import chipmunk_jax
    from models.flux.sampling import check_size

    chipmunk = None
    if not args.dense:
        if args.chipmunk_config:
            if not os.path.exists(args.chipmunk_config):
                raise UsageError(f"chipmunk config {args.chipmunk_config} does not exist")
            chipmunk = chipmunk_jax.load_config(args.chipmunk_config, base="flux")
        else:
            chipmunk = chipmunk_jax.preset("flux")
    patchify_on = chipmunk is not None and chipmunk.patchify.is_enabled
    try:
        check_size(args.width, args.height, patchify_on, chipmunk.patchify.chunk_size_1 if chipmunk else 8)
    except ValueError as e:
        raise UsageError(str(e)) from e
    return chipmunk


def prepare(args):
    """Validates everything that can be checked without compute; returns (cfg, dtype, chipmunk, t5, pooled)."""

    cfg, dtype = _model_config(args)
    chipmunk = chipmunk_and_size(args)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    t5, pooled = _embeddings(args, cfg)
    return cfg, (args.dtype or dtype), chipmunk, t5, pooled


def random_model(cfg, dtype, seed: int = 0):
    """A Flux with random weights, initialised on the device in one jitted call."""
    import jax.numpy as jnp
    from flax import nnx

    from models.flux.model import Flux

    @nnx.jit
    def make():
        return Flux(cfg, rngs=nnx.Rngs(seed), dtype=jnp.dtype(dtype))

    return make()


@exits_on_usage_error
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a command-line mistake, printed as ``error: ...``)."""
    args = build_parser().parse_args(argv)
    cfg, dtype, chipmunk, t5, pooled = prepare(args)
    import jax.numpy as jnp

    from models.flux.load import load
    from models.flux.sampling import generate

    model = load(args.ckpt, dtype=dtype) if args.ckpt else random_model(cfg, dtype, args.seed)
    impl = attention_impl(args.attention_impl, model.dtype)
    steps = args.steps or (50 if cfg.guidance_embed else 4)
    gen = generate(
        model,
        jnp.asarray(t5),
        jnp.asarray(pooled),
        width=args.width,
        height=args.height,
        steps=steps,
        seed=args.seed,
        guidance=args.guidance,
        chipmunk=chipmunk,
        backend=args.backend,
        attention_impl=impl,
        progress=not args.no_progress,
    )
    np.save(args.out, np.asarray(gen.latents, np.float32))
    mode = "dense" if chipmunk is None else "chipmunk"
    print(f"{mode} FLUX.1-{'dev' if cfg.guidance_embed else 'schnell'} {args.width}x{args.height}, {steps} steps")
    print(gen.report.format())
    print(f"wrote {args.out} {tuple(gen.latents.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
