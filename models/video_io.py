"""Command-line helpers shared by the video generators (``models.{wan,mochi,hunyuan_video}.generate``); the
compute options, the usage-error handling and ``attention_impl`` serve ``models.flux.sample`` too.

Everything here is host-side and model-agnostic: usage errors raised before any compute, the ``--size`` parser,
the Chipmunk config of ``--dense`` / ``--chipmunk-config``, the checks of a converted VAE directory, random
weights drawn by numpy for small models, and writing decoded videos as MP4 (imageio-ffmpeg) or PNG frames.
Each generator keeps what is its own (prompt encoders, embeddings files, model configs, frame rates).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np


class UsageError(ValueError):
    """A problem with the command line found before any compute (the CLIs print it and exit with status 2)."""


def exits_on_usage_error(main: Callable[..., int]) -> Callable[..., int]:
    """Decorates a CLI's ``main``: a UsageError raised anywhere in it is printed as ``error: ...`` on stderr and
    ``main`` returns 2 (the status of a command-line mistake) instead of a traceback."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped


def output_dir(path: str | os.PathLike) -> Path:
    """``--out-dir`` as a Path, created with its parents."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def attention_impl(requested: str, dtype) -> str:
    """The dense attention implementation of ``--attention-impl``: 'auto' resolves to cudnn for bf16/fp16 on a
    GPU, else xla (``models.flux.sampling.default_attention_impl``); other values are kept."""
    from models.flux.sampling import default_attention_impl

    return default_attention_impl(dtype) if requested == "auto" else requested


def parse_size(size: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (width, height); raises UsageError naming the expected form."""
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size must be WIDTHxHEIGHT, e.g. 832x480; got {size!r}") from None
    return w, h


def add_model_arguments(p: argparse.ArgumentParser, model: str) -> None:
    """The options every video CLI shares after its sampling options: --seed, --batch, --chipmunk-config /
    --dense, --backend, --dtype, --attention-impl (``model`` names the model and its preset in the help)."""
    p.add_argument("--seed", type=int, default=0, help="initial noise and Chipmunk's random keys (default 0)")
    p.add_argument("--batch", type=int, default=None, help="videos per call (default: the embeddings' batch)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chipmunk-config", help=f"reference chipmunk-config.yml (on top of the {model} preset)")
    mode.add_argument("--dense", action="store_true", help=f"plain dense {model} (no Chipmunk, no step caching)")
    add_compute_arguments(p)


def add_compute_arguments(p: argparse.ArgumentParser) -> None:
    """--backend, --dtype and --attention-impl, the compute options of every sampling CLI (videos and Flux)."""
    p.add_argument("--backend", default="auto", help="Chipmunk operator backend: auto, xla, reference, mosaic_gpu")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's; bf16 for random)")
    p.add_argument(
        "--attention-impl",
        default="auto",
        choices=("auto", "xla", "cudnn"),
        help="dense attention (jax.nn.dot_product_attention); auto: cudnn for bf16/fp16 on a GPU, else xla",
    )


def add_output_arguments(p: argparse.ArgumentParser, *, fps: int, out_dir: str) -> None:
    """The output options every video CLI ends with: --png, --fps, --out-dir, --no-progress."""
    p.add_argument("--png", action="store_true", help="write PNG frames instead of an MP4")
    p.add_argument("--fps", type=int, default=fps, help=f"frames per second of the MP4 (default {fps})")
    p.add_argument("--out-dir", default=out_dir, help=f"output directory (created; default {out_dir})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_prompt_args(args, encoders: tuple[str, ...], what: str) -> bool:
    """Checks how a video CLI gets its prompt embeddings; True when ``--prompt`` is to be encoded.

    ``--prompt`` needs every encoder / tokenizer directory in ``encoders`` (argument names, e.g. ('t5',
    'tokenizer')) to exist; without ``--prompt`` or ``--embeddings`` only ``--random-weights`` runs (on random
    embeddings).

    Raises:
      UsageError: naming the missing flags (``what`` says what they are) or directories.
    """
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if args.prompt is not None:
        missing = [name for name in encoders if getattr(args, name) is None]
        if missing:
            raise UsageError(f"--prompt needs {', '.join(flag(m) for m in missing)} ({what})")
        for name in encoders:
            if not os.path.isdir(getattr(args, name)):
                raise UsageError(f"{flag(name)} directory {getattr(args, name)} does not exist")
        return True
    if args.embeddings is None and not args.random_weights:
        raise UsageError("give --embeddings or --prompt (random embeddings only with --random-weights)")
    return False


def check_video_args(args, latent_size: Callable, minimums: dict[str, int]) -> tuple[int, int, tuple[int, ...]]:
    """The size and count options of a video CLI, before any compute; returns (width, height, latent size).

    Args:
      args: parsed arguments with ``size``, ``frames``, ``random_vae``, ``random_weights``, ``vae`` and the
        options named in ``minimums``.
      latent_size: the model's ``latent_size(frames, height, width)`` (raises ValueError naming valid sizes).
      minimums: option name -> smallest allowed value (None values are not checked).
    """
    width, height = parse_size(args.size)
    try:
        latent = latent_size(args.frames, height, width)
    except ValueError as e:
        raise UsageError(str(e)) from e
    for name, low in minimums.items():
        v = getattr(args, name)
        if v is not None and v < low:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {v}")
    if args.random_vae and not args.random_weights:
        raise UsageError("--random-vae only goes with --random-weights (use --vae DIR with a checkpoint)")
    if args.vae and not os.path.isdir(args.vae):
        raise UsageError(f"VAE directory {args.vae} does not exist")
    return width, height, latent


def check_grid(post_patch_grid: Callable, cfg, latent: tuple[int, ...]) -> None:
    """Raises UsageError when the model's patch does not tile the latent video (``post_patch_grid`` refuses)."""
    try:
        post_patch_grid(cfg, *latent)
    except ValueError as e:
        raise UsageError(f"--frames/--size: {e}") from e


def chipmunk_from_args(args, base: str, model: str, attention: str = "attention"):
    """The Chipmunk config of a video CLI: None for ``--dense``, else the ``base`` preset, or a reference
    ``--chipmunk-config`` YAML read on top of it.

    Args:
      args: parsed arguments with ``dense`` and ``chipmunk_config``.
      base: the ``chipmunk_jax.preset`` name ('wan', 'mochi', 'hunyuan').
      model: the model's name in error messages ('Wan', 'Mochi', 'HunyuanVideo').
      attention: what the model sparsifies, in error messages ('self-attention' for Wan).

    Raises:
      UsageError: a missing or invalid YAML file, or one that enables sparse MLPs (the video models sparsify
        attention only).
    """
    import chipmunk_jax

    if args.dense:
        return None
    if not args.chipmunk_config:
        return chipmunk_jax.preset(base)
    if not os.path.exists(args.chipmunk_config):
        raise UsageError(f"chipmunk config {args.chipmunk_config} does not exist")
    try:
        ck = chipmunk_jax.load_config(args.chipmunk_config, base=base)
    except ValueError as e:
        raise UsageError(f"{args.chipmunk_config}: {e}") from e
    if ck.mlp.is_enabled:
        raise UsageError(f"{model} sparsifies {attention} only: set mlp.is_enabled: false in the Chipmunk config")
    return ck


def check_vae_dir(path: str, *, model: str, name: str, channels_key: str, channels: int) -> None:
    """Checks a converted VAE directory against the transformer before any compute.

    Args:
      path: the ``--vae`` directory.
      model: the manifest's expected ``model`` entry ('wan_vae', 'mochi_vae', 'hunyuan_vae').
      name: the VAE's name in error messages ('a Wan VAE').
      channels_key: the manifest config field holding the latent channels ('z_dim', 'latent_channels').
      channels: the transformer's latent (output) channels.

    Raises:
      UsageError: an unreadable manifest, another model's checkpoint, or a latent-channel mismatch.
    """
    from convert_weights.common import read_manifest

    try:
        manifest = read_manifest(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--vae: {e}") from e
    if manifest.get("model") != model:
        raise UsageError(f"{path} holds a {manifest.get('model')!r} checkpoint, not {name}")
    z = manifest.get("config", {}).get(channels_key)
    if z != channels:
        raise UsageError(f"the VAE has {z} latent channels, the model {channels}")


def optional_module(name: str):
    """The module ``name`` (e.g. 'models.vae.wan_vae'), or None when it is not in this installation."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# Parameter names that always hold a matrix (never a norm scale), whatever module path they sit under.
_MATRIX_LEAVES = ("kernel", "weight", "embedding")


def numpy_random(make: Callable, seed: int = 0):
    """The module ``make()`` builds, with weights drawn by numpy on its abstract shapes (no jax.random).

    For small models: compiling jax.random initialisers for every parameter takes far longer on a CPU than
    drawing the numbers. Norm scales get 1 + 0.1 noise, other vectors 0.02 noise, matrices N(0, 1/last_dim).
    A norm scale is a parameter whose path names a norm, gamma or scale and that is a vector, or a stack of
    vectors with a leading layer axis ([L, D] in scanned blocks); a matrix parameter (``kernel``, ``weight``,
    ``embedding``, ``*_w``) is a matrix whatever its path says, e.g. the [C, 2C] kernel of a projection named
    ``norm_out``.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path).lower()
        keys = [str(getattr(k, "key", getattr(k, "name", ""))).lower() for k in path]
        keys = [k for k in keys if k not in ("value", "raw_value", "")]
        leaf = keys[-1] if keys else ""
        matrix_leaf = leaf in _MATRIX_LEAVES or leaf.endswith("_w")
        scale = "norm" in name or "gamma" in name or "scale" in name
        if x.ndim >= 2 and (matrix_leaf or "norm" not in name):
            a = rng.standard_normal(x.shape) / np.sqrt(x.shape[-1])
        elif scale:
            a = 1.0 + 0.1 * rng.standard_normal(x.shape)
        else:
            a = 0.02 * rng.standard_normal(x.shape)
        return jnp.asarray(a, x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def random_module(make: Callable, seed: int, *, host: bool):
    """``make()`` with random weights: numpy draws (``host``: small models on a CPU, see ``numpy_random``), else
    one jitted initialisation on the default device."""
    from flax import nnx

    return numpy_random(make, seed) if host else nnx.jit(make)()


def vae_from_args(args, load: Callable, make_random: Callable, channels_key: str, channels: int):
    """The VAE of a video CLI: ``load(args.vae)`` for --vae DIR, else ``make_random()`` with numpy-drawn weights
    (``args.seed``) for --random-vae.

    Args:
      args: parsed arguments with ``vae`` and ``seed``.
      load: the VAE module's ``load(path)``.
      make_random: builds the random VAE (tiny with --tiny, chosen by the caller).
      channels_key: the VAE config field holding the latent channels ('z_dim', 'latent_channels').
      channels: the transformer's latent (output) channels.

    Raises:
      UsageError: the VAE's latent channels differ from the transformer's.
    """
    vae = load(args.vae) if args.vae else numpy_random(make_random, args.seed)
    z = getattr(vae.config, channels_key)
    if z != channels:
        raise UsageError(f"the VAE has {z} latent channels, the transformer {channels}")
    return vae


def to_uint8_frames(video) -> np.ndarray:
    """Decoded video [B, 3, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, 3]."""
    v = np.asarray(video, np.float32)
    v = np.clip((v + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.moveaxis(v, 1, -1)


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: int) -> Path:
    """Writes uint8 frames [T, H, W, 3] as an H.264 MP4 through imageio-ffmpeg."""
    import imageio_ffmpeg

    t, h, w, _ = frames.shape
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24", macro_block_size=1, quality=8
    )
    writer.send(None)
    for f in frames:
        writer.send(np.ascontiguousarray(f))
    writer.close()
    return Path(path)


def write_pngs(frames: np.ndarray, directory: str | os.PathLike) -> Path:
    """Writes uint8 frames [T, H, W, 3] as directory/0000.png, 0001.png, ..."""
    from PIL import Image

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(d / f"{i:04d}.png")
    return d


def have_ffmpeg() -> bool:
    """True when imageio-ffmpeg and its ffmpeg binary are available (MP4 output)."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return False
    return True


def write_videos(videos: np.ndarray, out_dir: str | os.PathLike, *, fps: int, png: bool = False) -> list[Path]:
    """Writes each uint8 video of [B, T, H, W, 3] as OUT_DIR/video_<b>.mp4, or as OUT_DIR/frames_<b>/NNNN.png with
    ``png`` or when imageio-ffmpeg is missing (said on stdout); prints and returns the paths."""
    out = Path(out_dir)
    use_png = png or not have_ffmpeg()
    if use_png and not png:
        print("imageio-ffmpeg is not installed: writing PNG frames instead of an MP4")
    paths = []
    for b, video in enumerate(videos):
        path = write_pngs(video, out / f"frames_{b}") if use_png else write_video(video, out / f"video_{b}.mp4", fps)
        print(f"wrote {path} ({video.shape[0]} frames {video.shape[2]}x{video.shape[1]})")
        paths.append(path)
    return paths


def write_decoded(video, out_dir: str | os.PathLike, args) -> list[Path]:
    """Writes a decoded video batch [B, 3, T, H, W] in [-1, 1] as ``write_videos`` does, with ``args.fps`` and
    ``args.png``."""
    return write_videos(to_uint8_frames(video), out_dir, fps=args.fps, png=args.png)


def report_json(args, gen, chipmunk, width: int, height: int, /, **extra) -> dict:
    """The common entries of a video CLI's report.json: the mode, the run's size and sampling settings
    (``args.frames``, ``steps``, ``guidance``, ``seed``), then ``extra`` (the model's own entries), then the
    sampler Report of ``gen`` (step times, compile times, statistics, cache bytes) and the latents' shape."""
    r = gen.report
    return {
        "mode": "dense" if chipmunk is None else "chipmunk",
        "frames": args.frames,
        "width": width,
        "height": height,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        **extra,
        "step_times_s": r.step_times,
        "compile_s": r.compile_s,
        "stats": r.stats,
        "cache_bytes": r.cache_bytes,
        "latents_shape": list(gen.latents.shape),
    }


def save_outputs(out_dir: str | os.PathLike, latents, text: str, report: dict | None = None) -> None:
    """Writes OUT_DIR/latents.npy (float32), OUT_DIR/report.txt (``text``) and, given ``report``,
    OUT_DIR/report.json; prints the report and what was written."""
    out = Path(out_dir)
    np.save(out / "latents.npy", np.asarray(latents, np.float32))
    (out / "report.txt").write_text(text + "\n")
    if report is not None:
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    print(f"wrote {out / 'latents.npy'} {tuple(latents.shape)}" + (f", {out / 'report.json'}" if report else ""))
