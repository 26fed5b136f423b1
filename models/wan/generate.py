"""Generate a Wan2.1 text-to-video or image-to-video clip with Chipmunk: ``python -m models.wan.generate``.

Writes OUT_DIR/latents.npy (final latents [B, 16, (frames-1)/4+1, H/8, W/8], the transformer's normalised
latent space) and OUT_DIR/report.txt (per-step-kind times, compile time, attention sparsity) always; with a
VAE (--vae or --random-vae) also the decoded video: OUT_DIR/video_<b>.mp4 through imageio-ffmpeg, or
OUT_DIR/frames_<b>/NNNN.png with --png or when imageio-ffmpeg is not installed.

Prompt embeddings, one of:
  --embeddings FILE.npz   arrays 'prompt_embeds' [B, L, 4096] and (for guidance > 1) 'negative_prompt_embeds'
                          [1 or B, L', 4096]: UMT5-XXL last hidden states, zero past each prompt's tokens, as
                          diffusers' WanPipeline.encode_prompt returns them (L = 512);
  --prompt TEXT           needs a converted UMT5 encoder (--umt5, ``python -m convert_weights umt5``) and a
                          tokenizer directory with tokenizer.json (--tokenizer, the Wan release's tokenizer/);
  neither                 only with --random-weights: random embeddings.

Frames must be 4k+1 and height/width multiples of 16 (checked before any compute). The flow shift defaults
to 3.0 up to 832x480 pixels and 5.0 above (Wan's 480p / 720p settings).

Image-to-video (an I2V checkpoint, or --variant i2v-14b / --tiny with --random-weights): --image FIRST.png is the
first frame. As diffusers' WanImageToVideoPipeline, it is resized (Lanczos, aspect ratio not kept, no crop) to
--size and VAE-encoded with zeros for the other frames (so a VAE is required: --vae or --random-vae), and CLIP
ViT-H/14 encodes the image as given (shortest side 224, centre crop) into the 257 image tokens both CFG branches
see: --clip-vision DIR (``python -m convert_weights clip-vision``), or a random encoder with --random-weights.
Pick --size with the image's aspect ratio (diffusers' example: the largest multiple-of-16 size of ~832x480 area).

examples:
  # Wan2.1-T2V-1.3B, 81 frames at 832x480, 50 UniPC steps, CFG 5.0, Chipmunk with the Wan preset:
  python -m models.wan.generate --checkpoint ckpt/wan-t2v-1.3b --embeddings prompt.npz --vae ckpt/wan-vae \\
      --frames 81 --size 832x480 --out-dir out/
  # from a prompt (converted UMT5 + tokenizer), the dense model for comparison:
  python -m models.wan.generate --checkpoint ckpt/wan-t2v-1.3b --prompt "a red fox in the snow" \\
      --umt5 ckpt/umt5 --tokenizer Wan2.1-T2V-1.3B-Diffusers/tokenizer --vae ckpt/wan-vae --dense
  # no checkpoints: a tiny random model and VAE on CPU (seconds), or the full 1.3B architecture
  python -m models.wan.generate --random-weights --tiny --random-vae --frames 5 --size 64x96 --steps 6
  python -m models.wan.generate --random-weights --variant t2v-1.3b --frames 81 --size 832x480 --steps 10
  # image-to-video, Wan2.1-I2V-14B-480P (converted transformer, VAE and CLIP image encoder):
  python -m models.wan.generate --checkpoint ckpt/wan-i2v-14b-480p --image first.png --prompt "it starts to rain" \
      --umt5 ckpt/umt5 --tokenizer Wan2.1-I2V-14B-480P-Diffusers/tokenizer --vae ckpt/wan-vae \
      --clip-vision ckpt/clip-vit-h-14 --frames 81 --size 832x480
  python -m models.wan.generate --random-weights --tiny --random-vae --image first.png --frames 5 --size 64x96
"""

from __future__ import annotations

import argparse
import os
import sys

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
    numpy_random,
    optional_module,
    output_dir,
    random_module,
    save_outputs,
    vae_from_args,
    write_decoded,
)

EMB_COND, EMB_UNCOND = "prompt_embeds", "negative_prompt_embeds"
TEXT_LEN = 512  # UMT5 tokens of the Wan pipelines
FPS = 16  # Wan2.1 videos are 16 frames per second
TEMPORAL_MASK = 4  # I2V mask channels: one per pixel frame of a VAE time step


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m models.wan.generate",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="converted transformer directory (python -m convert_weights wan ...)")
    src.add_argument("--random-weights", action="store_true", help="random transformer weights, no checkpoint")
    p.add_argument(
        "--variant",
        default=None,
        choices=("t2v-1.3b", "t2v-14b", "i2v-14b"),
        help="architecture for --random-weights (default t2v-1.3b; i2v-14b with --image)",
    )
    p.add_argument("--tiny", action="store_true", help="with --random-weights: a tiny config (CPU checks)")
    p.add_argument("--image", help="image-to-video: the first frame (PNG / JPEG; needs an I2V model and a VAE)")
    p.add_argument("--clip-vision", help="converted CLIP image encoder (python -m convert_weights clip-vision ...)")
    txt = p.add_mutually_exclusive_group()
    txt.add_argument("--embeddings", help=f"prompt embeddings .npz ('{EMB_COND}', '{EMB_UNCOND}')")
    txt.add_argument("--prompt", help="text prompt (needs --umt5 and --tokenizer)")
    p.add_argument("--negative-prompt", default="", help="with --prompt: the CFG negative prompt (diffusers: '')")
    p.add_argument("--umt5", help="converted UMT5 encoder directory (python -m convert_weights umt5 ...)")
    p.add_argument("--tokenizer", help="directory with the UMT5 tokenizer.json")
    p.add_argument("--frames", type=int, default=81, help="video frames, 4k+1 (default 81)")
    p.add_argument("--size", default="832x480", help="WIDTHxHEIGHT in pixels, multiples of 16 (default 832x480)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale; <= 1 disables CFG (default 5.0)")
    p.add_argument("--shift", type=float, default=None, help="flow shift (default: 3.0 up to 480p, else 5.0)")
    p.add_argument("--solver", default="unipc", choices=("unipc", "euler"), help="UniPC (Wan's) or flow Euler")
    add_model_arguments(p, "Wan")
    vae = p.add_mutually_exclusive_group()
    vae.add_argument("--vae", help="converted Wan VAE directory (python -m convert_weights wan-vae ...)")
    vae.add_argument(
        "--random-vae", action="store_true", help="a random VAE (tiny with --tiny) to test decoding / I2V encoding"
    )
    add_output_arguments(p, fps=FPS, out_dir="wan_out")
    return p


def _model_config(args):
    from models.wan.config import CONFIGS, WanConfig, tiny_config

    if args.checkpoint:
        if args.tiny:
            raise UsageError("--tiny only goes with --random-weights")
        from convert_weights.common import read_manifest

        if not os.path.isdir(args.checkpoint):
            raise UsageError(f"checkpoint directory {args.checkpoint} does not exist")
        try:
            manifest = read_manifest(args.checkpoint)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from e
        if manifest.get("model") != "wan":
            raise UsageError(f"{args.checkpoint} holds a {manifest.get('model')!r} checkpoint, not a Wan transformer")
        cfg = WanConfig.from_dict(manifest["config"])
        if args.variant is not None:
            raise UsageError("--variant only goes with --random-weights (the checkpoint fixes the architecture)")
    elif args.tiny:
        if args.variant is not None:
            raise UsageError("--tiny replaces --variant (it is T2V, or I2V with --image)")
        # I2V: noise (4) + mask (4, one per frame of a VAE time step) + image latents (the tiny VAE's 4).
        cfg = tiny_config(i2v=True, in_channels=12) if args.image else tiny_config()
    else:
        cfg = CONFIGS[args.variant or ("i2v-14b" if args.image else "t2v-1.3b")]
    where = args.checkpoint or ("--tiny" if args.tiny else f"--variant {args.variant or 'i2v-14b'}")
    if cfg.is_i2v and not args.image:
        raise UsageError(f"{where} is an image-to-video model: give the first frame with --image FILE")
    if args.image and not cfg.is_i2v:
        raise UsageError(f"--image needs an image-to-video model; {where} is text-to-video")
    if cfg.is_i2v and cfg.in_channels != 2 * cfg.out_channels + TEMPORAL_MASK:
        raise UsageError(f"I2V model with {cfg.in_channels} input channels: expected out + 4 mask + out latent ones")
    return cfg, (manifest.get("dtype", "bfloat16") if args.checkpoint else "bfloat16")


def _embeddings(args, cfg, use_cfg: bool):
    """(cond [B, L, D], uncond [1|B, L', D] or None) as float32 numpy, or None when --prompt encodes later."""
    if check_prompt_args(args, ("umt5", "tokenizer"), "a converted UMT5 and tokenizer"):
        return None
    if args.embeddings is None:
        rng = np.random.default_rng(args.seed)
        b = args.batch or 1
        length = 16 if args.tiny else TEXT_LEN
        cond = rng.standard_normal((b, length, cfg.text_dim)).astype(np.float32)
        return cond, rng.standard_normal((1, length, cfg.text_dim)).astype(np.float32)
    if not os.path.exists(args.embeddings):
        raise UsageError(f"embeddings file {args.embeddings} does not exist")
    with np.load(args.embeddings) as data:
        if EMB_COND not in data:
            raise UsageError(f"{args.embeddings} lacks '{EMB_COND}'; it has {sorted(data.files)}")
        cond = data[EMB_COND].astype(np.float32)
        uncond = data[EMB_UNCOND].astype(np.float32) if EMB_UNCOND in data else None
    if cond.ndim != 3 or cond.shape[2] != cfg.text_dim:
        raise UsageError(f"'{EMB_COND}' must be [B, L, {cfg.text_dim}], got {cond.shape}")
    if use_cfg and uncond is None:
        raise UsageError(f"guidance {args.guidance} > 1 needs '{EMB_UNCOND}' in {args.embeddings} (or --guidance 1)")
    if uncond is not None and (uncond.ndim != 3 or uncond.shape[0] not in (1, cond.shape[0])):
        raise UsageError(f"'{EMB_UNCOND}' must be [1 or {cond.shape[0]}, L, {cfg.text_dim}], got {uncond.shape}")
    if uncond is not None and uncond.shape[2] != cfg.text_dim:
        raise UsageError(f"'{EMB_UNCOND}' must be [1 or {cond.shape[0]}, L, {cfg.text_dim}], got {uncond.shape}")
    b = args.batch or cond.shape[0]
    if cond.shape[0] not in (1, b):
        raise UsageError(f"--batch {b} does not match the embeddings' batch {cond.shape[0]}")
    if cond.shape[0] == 1 and b > 1:
        cond = np.repeat(cond, b, 0)
    return cond, uncond


def _vae_available():
    """The models.vae.wan_vae module, or None when it is not in this installation."""
    return optional_module("models.vae.wan_vae")


def _check_i2v(args, cfg) -> None:
    """Image-to-video arguments: the image file, a VAE to encode it, the CLIP encoder matching the model."""
    if not os.path.isfile(args.image):
        raise UsageError(f"--image {args.image} does not exist")
    try:
        from PIL import Image

        with Image.open(args.image) as img:
            img.verify()
    except Exception as e:  # PIL raises many types for unreadable files
        raise UsageError(f"--image {args.image} is not a readable image: {e}") from e
    if not (args.vae or args.random_vae):
        raise UsageError("image-to-video encodes the first frame with the VAE: give --vae DIR (or --random-vae)")
    if args.clip_vision:
        from convert_weights.common import read_manifest

        if not os.path.isdir(args.clip_vision):
            raise UsageError(f"--clip-vision directory {args.clip_vision} does not exist")
        try:
            cm = read_manifest(args.clip_vision)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--clip-vision: {e}") from e
        if cm.get("model") != "clip_vision":
            raise UsageError(f"{args.clip_vision} holds a {cm.get('model')!r} checkpoint, not a CLIP vision tower")
        if cm["config"].get("width") != cfg.image_dim:
            raise UsageError(
                f"the CLIP encoder has width {cm['config'].get('width')}, "
                f"the model takes image tokens of {cfg.image_dim}"
            )
    elif not args.random_weights:
        raise UsageError("image-to-video needs the CLIP image encoder: --clip-vision DIR (convert_weights clip-vision)")


def prepare(args):
    """Checks everything that needs no compute; returns (cfg, dtype, chipmunk, (width, height), embeddings)."""
    from models.wan.sampling import latent_size
    from models.wan.transformer import post_patch_grid

    width, height, latent = check_video_args(args, latent_size, {"steps": 1, "batch": 1, "fps": 1})
    if (args.vae or args.random_vae) and _vae_available() is None:
        raise UsageError("models.vae.wan_vae is not available in this installation: drop --vae (latents only)")
    cfg, dtype = _model_config(args)
    check_grid(post_patch_grid, cfg, latent)
    if args.vae:
        check_vae_dir(args.vae, model="wan_vae", name="a Wan VAE", channels_key="z_dim", channels=cfg.out_channels)
    if cfg.is_i2v:
        _check_i2v(args, cfg)
    elif args.clip_vision:
        raise UsageError("--clip-vision is for image-to-video (--image with an I2V model)")
    chipmunk = chipmunk_from_args(args, "wan", "Wan", "self-attention")
    emb = _embeddings(args, cfg, args.guidance > 1.0)
    return cfg, (args.dtype or dtype), chipmunk, (width, height), emb


def random_model(cfg, dtype, seed: int = 0, *, host: bool | None = None):
    """A WanTransformer3D with random weights: one jitted initialisation, or numpy draws (``host``; default
    for models under 100M parameters)."""
    import jax.numpy as jnp
    from flax import nnx

    from models.wan.transformer import WanTransformer3D

    make = lambda: WanTransformer3D(cfg, rngs=nnx.Rngs(seed), dtype=jnp.dtype(dtype))
    if host is None:
        host = cfg.num_layers * (4 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.ffn_dim) < 100_000_000
    return random_module(make, seed, host=host)


def prompt_clean(text: str) -> str:
    """Wan's prompt cleaning before UMT5 tokenisation (``basic_clean`` then ``whitespace_clean`` of the Wan release
    and diffusers' Wan pipelines).

    ``ftfy.fix_text`` (repairs mojibake such as 'cafÃ©' -> 'café') runs first when ftfy is importable; it is not a
    dependency of this project, and without it prompts that need no repair (any correctly encoded text) give the
    same result. Then HTML entities are unescaped twice ('&amp;lt;' -> '<'), the ends stripped, and every run of
    whitespace (Unicode included) becomes one space, the ends stripped again.
    """
    import html
    import re

    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    # Unicode whitespace as the `regex` module's \s of the reference, which (unlike `re`) excludes \x1c-\x1f.
    return re.sub(r"[^\S\x1c-\x1f]+", " ", text).strip()


def encode_prompts(encoder, tokenizer, prompts: list[str]):
    """UMT5 embeddings [B, L, D] float32 as diffusers' WanPipeline: hidden states zeroed past each prompt's tokens.

    Args:
      encoder: ``models.text_encoders.t5.T5Encoder`` with the UMT5 config.
      tokenizer: ``models.text_encoders.tokenizers.TextTokenizer`` padding to the Wan length (512).
      prompts: the prompts.
    """
    import jax.numpy as jnp

    tok = tokenizer(prompts)
    mask = jnp.asarray(tok.attention_mask)
    hidden = encoder(jnp.asarray(tok.input_ids), mask).astype(jnp.float32)
    return hidden * (mask != 0).astype(jnp.float32)[:, :, None]


def _prompt_embeddings(args, batch: int):
    import jax.numpy as jnp

    from convert_weights.umt5 import load as load_umt5
    from models.text_encoders.tokenizers import load_t5_tokenizer

    encoder = load_umt5(args.umt5)
    tokenizer = load_t5_tokenizer(args.tokenizer, TEXT_LEN)
    cond = encode_prompts(encoder, tokenizer, [prompt_clean(args.prompt)] * batch)
    uncond = encode_prompts(encoder, tokenizer, [prompt_clean(args.negative_prompt)])
    return np.asarray(cond, np.float32), np.asarray(uncond.astype(jnp.float32))


def _load_vae(args, cfg):
    """The VAE of --vae, or a random one (tiny with --tiny) for --random-vae; None without either."""
    if not (args.vae or args.random_vae):
        return None
    import jax.numpy as jnp
    from flax import nnx

    wan_vae = _vae_available()
    vcfg = wan_vae.WAN_VAE_TINY if args.tiny else wan_vae.WanVAEConfig()
    make = lambda: wan_vae.WanVAE(vcfg, rngs=nnx.Rngs(args.seed), dtype=jnp.float32)  # noqa: E731
    return vae_from_args(args, wan_vae.load, make, "z_dim", cfg.out_channels)


def _load_clip(args, cfg):
    """The CLIP vision encoder of --clip-vision, or a random one (tiny with --tiny, else ViT-H/14) in float32."""
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from models.image_encoders.clip_vision import CLIP_VISION_TINY, CLIP_VIT_H_14, CLIPVisionEncoder

    if args.clip_vision:
        from convert_weights.clip_vision import load as load_clip

        return load_clip(args.clip_vision)
    ccfg = dataclasses.replace(CLIP_VISION_TINY if args.tiny else CLIP_VIT_H_14, width=cfg.image_dim)
    return numpy_random(lambda: CLIPVisionEncoder(ccfg, rngs=nnx.Rngs(args.seed), dtype=jnp.float32), args.seed)


def image_inputs(image, encoder, vae, *, frames: int, width: int, height: int):
    """(CLIP image tokens [1, N, D], I2V conditioning [1, 4 + z, F_lat, H/8, W/8]) of a first frame.

    As diffusers' WanImageToVideoPipeline: CLIP sees the image as given (``preprocess``: shortest side to the
    encoder's size, centre crop) and returns its penultimate hidden state; the VAE sees it resized to the video
    size (``video_image``), followed by zero frames (``image_condition``).

    Args:
      image: a PIL image (or uint8 array [H, W, 3]).
      encoder: ``models.image_encoders.clip_vision.CLIPVisionEncoder``.
      vae: ``models.vae.wan_vae.WanVAE``.
      frames, width, height: the video size.
    """
    import jax.numpy as jnp

    from models.image_encoders.clip_vision import encode, preprocess
    from models.wan.sampling import image_condition, video_image

    tokens = encode(encoder, jnp.asarray(preprocess(image, encoder.config)))
    condition = image_condition(vae, video_image(image, width, height), frames)
    return tokens, condition


@exits_on_usage_error
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a command-line mistake, printed as ``error: ...``)."""
    args = build_parser().parse_args(argv)
    cfg, dtype, chipmunk, (width, height), emb = prepare(args)
    import jax.numpy as jnp

    from convert_weights.wan import load
    from models.wan.sampling import default_shift, generate

    out = output_dir(args.out_dir)
    if emb is None:
        emb = _prompt_embeddings(args, args.batch or 1)
    cond, uncond = emb
    vae = _load_vae(args, cfg)
    image_tokens = condition = None
    if cfg.is_i2v:
        from PIL import Image

        with Image.open(args.image) as img:
            first = img.convert("RGB")
        image_tokens, condition = image_inputs(
            first, _load_clip(args, cfg), vae, frames=args.frames, width=width, height=height
        )
        print(f"image {args.image} ({first.width}x{first.height}): {image_tokens.shape[1]} CLIP tokens")
    model = load(args.checkpoint, dtype=dtype) if args.checkpoint else random_model(cfg, dtype, args.seed)
    impl = attention_impl(args.attention_impl, model.dtype)
    shift = default_shift(height, width) if args.shift is None else args.shift
    gen = generate(
        model,
        jnp.asarray(cond),
        None if uncond is None else jnp.asarray(uncond),
        frames=args.frames,
        height=height,
        width=width,
        steps=args.steps,
        guidance=args.guidance,
        shift=shift,
        solver=args.solver,
        seed=args.seed,
        chipmunk=chipmunk,
        backend=args.backend,
        attention_impl=impl,
        progress=not args.no_progress,
        image=image_tokens,
        condition=condition,
    )
    mode = "dense" if chipmunk is None else "chipmunk"
    variant = args.variant or ("i2v-14b" if cfg.is_i2v else "t2v-1.3b")
    task = f"image-to-video from {args.image}" if cfg.is_i2v else "text-to-video"
    head = (
        f"{mode} Wan2.1 {task} ({'tiny random' if args.tiny else args.checkpoint or variant + ' random'}), "
        f"{args.frames} frames {width}x{height}, {args.steps} {args.solver} steps, shift {shift}, "
        f"guidance {args.guidance}, seed {args.seed}"
    )
    save_outputs(out, gen.latents, head + "\n" + gen.report.format())
    if vae is None:
        print("no VAE given (--vae DIR or --random-vae): latents only")
        return 0
    from models.vae.wan_vae import decode

    write_decoded(decode(vae, gen.latents), out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
