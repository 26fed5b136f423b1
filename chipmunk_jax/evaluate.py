"""Fidelity and speed of Chipmunk against the dense model: ``python -m chipmunk_jax.evaluate``.

For a model and checkpoint, samples the same seeds dense and with a Chipmunk config and reports, against dense:
PSNR and SSIM of the final images, the relative L2 error of the latents after every denoising step, the
achieved attention / MLP sparsity, and the denoising time (compile excluded). ``--sweep-top-keys`` repeats the
Chipmunk run for several attention ``top_keys`` and writes a markdown table and a PNG plot.

Supported models (``--model``):
  tiny   the pixel-space tiny Flux of ``models.tiny`` (default checkpoint: the shipped ``models/tiny/checkpoint``;
         ``--random-weights`` for a randomly initialised small one). Presets are scaled to its token count by
         ``models.tiny.sampling.tiny_preset``.
  flux   FLUX.1-dev or -schnell text-to-image: ``--ckpt`` is a directory from ``python -m convert_weights
         flux-pipeline``; the prompts (``--prompt``, repeatable; default: a fixed set of four) are encoded once,
         each seed samples all of them in one batch (``--batch-size`` to split it), and the images are decoded
         by the pipeline's autoencoder. The preset runs as it is (it is tuned for full-size FLUX.1).
         ``--random-weights``: a tiny random transformer + autoencoder + prompt embeddings (no tokenizers;
         256x256 px by default, presets scaled like tiny's), for checks on a CPU (mostly compile time).
Other models plug in through ``EvalModel`` (``sample(seed, chipmunk) -> EvalSample`` and ``adapt(config, scale=)``)
and an entry in ``MODELS``.

examples:
  python -m chipmunk_jax.evaluate                                   # shipped tiny model, Flux preset
  python -m chipmunk_jax.evaluate --config chipmunk-config.yml      # a reference YAML on top of the preset
  python -m chipmunk_jax.evaluate --sweep-top-keys 0.05,0.1,0.165,0.3,0.5 --out-dir out/eval
  python -m chipmunk_jax.evaluate --model flux --ckpt ckpt/flux-dev-pipeline --seeds 0 \\
      --sweep-top-keys 0.1,0.165,0.3 --out-dir out/eval-flux          # 1024x1024, 50 steps, 4 prompts
  python -m chipmunk_jax.evaluate --model flux --ckpt ckpt/flux-schnell-pipeline --prompt "a red fox in snow" \\
      --prompt "a chipmunk on a log" --width 1280 --height 768       # schnell: 4 steps by default
  python -m chipmunk_jax.evaluate --model flux --random-weights --steps 8 --sweep-top-keys 0.165,0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import metrics
from chipmunk_jax.config import ChipmunkConfig, load_config, preset
from chipmunk_jax.sampler import Report


class EvalModel(Protocol):
    """What ``evaluate`` needs from a model family."""

    name: str
    steps: int

    def adapt(self, config: ChipmunkConfig, *, scale: bool = True) -> ChipmunkConfig:
        """The config as this model runs it: tile sizes scaled to its token count (``scale``), checks."""
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

    def adapt(self, config: ChipmunkConfig, *, scale: bool = True) -> ChipmunkConfig:
        from models.tiny.sampling import tiny_preset

        return tiny_preset(config) if scale else config

    def sample(self, seed: int, chipmunk: ChipmunkConfig | None):
        from models.tiny.sampling import sample_trajectory

        return sample_trajectory(
            self.model, self.labels, steps=self.steps, seed=seed, chipmunk=chipmunk, backend=self.backend
        )


def _tiny(args) -> TinyEvalModel:
    from models.tiny import dataset
    from models.tiny.model import CHECKPOINT_DIR, load_checkpoint, tiny_flux_config_for

    given = [f"--{n.replace('_', '-')}" for n in _FLUX_ONLY if getattr(args, n) not in (None, [])]
    if given:
        raise ValueError(f"{', '.join(given)} only apply to --model flux (the tiny model is class-conditioned)")
    if args.random_weights:
        from flax import nnx

        from models.flux.model import Flux

        # Flux's own random init (not the adaLN-zero training init, whose output is identically zero).
        model = Flux(tiny_flux_config_for(32, 1, 2), rngs=nnx.Rngs(args.seeds[0]), dtype=jnp.float32)
    else:
        model, _ = load_checkpoint(args.ckpt or CHECKPOINT_DIR)
    n = dataset.NUM_CLASSES if args.images is None else args.images
    return TinyEvalModel(model, np.arange(n) % dataset.NUM_CLASSES, args.steps or 50, args.backend)


@dataclasses.dataclass
class EvalSample:
    """One generation as ``compare`` uses it.

    Attributes:
      images: float32 [B, H, W, 3] in [0, 1].
      latents: float32 [steps, B, ...] the latents after every step.
      report: the sampler Report (per-kind step times, compile time, achieved sparsity, cache bytes).
    """

    images: np.ndarray
    latents: np.ndarray
    report: Report


DEFAULT_PROMPTS = (
    "a chipmunk on a mossy log in a sunlit forest, photograph",
    "a red fox sitting in fresh snow at dusk",
    "a bowl of ramen on a wooden table, top view",
    "a lighthouse on a rocky coast under a stormy sky, oil painting",
)


def _merge_reports(reports: Sequence[Report]) -> Report:
    """One Report for a generation run in several batches: times and compile times add up, stats average."""
    out = Report()
    for r in reports:
        for k, ts in r.step_times.items():
            out.step_times.setdefault(k, []).extend(ts)
        for k, v in r.compile_s.items():
            out.compile_s[k] = out.compile_s.get(k, 0.0) + v
        out.cache_bytes = max(out.cache_bytes, r.cache_bytes)
        out.cache_host_bytes = max(out.cache_host_bytes, r.cache_host_bytes)
        out.cache_device_bytes_per_device = max(out.cache_device_bytes_per_device, r.cache_device_bytes_per_device)
    keys = {k for r in reports for k in r.stats}
    out.stats = {k: float(np.mean([r.stats[k] for r in reports if k in r.stats])) for k in sorted(keys)}
    return out


def float_decoder(vae) -> Callable[[jax.Array], np.ndarray]:
    """A jitted ``FluxAutoencoder`` decode: VAE-layout latents [B, c, h, w] -> float32 [B, 8h, 8w, 3] in [0, 1].

    Float rather than the pipeline's uint8 so that PSNR / SSIM are not limited by 8-bit rounding.
    """
    from flax import nnx

    graphdef, state = nnx.split(vae)
    dtype = jax.tree.leaves(nnx.state(vae, nnx.Param))[0].dtype

    @jax.jit
    def run(state, latents):
        x = nnx.merge(graphdef, state).decode(jnp.transpose(latents, (0, 2, 3, 1)).astype(dtype))
        return (jnp.clip(x.astype(jnp.float32), -1.0, 1.0) + 1.0) * 0.5

    return lambda latents: np.asarray(run(state, latents))


@dataclasses.dataclass
class FluxEvalModel:
    """FLUX.1 text-to-image: fixed prompt embeddings, one batch of images per seed, decoded by the autoencoder.

    Attributes:
      transformer: the Flux transformer.
      decode: VAE-layout latents [B, c, h, w] -> float32 images [B, H, W, 3] in [0, 1] (``float_decoder``).
      txt: [B, Nt, context_dim] T5 embeddings of the prompts (encoded once; the encoders are not kept).
      pooled: [B, vec_dim] pooled CLIP embeddings.
      width, height: image size in pixels (checked against each config by ``adapt``).
      steps: denoising steps.
      guidance: embedded guidance scale (dev; ignored by schnell).
      batch_size: images per ``generate`` call (None: all of them in one). The noise is drawn for the whole
        batch from the seed and then split, so the images agree up to float rounding.
      backend: Chipmunk operator backend.
      attention_impl: dense attention implementation (``models.flux.sampling.default_attention_impl``).
      scale_tiles: run configs through ``models.tiny.sampling.tiny_preset`` (the tile-size granularities
        scaled to a few hundred tokens; for the tiny random model only). Full-size FLUX.1 runs them unchanged.
    """

    transformer: Any
    decode: Callable[[jax.Array], np.ndarray]
    txt: jax.Array
    pooled: jax.Array
    width: int
    height: int
    steps: int
    guidance: float = 3.5
    batch_size: int | None = None
    backend: str = "auto"
    attention_impl: str | None = None
    scale_tiles: bool = False
    name: str = "flux"

    def __post_init__(self):
        from models.flux.sampling import check_size

        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (or None for one batch), got {self.batch_size}")
        check_size(self.width, self.height, patchify_on=False)  # dense: multiples of 16 px

    def adapt(self, config: ChipmunkConfig, *, scale: bool = True) -> ChipmunkConfig:
        """The config unchanged (tile sizes scaled for the tiny random model when ``scale``); checks the image size
        against its patchify chunk (ValueError naming the nearest valid sizes)."""
        from models.flux.sampling import check_size

        if self.scale_tiles and scale:
            from models.tiny.sampling import tiny_preset

            config = tiny_preset(config)
        check_size(self.width, self.height, config.patchify.is_enabled, config.patchify.chunk_size_1)
        return config

    def sample(self, seed: int, chipmunk: ChipmunkConfig | None) -> EvalSample:
        """All prompts with ``seed`` through ``models.flux.sampling.generate(..., trajectory=True)``."""
        from models.flux.sampling import PIXELS_PER_TOKEN, generate, pack_noise

        b = self.txt.shape[0]
        h, w = self.height // PIXELS_PER_TOKEN, self.width // PIXELS_PER_TOKEN
        # generate's own noise for one batch of all b images, split below (same images for any batch_size).
        noise = pack_noise(jax.random.fold_in(jax.random.key(seed), 0), b, h, w, self.transformer.cfg.in_channels)
        step = self.batch_size or b
        images, latents, reports = [], [], []
        for i in range(0, b, step):
            gen = generate(
                self.transformer,
                self.txt[i : i + step],
                self.pooled[i : i + step],
                width=self.width,
                height=self.height,
                steps=self.steps,
                seed=seed,
                guidance=self.guidance,
                chipmunk=chipmunk,
                backend=self.backend,
                attention_impl=self.attention_impl,
                noise=noise[i : i + step],
                progress=False,
                trajectory=True,
            )
            images.append(self.decode(gen.latents))
            latents.append(gen.trajectory)
            reports.append(gen.report)
        return EvalSample(
            images=np.concatenate(images), latents=np.concatenate(latents, axis=1), report=_merge_reports(reports)
        )


# Arguments that only --model flux takes (the tiny builder rejects them).
_FLUX_ONLY = ("prompt", "width", "height", "batch_size", "t5_max_length", "dtype")


def random_prompt_embeddings(prompts: Sequence[str], txt_len: int, context_dim: int, vec_dim: int):
    """Stand-in prompt embeddings for random-weight checks: normal noise seeded by each prompt's CRC-32 (the same
    prompt always gives the same embeddings). Returns (txt [B, txt_len, context_dim], pooled [B, vec_dim])."""
    txt, pooled = [], []
    for p in prompts:
        rng = np.random.default_rng(zlib.crc32(p.encode("utf-8")))
        txt.append(rng.standard_normal((txt_len, context_dim), dtype=np.float32))
        pooled.append(rng.standard_normal((vec_dim,), dtype=np.float32))
    return jnp.asarray(np.stack(txt)), jnp.asarray(np.stack(pooled))


def _random_array(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A random parameter by name and shape: norm weights 1 + 0.1 N, biases 0.02 N, ``kernel`` (Linear / Conv,
    inputs first) N / sqrt(fan_in), stacked layer weights [L, ...] N / sqrt(largest other dim)."""
    x = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith("norm") or name == "scale":
        return 1.0 + 0.1 * x
    if name == "bias" or re.search(r"(^|_)b\d?$", name):
        return 0.02 * x
    if name == "kernel":
        return x / np.sqrt(np.prod(shape[:-1]))
    return x / np.sqrt(max(shape[1:]) if len(shape) > 1 else 1)


def random_module(make: Callable[[], Any], seed: int):
    """``make()`` with every parameter drawn by numpy (``_random_array``): the structure comes from
    ``nnx.eval_shape(make)``, so nothing is compiled (a jitted JAX init of the tiny Flux takes ~15 CPU-s)."""
    from flax import nnx

    from convert_weights.common import fill_module

    abstract = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)
    arrays = {
        ".".join(map(str, p)): _random_array(str(p[-1]), tuple(v.get_value().shape), rng)
        for p, v in nnx.to_flat_state(nnx.state(abstract))
    }
    return fill_module(abstract, arrays, where="random init")


def tiny_random_flux_pipeline(seed: int = 0):
    """A tiny random FLUX.1-dev transformer (``models.flux.config.tiny_config``) and a matching 8x-downsampling
    autoencoder, float32, every parameter random (norm weights and biases too): for CPU checks."""
    from flax import nnx

    from models.flux.config import tiny_config
    from models.flux.model import Flux
    from models.vae.flux_ae import AutoencoderConfig, FluxAutoencoder

    cfg = tiny_config(guidance_embed=True)
    transformer = random_module(lambda: Flux(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32), seed)
    ae_cfg = AutoencoderConfig(
        latent_channels=cfg.in_channels // 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4
    )
    f32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)
    vae = random_module(lambda: FluxAutoencoder(ae_cfg, rngs=nnx.Rngs(0), **f32), seed + 1)
    return transformer, vae


def _flux(args) -> FluxEvalModel:
    from models.flux.sampling import check_size, default_attention_impl

    if bool(args.ckpt) == bool(args.random_weights):
        raise ValueError(
            "--model flux needs exactly one of --ckpt PIPELINE_DIR (from `python -m convert_weights flux-pipeline`) "
            "or --random-weights"
        )
    if any(not p.strip() for p in args.prompt):
        raise ValueError("--prompt must not be empty")
    for name in ("images", "batch_size", "t5_max_length"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    prompts = [p for p in (args.prompt or DEFAULT_PROMPTS) for _ in range(args.images or 1)]
    size = 256 if args.random_weights else 1024
    width, height = (size if v is None else v for v in (args.width, args.height))
    # The size against the config's patchify chunk before loading anything (adapt checks it again).
    patchify = base_config(args).patchify
    check_size(width, height, patchify.is_enabled, patchify.chunk_size_1)
    if args.random_weights:
        if args.dtype is not None or args.t5_max_length is not None:
            raise ValueError("--dtype and --t5-max-length apply to --ckpt only")
        transformer, vae = tiny_random_flux_pipeline(args.seeds[0])
        cfg = transformer.cfg
        txt, pooled = random_prompt_embeddings(prompts, 8, cfg.context_dim, cfg.vec_dim)
    else:
        from models.flux.pipeline import FluxPipeline, check_pipeline_dir

        try:
            check_pipeline_dir(args.ckpt)
        except FileNotFoundError as e:
            hint = "--ckpt takes the output of `python -m convert_weights flux-pipeline --src DIFFUSERS_DIR --dst DIR`"
            raise FileNotFoundError(str(e) if "convert_weights" in str(e) else f"{e}; {hint}") from e
        pipe = FluxPipeline.load(args.ckpt, dtype=args.dtype, t5_max_length=args.t5_max_length)
        print(f"encoding {len(prompts)} prompts", flush=True)
        txt, pooled = pipe.encode(prompts)
        transformer, vae = pipe.transformer, pipe.vae
        del pipe  # the text encoders are no longer needed
    steps = args.steps or (50 if transformer.cfg.guidance_embed else 4)
    return FluxEvalModel(
        transformer,
        float_decoder(vae),
        txt,
        pooled,
        width=width,
        height=height,
        steps=steps,
        guidance=args.guidance,
        batch_size=args.batch_size,
        backend=args.backend,
        attention_impl=default_attention_impl(transformer.dtype),
        scale_tiles=args.random_weights,
    )


MODELS: dict[str, Callable[[argparse.Namespace], EvalModel]] = {"tiny": _tiny, "flux": _flux}


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
    p.add_argument(
        "--ckpt",
        default=None,
        help="checkpoint (tiny: default the shipped models/tiny/checkpoint; flux: a convert_weights flux-pipeline dir)",
    )
    p.add_argument("--random-weights", action="store_true", help="a small randomly initialised model (checks)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="flux", help="Chipmunk preset name (default: flux)")
    src.add_argument("--config", default=None, help="reference chipmunk-config.yml, applied on top of the Flux preset")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; flux-schnell 4)")
    p.add_argument("--seeds", type=_ints, default=[0, 1], help="comma-separated seeds (default 0,1)")
    p.add_argument(
        "--images", type=int, default=None, help="tiny: images per seed (default one per class); flux: per prompt"
    )
    flux = p.add_argument_group("--model flux")
    flux.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several; default: 4 fixed)")
    flux.add_argument("--width", type=int, default=None, help="pixels (default 1024; 256 with --random-weights)")
    flux.add_argument("--height", type=int, default=None, help="pixels (default 1024; 256 with --random-weights)")
    flux.add_argument("--guidance", type=float, default=3.5, help="embedded guidance scale (dev only)")
    flux.add_argument("--batch-size", type=int, default=None, help="images per sampler call (default: all)")
    flux.add_argument("--dtype", default=None, help="transformer compute dtype (default: as stored)")
    flux.add_argument("--t5-max-length", type=int, default=None, help="T5 tokens per prompt (default 512 / 256)")
    p.add_argument("--sweep-top-keys", type=_floats, default=None, help="comma-separated attention top_keys")
    p.add_argument("--backend", default="auto", help="Chipmunk operator backend: auto, xla, reference")
    p.add_argument("--out-dir", default="out/evaluate", help="where the table, JSON and plot are written")
    return p


def base_config(args: argparse.Namespace) -> ChipmunkConfig:
    """The Chipmunk config of ``--config`` (a reference YAML on top of the Flux preset) or ``--preset``."""
    return load_config(args.config, base="flux") if args.config else preset(args.preset)


def run_config(args: argparse.Namespace, em: EvalModel) -> ChipmunkConfig:
    """The config ``em`` runs: ``--preset`` adapted to the model, or ``--config`` applied on top of the adapted
    Flux preset, so that values the YAML sets (tile sizes included) win over the model's scaling."""
    if args.config:
        return em.adapt(load_config(args.config, base=em.adapt(preset("flux"))), scale=False)
    return em.adapt(preset(args.preset))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    em = MODELS[args.model](args)
    base = run_config(args, em)
    configs = [("preset" if not args.config else os.path.basename(args.config), base)]
    if args.sweep_top_keys:
        configs = [
            (f"top_keys={k:g}", base.replace(attn=dataclasses.replace(base.attn, top_keys=k)))
            for k in args.sweep_top_keys
        ]
    print(f"model {em.name}: {em.steps} steps, seeds {args.seeds}; dense reference first", flush=True)
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
