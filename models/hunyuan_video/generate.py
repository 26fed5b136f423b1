"""Generate a HunyuanVideo text-to-video clip with Chipmunk: ``python -m models.hunyuan_video.generate``.

Writes OUT_DIR/latents.npy (final latents [B, 16, (frames-1)/4+1, H/8, W/8], the transformer's scaled latent
space), OUT_DIR/report.json (settings, per-step-kind times, compile time, attention sparsity, cache memory) and
OUT_DIR/report.txt always; with a VAE (--vae or --random-vae, unless --no-decode) also the decoded video:
OUT_DIR/video_<b>.mp4 through imageio-ffmpeg, or OUT_DIR/frames_<b>/NNNN.png with --png or when imageio-ffmpeg
is not installed.

Prompt embeddings, one of:
  --embeddings FILE.npz   arrays as diffusers' HunyuanVideoPipeline.encode_prompt returns them:
                          'prompt_embeds' [B, L, 4096] (Llama hidden state -3 after the template crop, L = 256),
                          'prompt_attention_mask' [B, L], 'pooled_prompt_embeds' [B, 768] (CLIP-L pooled); for
                          --true-cfg > 1 also 'negative_prompt_embeds', 'negative_prompt_attention_mask',
                          'negative_pooled_prompt_embeds' [1 or B, ...];
  --prompt TEXT           needs the converted Llama (--llama, ``python -m convert_weights llama``) with its
                          tokenizer directory (--tokenizer, the release's tokenizer/ with tokenizer.json), and CLIP-L
                          (--clip: a converted CLIP directory or the release's text_encoder_2/ safetensors) with its
                          tokenizer (--clip-tokenizer, the release's tokenizer_2/);
  neither                 only with --random-weights: random embeddings.

Frames must be 4k+1 and height/width multiples of 16 (checked before any compute). The schedule is diffusers'
(flow-matching Euler, shift 7.0, 50 steps); guidance is embedded (6.0, one model call per step). Chipmunk with
the HunyuanVideo preset (SPEC §6: sparse joint attention, full steps {0, 1, 10, 40}, step caching) is the
default; it needs one valid prompt length per batch (--dense otherwise).

examples:
  # HunyuanVideo 13B, 129 frames at 1280x720, Chipmunk, decoded with spatial VAE tiles:
  python -m models.hunyuan_video.generate --checkpoint ckpt/hunyuan-video --prompt "a cat walks on the grass" \\
      --llama ckpt/llama --tokenizer HunyuanVideo/tokenizer --clip HunyuanVideo/text_encoder_2 \\
      --clip-tokenizer HunyuanVideo/tokenizer_2 --vae ckpt/hunyuan-vae --vae-tiling --frames 129 --size 1280x720
  # from precomputed embeddings, latents only, the dense model for comparison:
  python -m models.hunyuan_video.generate --checkpoint ckpt/hunyuan-video --embeddings prompt.npz \\
      --frames 61 --size 848x480 --dense --no-decode
  # no checkpoints: a tiny random model and VAE on CPU (seconds), or the full 13B architecture
  python -m models.hunyuan_video.generate --random-weights --tiny --random-vae --frames 5 --size 64x64 --steps 12
  python -m models.hunyuan_video.generate --random-weights --frames 33 --size 640x368 --steps 10
"""

from __future__ import annotations

import argparse
import dataclasses
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

EMB_TEXT, EMB_MASK, EMB_POOLED = "prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds"
NEGATIVE = {k: "negative_" + k for k in (EMB_TEXT, EMB_MASK, EMB_POOLED)}
TEXT_LEN = 256  # Llama tokens after the template crop (diffusers' max_sequence_length)
CLIP_LEN = 77
FPS = 24  # HunyuanVideo's release samples are 24 frames per second


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m models.hunyuan_video.generate",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="converted transformer directory (python -m convert_weights hunyuan-video)")
    src.add_argument("--random-weights", action="store_true", help="random transformer weights, no checkpoint")
    p.add_argument("--tiny", action="store_true", help="with --random-weights: a tiny config (CPU checks)")
    txt = p.add_mutually_exclusive_group()
    txt.add_argument("--embeddings", help=f"prompt embeddings .npz ('{EMB_TEXT}', '{EMB_MASK}', '{EMB_POOLED}')")
    txt.add_argument("--prompt", help="text prompt (needs --llama, --tokenizer, --clip, --clip-tokenizer)")
    p.add_argument("--negative-prompt", default=None, help="with --prompt and --true-cfg > 1: the negative prompt")
    p.add_argument("--llama", help="converted Llama text encoder directory (python -m convert_weights llama)")
    p.add_argument("--tokenizer", help="Llama tokenizer directory with tokenizer.json (the release's tokenizer/)")
    p.add_argument("--clip", help="CLIP-L: a converted CLIP directory or a transformers text_encoder_2/ directory")
    p.add_argument("--clip-tokenizer", help="CLIP tokenizer directory (the release's tokenizer_2/)")
    p.add_argument("--max-sequence-length", type=int, default=TEXT_LEN, help="Llama tokens per prompt (256)")
    p.add_argument("--frames", type=int, default=129, help="video frames, 4k+1 (default 129)")
    p.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT in pixels, multiples of 16 (default 1280x720)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=6.0, help="embedded guidance scale (default 6.0)")
    p.add_argument("--flow-shift", type=float, default=7.0, help="flow-matching shift (default 7.0)")
    p.add_argument(
        "--true-cfg", type=float, default=1.0, help="diffusers' true_cfg_scale; > 1 needs a negative prompt (off)"
    )
    add_model_arguments(p, "HunyuanVideo")
    vae = p.add_mutually_exclusive_group()
    vae.add_argument("--vae", help="converted HunyuanVideo VAE directory (python -m convert_weights hunyuan-vae)")
    vae.add_argument("--random-vae", action="store_true", help="a random VAE (tiny with --tiny) to test decoding")
    p.add_argument(
        "--vae-tiling",
        action="store_true",
        help="decode in overlapping spatial tiles too (diffusers' vae.enable_tiling(); advised at 720p for memory)",
    )
    p.add_argument("--no-decode", action="store_true", help="write the latents only, even with a VAE")
    add_output_arguments(p, fps=FPS, out_dir="hunyuan_out")
    return p


def _model_config(args):
    from models.hunyuan_video.config import HUNYUAN_VIDEO_13B, tiny_config

    if args.checkpoint:
        if args.tiny:
            raise UsageError("--tiny only goes with --random-weights")
        try:
            from models.hunyuan_video.load import read_config, read_hunyuan_manifest
        except ImportError as e:
            raise UsageError(f"loading checkpoints needs models.hunyuan_video.load ({e})") from e
        try:
            manifest = read_hunyuan_manifest(args.checkpoint)
            return read_config(args.checkpoint), manifest.get("dtype", "bfloat16")
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise UsageError(f"--checkpoint: {e}") from e
    return (tiny_config() if args.tiny else HUNYUAN_VIDEO_13B), "bfloat16"


def _read_npz(path: str, cfg, want_negative: bool):
    """((text, mask, pooled), negative triple or None) as numpy from an embeddings file."""
    if not os.path.exists(path):
        raise UsageError(f"embeddings file {path} does not exist")
    with np.load(path) as data:
        files = set(data.files)
        missing = [k for k in (EMB_TEXT, EMB_MASK, EMB_POOLED) if k not in files]
        if missing:
            raise UsageError(f"{path} lacks {missing}; it has {sorted(files)}")
        prompt = tuple(np.asarray(data[k]) for k in (EMB_TEXT, EMB_MASK, EMB_POOLED))
        negative = None
        if want_negative:
            missing = [v for v in NEGATIVE.values() if v not in files]
            if missing:
                raise UsageError(f"--true-cfg > 1 needs {missing} in {path} (or --true-cfg 1)")
            negative = tuple(np.asarray(data[NEGATIVE[k]]) for k in (EMB_TEXT, EMB_MASK, EMB_POOLED))
    _check_triple("", prompt, cfg)
    if negative is not None:
        _check_triple("negative_", negative, cfg, batch=(1, prompt[0].shape[0]))
    return prompt, negative


def _check_triple(prefix: str, triple, cfg, batch=None) -> None:
    text, mask, pooled = triple
    if text.ndim != 3 or text.shape[2] != cfg.text_dim:
        raise UsageError(f"'{prefix}{EMB_TEXT}' must be [B, L, {cfg.text_dim}], got {text.shape}")
    b, length = text.shape[:2]
    if batch is not None and b not in batch:
        raise UsageError(f"'{prefix}{EMB_TEXT}' batch must be one of {sorted(set(batch))}, got {b}")
    if mask.shape != (b, length):
        raise UsageError(f"'{prefix}{EMB_MASK}' must be [{b}, {length}], got {mask.shape}")
    if pooled.shape != (b, cfg.pooled_dim):
        raise UsageError(f"'{prefix}{EMB_POOLED}' must be [{b}, {cfg.pooled_dim}], got {pooled.shape}")
    if ((mask != 0).sum(1) == 0).any():
        raise UsageError(f"'{prefix}{EMB_MASK}' has a prompt without any valid token")


def _repeat(triple, b: int):
    if triple[0].shape[0] == b:
        return triple
    return tuple(np.repeat(a, b, axis=0) for a in triple)


def _embeddings(args, cfg):
    """(prompt triple, negative triple or None) as numpy, or None when --prompt encodes later."""
    want_negative = args.true_cfg > 1.0
    if args.prompt is None and args.negative_prompt is not None:
        raise UsageError("--negative-prompt goes with --prompt (with --embeddings store negative_* arrays)")
    encoders = ("llama", "tokenizer", "clip", "clip_tokenizer")
    if check_prompt_args(args, encoders, "the Llama and CLIP text encoders and their tokenizers"):
        if want_negative and args.negative_prompt is None:
            raise UsageError("--true-cfg > 1 needs --negative-prompt (or --true-cfg 1: embedded guidance only)")
        return None
    if args.embeddings is None:
        rng = np.random.default_rng(args.seed)
        b = args.batch or 1
        length = 20 if args.tiny else TEXT_LEN
        mask = np.broadcast_to(np.arange(length) < length * 4 // 5, (b, length)).astype(np.int32)
        prompt = (
            rng.standard_normal((b, length, cfg.text_dim)).astype(np.float32),
            mask,
            rng.standard_normal((b, cfg.pooled_dim)).astype(np.float32),
        )
        negative = None
        if want_negative:
            nmask = (np.arange(length) < length * 4 // 5)[None].astype(np.int32)
            negative = (
                rng.standard_normal((1, length, cfg.text_dim)).astype(np.float32),
                nmask,
                rng.standard_normal((1, cfg.pooled_dim)).astype(np.float32),
            )
        return prompt, negative
    prompt, negative = _read_npz(args.embeddings, cfg, want_negative)
    b = args.batch or prompt[0].shape[0]
    if prompt[0].shape[0] not in (1, b):
        raise UsageError(f"--batch {b} does not match the embeddings' batch {prompt[0].shape[0]}")
    return _repeat(prompt, b), negative


def _vae_module():
    """The models.vae.hunyuan_vae module, or None when it is not in this installation."""
    return optional_module("models.vae.hunyuan_vae")


def _check_valid_lengths(chipmunk, emb) -> None:
    """Chipmunk's sparse attention needs one valid prompt length per model batch: refuse before any compute."""
    if chipmunk is None or not chipmunk.attn.is_enabled or emb is None:
        return
    prompt, negative = emb
    lens = sorted({int(v) for v in (prompt[1] != 0).sum(1)})
    if negative is not None:
        lens = sorted(set(lens) | {int(v) for v in (negative[1] != 0).sum(1)})
    if len(lens) > 1:
        raise UsageError(
            f"Chipmunk needs one valid prompt length for the whole batch, the prompts have {lens} valid tokens "
            "(per-sample lengths are not supported): run them separately, or use --dense"
        )


def prepare(args):
    """Checks everything that needs no compute; returns (cfg, dtype, chipmunk, (width, height), embeddings)."""
    from models.hunyuan_video.sampling import latent_size
    from models.hunyuan_video.transformer import post_patch_grid

    minimums = {"steps": 1, "batch": 1, "fps": 1, "max_sequence_length": 1}
    width, height, latent = check_video_args(args, latent_size, minimums)
    if args.flow_shift <= 0:
        raise UsageError(f"--flow-shift must be > 0, got {args.flow_shift}")
    decode = (args.vae or args.random_vae) and not args.no_decode
    if decode and _vae_module() is None:
        raise UsageError("models.vae.hunyuan_vae is not available in this installation: use --no-decode")
    cfg, dtype = _model_config(args)
    check_grid(post_patch_grid, cfg, latent)
    if args.vae and decode:
        check_vae_dir(
            args.vae,
            model="hunyuan_vae",
            name="a HunyuanVideo VAE",
            channels_key="latent_channels",
            channels=cfg.out_channels,
        )
    chipmunk = chipmunk_from_args(args, "hunyuan", "HunyuanVideo")
    emb = _embeddings(args, cfg)
    _check_valid_lengths(chipmunk, emb)
    return cfg, (args.dtype or dtype), chipmunk, (width, height), emb


def random_model(cfg, dtype, seed: int = 0, *, host: bool | None = None):
    """A HunyuanVideoTransformer3D with random weights: numpy draws (``host``; default for models under 100M
    parameters: compiling jax.random initialisers costs far more on a CPU), else one jitted initialisation."""
    import jax.numpy as jnp
    from flax import nnx

    from models.hunyuan_video.transformer import HunyuanVideoTransformer3D

    make = lambda: HunyuanVideoTransformer3D(cfg, rngs=nnx.Rngs(seed), dtype=jnp.dtype(dtype))
    if host is None:
        host = cfg.num_layers * 12 * cfg.hidden * cfg.hidden < 100_000_000
    return random_module(make, seed, host=host)


def load_clip(path: str, dtype=None):
    """CLIP-L text encoder from a converted directory (manifest model 'clip_text', e.g. a FLUX.1 pipeline's
    text_encoder_clip/) or from a transformers CLIPTextModel directory (safetensors, converted in memory)."""
    import jax.numpy as jnp
    from flax import nnx

    from convert_weights import common
    from convert_weights.clip import clip_config_from_weights, convert_clip
    from models.text_encoders.clip import CLIPTextConfig, CLIPTextEncoder

    p = Path(path)
    if (p / "manifest.json").exists():
        m = common.read_manifest(p)
        if m.get("model") != "clip_text":
            raise ValueError(f"{p} holds a {m.get('model')!r} checkpoint, not a CLIP text encoder")
        cfg = CLIPTextConfig(**m["config"])
        dt = jnp.dtype(dtype or m["dtype"])
        abstract = nnx.eval_shape(lambda: CLIPTextEncoder(cfg, rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt))
        return common.fill_module(abstract, common.read_checkpoint(p), where=str(p))
    source = common.SafetensorsSource(common.find_source_files(p))
    weights = {k: source.get(k) for k in source.keys()}
    hf = json.loads((p / "config.json").read_text()) if (p / "config.json").exists() else {}
    kw = {k: hf[k] for k in ("eos_token_id",) if k in hf}
    if "hidden_act" in hf:
        kw["activation"] = hf["hidden_act"]
    if "hidden_size" in hf and "num_attention_heads" in hf:
        kw["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
    cfg = clip_config_from_weights(weights, **kw)
    if "layer_norm_eps" in hf:
        cfg = dataclasses.replace(cfg, eps=hf["layer_norm_eps"])
    dt = jnp.dtype(dtype or "float32")
    return convert_clip(weights, cfg, dtype=dt, param_dtype=dt)


def encode_prompts(llama, tokenizer, clip, clip_tokenizer, prompts: list[str], max_length: int = TEXT_LEN):
    """(Llama embeddings [B, L, 4096], mask [B, L], CLIP pooled [B, 768]) as diffusers' encode_prompt, numpy."""
    import jax.numpy as jnp

    from models.text_encoders.llama import hunyuan_prompt_embeds

    text, mask = hunyuan_prompt_embeds(llama, tokenizer, prompts, max_length)
    ids = clip_tokenizer(prompts).input_ids
    if ids.max() >= clip.config.vocab_size:
        raise ValueError(f"CLIP tokenizer produced id {int(ids.max())} >= encoder vocab size {clip.config.vocab_size}")
    _, pooled = clip(jnp.asarray(ids))  # diffusers passes no attention mask to CLIP
    return np.asarray(text, np.float32), np.asarray(mask, np.int32), np.asarray(pooled, np.float32)


def _prompt_embeddings(args, batch: int):
    from convert_weights.llama import load as load_llama
    from models.text_encoders.llama_tokenizer import load_llama_tokenizer
    from models.text_encoders.tokenizers import load_clip_tokenizer

    llama = load_llama(args.llama)
    tokenizer = load_llama_tokenizer(args.tokenizer, padding_side="right")
    clip = load_clip(args.clip)
    clip_tok = load_clip_tokenizer(args.clip_tokenizer, min(CLIP_LEN, clip.config.max_positions))
    enc = lambda ps: encode_prompts(llama, tokenizer, clip, clip_tok, ps, args.max_sequence_length)
    prompt = enc([args.prompt] * batch)
    negative = enc([args.negative_prompt]) if args.true_cfg > 1.0 else None
    return prompt, negative


def _decode(args, cfg, latents):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    hv = _vae_module()
    vcfg = hv.tiny_config() if args.tiny else hv.HunyuanVAEConfig()
    make = lambda: hv.HunyuanVAE(vcfg, rngs=nnx.Rngs(args.seed))  # noqa: E731
    vae = vae_from_args(args, hv.load, make, "latent_channels", cfg.out_channels)
    tiling = hv.SPATIAL_TILING if args.vae_tiling else hv.DEFAULT_TILING
    dt = jax.tree.leaves(nnx.state(vae, nnx.Param))[0].dtype
    return hv.decode(vae, jnp.asarray(latents, dt), tiling=tiling)


def _jsonable(x):
    """Config values as JSON types (sets as sorted lists)."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _report_json(args, chipmunk, width, height, gen) -> dict:
    return {
        "model": "hunyuan_video",
        "weights": "tiny random" if args.tiny else (args.checkpoint or "random"),
        **report_json(
            args,
            gen,
            chipmunk,
            width,
            height,
            chipmunk=None if chipmunk is None else _jsonable(dataclasses.asdict(chipmunk)),
            flow_shift=args.flow_shift,
            true_cfg=args.true_cfg,
            denoising_total_s=gen.report.total_s,
        ),
    }


@exits_on_usage_error
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a command-line mistake, printed as ``error: ...``)."""
    args = build_parser().parse_args(argv)
    cfg, dtype, chipmunk, (width, height), emb = prepare(args)
    from models.hunyuan_video.sampling import generate

    out = output_dir(args.out_dir)
    if emb is None:
        emb = _prompt_embeddings(args, args.batch or 1)
        _check_triple("", emb[0], cfg)  # the encoders' widths against the transformer's inputs
        if emb[1] is not None:
            _check_triple("negative_", emb[1], cfg)
        _check_valid_lengths(chipmunk, emb)
    prompt, negative = emb
    if args.checkpoint:
        from models.hunyuan_video.load import load_transformer

        model = load_transformer(args.checkpoint, dtype=dtype)
    else:
        model = random_model(cfg, dtype, args.seed)
    impl = attention_impl(args.attention_impl, model.dtype)
    gen = generate(
        model,
        *prompt,
        frames=args.frames,
        height=height,
        width=width,
        steps=args.steps,
        guidance=args.guidance,
        flow_shift=args.flow_shift,
        chipmunk=chipmunk,
        seed=args.seed,
        negative=negative,
        true_cfg=args.true_cfg,
        backend=args.backend,
        attention_impl=impl,
        progress=not args.no_progress,
    )
    mode = "dense" if chipmunk is None else "chipmunk"
    head = (
        f"{mode} HunyuanVideo ({'tiny random' if args.tiny else args.checkpoint or '13B random'}), "
        f"{args.frames} frames {width}x{height}, {args.steps} Euler steps, shift {args.flow_shift}, "
        f"embedded guidance {args.guidance}, seed {args.seed}"
    )
    save_outputs(out, gen.latents, head + "\n" + gen.report.format(), _report_json(args, chipmunk, width, height, gen))
    if args.no_decode or not (args.vae or args.random_vae):
        print("latents only (--no-decode, or no --vae DIR / --random-vae given)")
        return 0
    write_decoded(_decode(args, cfg, gen.latents), out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
