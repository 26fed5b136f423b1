"""Generate a Mochi 1 text-to-video clip with Chipmunk: ``python -m models.mochi.generate``.

Writes OUT_DIR/latents.npy (final latents [B, 12, (frames-1)/6+1, H/8, W/8], the transformer's normalised latent
space), OUT_DIR/report.txt and OUT_DIR/report.json (settings, per-step-kind times, compile time, attention
sparsity, cache memory, the text groups) always; with a VAE (--vae or --random-vae) also the decoded video:
OUT_DIR/video_<b>.mp4 through imageio-ffmpeg, or OUT_DIR/frames_<b>/NNNN.png with --png or when imageio-ffmpeg
is not installed (--no-decode: latents only even with a VAE).

Prompt embeddings, one of:
  --embeddings FILE.npz   arrays 'prompt_embeds' [B, L, 4096] and 'prompt_attention_mask' [B, L], and (for
                          guidance > 1) 'negative_prompt_embeds' [1 or B, L', 4096] and
                          'negative_prompt_attention_mask' [1 or B, L']: T5-XXL last hidden states and the
                          tokenizer masks, as diffusers' MochiPipeline.encode_prompt returns them (L = 256);
  --prompt TEXT           needs T5-XXL v1.1 (--t5: a converted directory with manifest model 't5', e.g. the
                          text_encoder_t5/ of a converted FLUX.1 pipeline, or the Mochi release's text_encoder/
                          safetensors folder, converted in memory at start-up) and a tokenizer directory with
                          tokenizer.json (--tokenizer, the release's tokenizer/); 256 tokens with the mask;
  neither                 only with --random-weights: random embeddings.

Frames must be 6k+1 and height/width multiples of 16 (checked before any compute). Mochi 1 was trained for
848x480 and up to 163 frames (5.4 s at 30 fps); the schedule is genmo's linear-quadratic one (64 steps, CFG 4.5).
With Chipmunk (the default, the 'mochi' preset) a prompt and negative prompt of different token counts run as
two exact model calls per step (--text-groups split); --text-groups pad makes it one call, approximately.

examples:
  # Mochi 1 preview, 163 frames at 848x480, 64 steps, CFG 4.5, Chipmunk with the Mochi preset:
  python -m models.mochi.generate --checkpoint ckpt/mochi --vae ckpt/mochi-vae --embeddings prompt.npz \\
      --frames 163 --size 848x480 --out-dir out/
  # from a prompt (T5-XXL + tokenizer from the release), the dense model for comparison:
  python -m models.mochi.generate --checkpoint ckpt/mochi --prompt "a chipmunk eating a nut" \\
      --t5 mochi-1-preview/text_encoder --tokenizer mochi-1-preview/tokenizer --vae ckpt/mochi-vae --dense
  # no checkpoints: a tiny random model and VAE on CPU (seconds)
  python -m models.mochi.generate --random-weights --tiny --random-vae --frames 7 --size 32x32 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from models.video_io import (
    UsageError,
    add_model_arguments,
    add_output_arguments,
    attention_impl,
    check_grid,
    check_prompt_args,
    check_vae_dir,
    check_video_args,
    chipmunk_from_args,
    exits_on_usage_error,
    optional_module,
    output_dir,
    random_module,
    report_json,
    save_outputs,
    vae_from_args,
    write_decoded,
)

EMB_COND, MASK_COND = "prompt_embeds", "prompt_attention_mask"
EMB_UNCOND, MASK_UNCOND = "negative_prompt_embeds", "negative_prompt_attention_mask"
TEXT_LEN = 256  # T5 tokens of diffusers' MochiPipeline (max_sequence_length)
FPS = 30  # Mochi 1 videos are 30 frames per second


def tiny_model_config():
    """The transformer config of ``--random-weights --tiny``: 12 latent channels, so the tiny VAE can decode."""
    from models.mochi.config import tiny_config

    return tiny_config(num_layers=2, in_channels=12, out_channels=12)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m models.mochi.generate",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="converted transformer directory (python -m convert_weights mochi ...)")
    src.add_argument("--random-weights", action="store_true", help="random transformer weights, no checkpoint")
    p.add_argument("--tiny", action="store_true", help="with --random-weights: a tiny config (CPU checks)")
    txt = p.add_mutually_exclusive_group()
    txt.add_argument("--embeddings", help=f"prompt embeddings .npz ('{EMB_COND}', '{MASK_COND}', negatives)")
    txt.add_argument("--prompt", help="text prompt (needs --t5 and --tokenizer)")
    p.add_argument("--negative-prompt", default="", help="with --prompt: the CFG negative prompt (diffusers: '')")
    p.add_argument("--t5", help="T5-XXL v1.1 encoder: converted directory, or a transformers safetensors folder")
    p.add_argument("--tokenizer", help="directory with the T5 tokenizer.json")
    p.add_argument("--frames", type=int, default=163, help="video frames, 6k+1 (default 163)")
    p.add_argument("--size", default="848x480", help="WIDTHxHEIGHT in pixels, multiples of 16 (default 848x480)")
    p.add_argument("--steps", type=int, default=64, help="denoising steps, >= 2 (default 64)")
    p.add_argument("--guidance", type=float, default=4.5, help="CFG scale; <= 1 disables CFG (default 4.5)")
    add_model_arguments(p, "Mochi")
    p.add_argument(
        "--text-groups",
        default="split",
        choices=("split", "pad"),
        help="Chipmunk with prompts of different token counts: one exact call per count (split, default) or one "
        "call padding every prompt to the longest (pad, approximate)",
    )
    vae = p.add_mutually_exclusive_group()
    vae.add_argument("--vae", help="converted Mochi VAE directory (python -m convert_weights mochi-vae ...)")
    vae.add_argument("--random-vae", action="store_true", help="a random VAE (tiny with --tiny) to test decoding")
    p.add_argument("--no-decode", action="store_true", help="write latents only, even with a VAE")
    p.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles (diffusers' enable_tiling)")
    add_output_arguments(p, fps=FPS, out_dir="mochi_out")
    return p


def _model_config(args):
    from models.mochi.config import MOCHI_1_PREVIEW

    if args.checkpoint:
        if args.tiny:
            raise UsageError("--tiny only goes with --random-weights")
        try:
            from models.mochi.load import load_config
        except ImportError:
            raise UsageError("models.mochi.load is not available in this installation: use --random-weights") from None
        try:
            return load_config(args.checkpoint), None
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from e
    return (tiny_model_config() if args.tiny else MOCHI_1_PREVIEW), "bfloat16"


def _check_pair(emb: np.ndarray, mask: np.ndarray, names: tuple[str, str], dim: int, batch: int | None):
    want = f"[{'1 or ' + str(batch) if batch else 'B'}, L, {dim}]"
    if emb.ndim != 3 or emb.shape[2] != dim or (batch is not None and emb.shape[0] not in (1, batch)):
        raise UsageError(f"'{names[0]}' must be {want}, got {emb.shape}")
    if mask.shape != emb.shape[:2]:
        raise UsageError(f"'{names[1]}' must be {emb.shape[:2]} (one flag per token of '{names[0]}'), got {mask.shape}")


def _embeddings(args, cfg, use_cfg: bool):
    """(cond [B, L, D], mask [B, L], uncond [1|B, L', D] or None, its mask) as numpy, or None for --prompt."""
    if check_prompt_args(args, ("t5", "tokenizer"), "T5-XXL and its tokenizer"):
        return None
    if args.embeddings is None:
        rng = np.random.default_rng(args.seed)
        b = args.batch or 1
        length, valid = (8, 5) if args.tiny else (TEXT_LEN, 24)
        cond = rng.standard_normal((b, length, cfg.text_dim)).astype(np.float32)
        uncond = rng.standard_normal((1, length, cfg.text_dim)).astype(np.float32)
        slots = np.arange(length)[None]
        # A prompt of `valid` tokens and the empty negative prompt (T5's "</s>" alone), as diffusers encodes "".
        return cond, np.repeat(slots < valid, b, 0), uncond, slots < 1
    if not os.path.exists(args.embeddings):
        raise UsageError(f"embeddings file {args.embeddings} does not exist")
    with np.load(args.embeddings) as data:
        missing = [k for k in (EMB_COND, MASK_COND) if k not in data]
        if missing:
            raise UsageError(f"{args.embeddings} lacks {missing}; it has {sorted(data.files)}")
        cond, mask = data[EMB_COND].astype(np.float32), data[MASK_COND].astype(bool)
        uncond = umask = None
        if EMB_UNCOND in data:
            if MASK_UNCOND not in data:
                raise UsageError(f"{args.embeddings} has '{EMB_UNCOND}' but not '{MASK_UNCOND}'")
            uncond, umask = data[EMB_UNCOND].astype(np.float32), data[MASK_UNCOND].astype(bool)
    _check_pair(cond, mask, (EMB_COND, MASK_COND), cfg.text_dim, None)
    if use_cfg and uncond is None:
        raise UsageError(f"guidance {args.guidance} > 1 needs '{EMB_UNCOND}' in {args.embeddings} (or --guidance 1)")
    b = args.batch or cond.shape[0]
    if cond.shape[0] not in (1, b):
        raise UsageError(f"--batch {b} does not match the embeddings' batch {cond.shape[0]}")
    if uncond is not None:
        _check_pair(uncond, umask, (EMB_UNCOND, MASK_UNCOND), cfg.text_dim, b)
    if cond.shape[0] == 1 and b > 1:
        cond, mask = np.repeat(cond, b, 0), np.repeat(mask, b, 0)
    return cond, mask, uncond, umask


def _vae_module():
    """The models.vae.mochi_vae module, or None when it is not in this installation."""
    return optional_module("models.vae.mochi_vae")


def _wants_decode(args) -> bool:
    return bool(args.vae or args.random_vae) and not args.no_decode


def prepare(args):
    """Checks everything that needs no compute; returns (cfg, dtype, chipmunk, (width, height), embeddings)."""
    from models.mochi.sampling import latent_size
    from models.mochi.transformer import post_patch_grid

    width, height, latent = check_video_args(args, latent_size, {"steps": 2, "batch": 1, "fps": 1})
    if _wants_decode(args) and _vae_module() is None:
        raise UsageError("models.vae.mochi_vae is not available in this installation: use --no-decode (latents only)")
    cfg, dtype = _model_config(args)
    check_grid(post_patch_grid, cfg, latent)
    if args.vae:
        check_vae_dir(
            args.vae, model="mochi_vae", name="a Mochi VAE", channels_key="latent_channels", channels=cfg.out_channels
        )
    chipmunk = chipmunk_from_args(args, "mochi", "Mochi")
    emb = _embeddings(args, cfg, args.guidance > 1.0)
    return cfg, (args.dtype or dtype), chipmunk, (width, height), emb


def random_model(cfg, dtype, seed: int = 0, *, host: bool | None = None):
    """A MochiTransformer3D with random weights: numpy draws for small models (``host``, default under 100M
    parameters: compiling jax.random initialisers costs far more on a CPU), else one jitted initialisation."""
    import jax.numpy as jnp
    from flax import nnx

    from models.mochi.transformer import MochiTransformer3D

    make = lambda: MochiTransformer3D(cfg, rngs=nnx.Rngs(seed), dtype=jnp.dtype(dtype))  # noqa: E731
    if host is None:
        host = cfg.num_layers * (4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_dim) < 100_000_000
    return random_module(make, seed, host=host)


def load_t5(path: str | os.PathLike, dtype=None):
    """T5-XXL v1.1 encoder from a converted directory (manifest model 't5') or a transformers safetensors folder.

    Args:
      path: ``DIR/manifest.json`` present: a converted checkpoint (e.g. a converted FLUX.1 pipeline's
        ``text_encoder_t5/``, the same encoder); otherwise a ``T5EncoderModel`` folder (the Mochi release's
        ``text_encoder/``), converted in memory through ``convert_weights.t5``.
      dtype: parameter and compute dtype (default: as stored; bfloat16 for a safetensors folder).
    """
    import jax.numpy as jnp
    from flax import nnx

    from convert_weights import common
    from models.text_encoders.t5 import T5Config, T5Encoder

    path = Path(path)
    if (path / common.MANIFEST).exists():
        manifest = common.read_manifest(path)
        if manifest.get("model") != "t5":
            raise ValueError(f"{path} holds a {manifest.get('model')!r} checkpoint, not a T5 encoder ('t5')")
        cfg = T5Config(**manifest["config"])
        dt = jnp.dtype(dtype if dtype is not None else manifest["dtype"])
        abstract = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt))
        return common.fill_module(abstract, common.read_checkpoint(path), where=str(path))
    from convert_weights.t5 import convert_t5, t5_config_from_weights

    source = common.SafetensorsSource(common.find_source_files(path))
    weights = {k: source.get(k) for k in source.keys()}
    hf_path = path / "config.json"
    hf = json.loads(hf_path.read_text()) if hf_path.exists() else {}
    cfg = t5_config_from_weights(
        weights, max_distance=hf.get("relative_attention_max_distance", 128), eps=hf.get("layer_norm_epsilon", 1e-6)
    )
    dt = jnp.dtype(dtype if dtype is not None else jnp.bfloat16)
    return convert_t5(weights, cfg, dtype=dt, param_dtype=dt)


def encode_prompts(encoder, tokenizer, prompts: list[str]):
    """(T5 embeddings [B, L, D] float32, mask [B, L] bool) as diffusers' MochiPipeline: the encoder runs with the
    tokenizer's attention mask and the mask goes to the transformer (nothing is zeroed).

    Args:
      encoder: ``models.text_encoders.t5.T5Encoder`` (T5-XXL v1.1).
      tokenizer: ``models.text_encoders.tokenizers.TextTokenizer`` padding to 256 tokens.
      prompts: the prompts.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    tok = tokenizer(prompts)
    graphdef, state = nnx.split(encoder)
    run = jax.jit(lambda s, ids, m: nnx.merge(graphdef, s)(ids, m))
    hidden = run(state, jnp.asarray(tok.input_ids), jnp.asarray(tok.attention_mask))
    return np.asarray(hidden.astype(jnp.float32)), np.asarray(tok.attention_mask) != 0


def _prompt_embeddings(args, batch: int):
    from models.text_encoders.tokenizers import load_t5_tokenizer

    encoder = load_t5(args.t5)
    tokenizer = load_t5_tokenizer(args.tokenizer, TEXT_LEN)
    cond, mask = encode_prompts(encoder, tokenizer, [args.prompt] * batch)
    uncond, umask = encode_prompts(encoder, tokenizer, [args.negative_prompt])
    return cond, mask, uncond, umask


def _decode(args, cfg, latents):
    import dataclasses

    from flax import nnx

    mochi_vae = _vae_module()
    vcfg = mochi_vae.MochiVAEConfig.tiny_config() if args.tiny else mochi_vae.MOCHI_VAE
    vcfg = dataclasses.replace(vcfg, with_encoder=False)
    make = lambda: mochi_vae.MochiVAE(vcfg, rngs=nnx.Rngs(args.seed))  # noqa: E731
    vae = vae_from_args(args, mochi_vae.load, make, "latent_channels", cfg.out_channels)
    tiling = mochi_vae.MochiTiling() if args.vae_tiling else None
    return mochi_vae.decode(vae, latents, unnormalize=True, clip=True, tiling=tiling)


def _report_json(args, gen, chipmunk, width: int, height: int) -> dict:
    return {
        "model": "tiny random" if args.tiny else (args.checkpoint or "mochi-1-preview random"),
        **report_json(
            args,
            gen,
            chipmunk,
            width,
            height,
            text_groups=[{"rows": list(g.rows), "text_len": g.text_len} for g in gen.groups],
            denoising_s=gen.report.total_s,
        ),
    }


@exits_on_usage_error
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a command-line mistake, printed as ``error: ...``)."""
    args = build_parser().parse_args(argv)
    cfg, dtype, chipmunk, (width, height), emb = prepare(args)
    from models.mochi.sampling import generate

    out = output_dir(args.out_dir)
    if emb is None:
        emb = _prompt_embeddings(args, args.batch or 1)
    cond, mask, uncond, umask = emb
    if args.checkpoint:
        from models.mochi.load import load_transformer

        model = load_transformer(args.checkpoint, dtype=dtype)
    else:
        model = random_model(cfg, dtype, args.seed)
    impl = attention_impl(args.attention_impl, model.dtype)
    gen = generate(
        model,
        cond,
        mask,
        negative_embeddings=uncond,
        negative_mask=umask,
        frames=args.frames,
        height=height,
        width=width,
        steps=args.steps,
        guidance_scale=args.guidance,
        chipmunk=chipmunk,
        seed=args.seed,
        text_group_mode=args.text_groups,
        backend=args.backend,
        attention_impl=impl,
        progress=not args.no_progress,
    )
    mode = "dense" if chipmunk is None else "chipmunk"
    head = (
        f"{mode} Mochi 1 ({'tiny random' if args.tiny else args.checkpoint or 'preview random'}), "
        f"{args.frames} frames {width}x{height}, {args.steps} steps, guidance {args.guidance}, seed {args.seed}, "
        f"{len(gen.groups)} model call(s) per step (text lengths {[g.text_len for g in gen.groups]})"
    )
    save_outputs(out, gen.latents, head + "\n" + gen.report.format(), _report_json(args, gen, chipmunk, width, height))
    if not _wants_decode(args):
        print("no VAE given (--vae DIR or --random-vae) or --no-decode: latents only")
        return 0
    write_decoded(_decode(args, cfg, gen.latents), out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
