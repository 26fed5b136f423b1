"""A whole FLUX.1 diffusers download -> one directory that ``models.flux.pipeline.FluxPipeline.load`` reads.

Output layout (every component is a ``write_checkpoint`` directory: orbax ``params/`` + ``manifest.json``)::

    DST/manifest.json          model "flux-pipeline", the component list
    DST/transformer/           convert_weights.flux
    DST/text_encoder_t5/       text_encoder_2 via convert_weights.t5   (manifest model "t5")
    DST/text_encoder_clip/     text_encoder via convert_weights.clip   (manifest model "clip_text")
    DST/vae/                   vae via convert_weights.flux_ae         (manifest model "flux_ae")
    DST/tokenizer/             copy of the CLIP tokenizer files
    DST/tokenizer_2/           copy of the T5 tokenizer files

The encoders and the autoencoder go through the same orbax + manifest helpers as the transformer; their manifest
``config`` is the dataclass fields of T5Config / CLIPTextConfig / AutoencoderConfig. The whole directory is built
next to DST and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from convert_weights import common
from convert_weights.common import ConversionError

MODEL = "flux-pipeline"
# component output dir -> (diffusers source subfolder, manifest model name)
COMPONENTS = {
    "transformer": ("transformer", "flux"),
    "text_encoder_t5": ("text_encoder_2", "t5"),
    "text_encoder_clip": ("text_encoder", "clip_text"),
    "vae": ("vae", "flux_ae"),
}
TOKENIZERS = ("tokenizer", "tokenizer_2")


def _weights(directory: Path) -> tuple[dict[str, np.ndarray], list[Path]]:
    files = common.find_source_files(directory)
    source = common.SafetensorsSource(files)
    return {k: source.get(k) for k in source.keys()}, files


def _check_source(src: Path) -> None:
    if not src.is_dir():
        raise ConversionError(f"source {src} is not a directory (expected a FLUX.1 diffusers download)")
    missing = [sub for sub, _ in COMPONENTS.values() if not (src / sub).is_dir()]
    missing += [t for t in TOKENIZERS if not (src / t).is_dir()]
    if missing:
        raise ConversionError(f"{src}: missing component folder(s) {missing} of a FLUX.1 diffusers download")


def _save_module(module, dst: Path, *, model: str, cfg, fmt: str, np_dtype, files, hash_sources: bool) -> dict:
    return common.write_converted(
        dst,
        common.module_params(module, np_dtype),
        model=model,
        variant=model,
        source_format=fmt,
        config=common.DictConfig(cfg),
        dtype=np_dtype,
        files=files,
        hash_sources=hash_sources,
    )


def _convert_t5(src: Path, dst: Path, np_dtype, hash_sources: bool) -> dict:
    from convert_weights.t5 import convert_t5, t5_config_from_weights

    weights, files = _weights(src)
    hf = common.read_json(src / "config.json")
    cfg = t5_config_from_weights(
        weights, max_distance=hf.get("relative_attention_max_distance", 128), eps=hf.get("layer_norm_epsilon", 1e-6)
    )
    module = convert_t5(weights, cfg, param_dtype=np_dtype)
    return _save_module(
        module, dst, model="t5", cfg=cfg, fmt="transformers", np_dtype=np_dtype, files=files, hash_sources=hash_sources
    )


def _convert_clip(src: Path, dst: Path, np_dtype, hash_sources: bool) -> dict:
    from convert_weights.clip import clip_config_from_weights, convert_clip

    weights, files = _weights(src)
    hf = common.read_json(src / "config.json")
    kwargs = {}
    if "hidden_size" in hf and "num_attention_heads" in hf:
        kwargs["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
    if "eos_token_id" in hf:
        kwargs["eos_token_id"] = hf["eos_token_id"]
    if "hidden_act" in hf:
        kwargs["activation"] = hf["hidden_act"]
    cfg = clip_config_from_weights(weights, **kwargs)
    if "layer_norm_eps" in hf:
        cfg = dataclasses.replace(cfg, eps=hf["layer_norm_eps"])
    module = convert_clip(weights, cfg, param_dtype=np_dtype)
    return _save_module(
        module,
        dst,
        model="clip_text",
        cfg=cfg,
        fmt="transformers",
        np_dtype=np_dtype,
        files=files,
        hash_sources=hash_sources,
    )


def _convert_vae(src: Path, dst: Path, np_dtype, hash_sources: bool) -> dict:
    from convert_weights.flux_ae import convert_flux_ae, detect_format, flux_ae_config_from_weights

    weights, files = _weights(src)
    hf = common.read_json(src / "config.json")
    kwargs = {k: hf[k] for k in ("norm_num_groups", "scaling_factor", "shift_factor") if hf.get(k) is not None}
    cfg = flux_ae_config_from_weights(weights, **kwargs)
    fmt = detect_format(weights)
    module = convert_flux_ae(weights, cfg, fmt=fmt, param_dtype=np_dtype)
    return _save_module(
        module, dst, model="flux_ae", cfg=cfg, fmt=fmt, np_dtype=np_dtype, files=files, hash_sources=hash_sources
    )


def convert(src, dst, *, dtype: str = "bf16", hash_sources: bool = True) -> dict:
    """Converts a FLUX.1 diffusers download (all four models + tokenizers); returns the top-level manifest.

    Args:
      src: the download directory (``transformer/``, ``text_encoder/``, ``text_encoder_2/``, ``vae/``,
        ``tokenizer/``, ``tokenizer_2/``).
      dst: output directory, replaced atomically.
      dtype: parameter dtype of every component: 'bf16' (default), 'fp16' or 'fp32'.
      hash_sources: record the sha256 of each source file in the manifests.

    Raises:
      ConversionError: a missing component folder (named), or any conversion problem of a component.
    """
    from convert_weights import flux

    np_dtype = common.numpy_dtype(dtype)
    src = Path(src)
    _check_source(src)
    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        manifests = {
            "transformer": flux.convert(
                src / "transformer", tmp / "transformer", dtype=dtype, hash_sources=hash_sources
            )
        }
        for name, fn in (("text_encoder_t5", _convert_t5), ("text_encoder_clip", _convert_clip), ("vae", _convert_vae)):
            try:
                manifests[name] = fn(src / COMPONENTS[name][0], tmp / name, np_dtype, hash_sources)
            except ConversionError as e:
                raise ConversionError(f"{COMPONENTS[name][0]}: {e}") from e
        for t in TOKENIZERS:
            shutil.copytree(src / t, tmp / t)
        top = {
            "format_version": common.FORMAT_VERSION,
            "model": MODEL,
            "variant": manifests["transformer"]["variant"],
            "dtype": np_dtype.name,
            "components": {k: {"model": m["model"], "num_params": m["num_params"]} for k, m in manifests.items()},
            "tokenizers": list(TOKENIZERS),
        }
        (tmp / common.MANIFEST).write_text(json.dumps(top, indent=2, sort_keys=True) + "\n")
        common.replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return top


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the flux-pipeline subcommand's options."""
    common.add_common_arguments(parser, src_help="FLUX.1 diffusers download directory", default_dtype="bf16")


def run(args: argparse.Namespace) -> int:
    """Runs the conversion described by the parsed arguments; returns the exit status."""
    m = common.convert_from_args(convert, args)
    total = sum(c["num_params"] for c in m["components"].values())
    print(f"wrote {args.dst}: FLUX.1-{m['variant']} pipeline ({total / 1e9:.3f} B params, {m['dtype']})")
    return 0


DESCRIPTION = "FLUX.1 pipeline (transformer, T5, CLIP, VAE, tokenizers) from a diffusers download directory"
EXAMPLES = """examples:
  python -m convert_weights flux-pipeline --src FLUX.1-dev --dst ckpt/flux-dev-pipeline
  python -m convert_weights flux-pipeline --src FLUX.1-schnell --dst ckpt/flux-schnell-pipeline --dtype fp32
"""
