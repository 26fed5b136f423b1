"""UMT5 encoder (the Wan2.1 text encoder, UMT5-XXL): transformers ``UMT5EncoderModel`` safetensors -> orbax.

The key table and the strict filling are those of ``convert_weights.t5`` (``T5Encoder`` with
``per_layer_position_bias=True``); this module adds the file handling and the checkpoint format, so that
``python -m convert_weights umt5`` writes a directory that ``load`` reads back.

Accepted sources: a ``.safetensors`` file, a directory of (possibly sharded) safetensors with an optional
``config.json``, or a diffusers Wan pipeline directory holding ``text_encoder/``. The original Wan release's
``models_t5_umt5-xxl-enc-bf16.pth`` uses other names and is not supported; use the diffusers ``text_encoder``.
"""

from __future__ import annotations

import argparse
import os

from convert_weights import common
from convert_weights.common import ConversionError

MODEL = "umt5"


def convert(src, dst, *, dtype: str = "bf16", hash_sources: bool = True) -> dict:
    """Converts a transformers UMT5 encoder checkpoint into an orbax checkpoint directory; returns the manifest.

    Args:
      src: a ``.safetensors`` file, a transformers ``UMT5EncoderModel`` directory, or a diffusers Wan pipeline
        directory (its ``text_encoder/`` is used).
      dst: output directory (written atomically).
      dtype: 'bf16' (default), 'fp16' or 'fp32'.
      hash_sources: record the sha256 of each source file in the manifest.

    Raises:
      ConversionError: the checkpoint is not a UMT5 encoder (e.g. a T5 with one shared bias table), or any
        unknown key, missing parameter or shape mismatch (all listed).
    """
    from convert_weights.t5 import convert_t5, t5_config_from_weights

    np_dtype = common.numpy_dtype(dtype)
    src = common.component_dir(src, "text_encoder")
    files = common.find_source_files(src)
    source = common.SafetensorsSource(files)
    weights = {k: source.get(k) for k in source.keys()}
    hf_path = src / "config.json" if src.is_dir() else src.parent / "config.json"
    hf = common.read_json(hf_path)
    cfg = t5_config_from_weights(
        weights, max_distance=hf.get("relative_attention_max_distance", 128), eps=hf.get("layer_norm_epsilon", 1e-6)
    )
    if not cfg.per_layer_position_bias and cfg.num_layers > 1:
        raise ConversionError(f"{src}: one relative attention bias table only; this is a T5, not a UMT5 encoder")
    module = convert_t5(weights, cfg, param_dtype=np_dtype)
    return common.write_converted(
        dst,
        common.module_params(module, np_dtype),
        model=MODEL,
        variant="umt5",
        source_format="transformers",
        config=common.DictConfig(cfg),
        dtype=np_dtype,
        files=files,
        hash_sources=hash_sources,
    )


def load(path: str | os.PathLike, *, dtype=None):
    """The ``T5Encoder`` (UMT5 config) stored by ``convert`` in ``path``, built on ``nnx.eval_shape``.

    Args:
      path: a directory written by ``convert`` / ``python -m convert_weights umt5``.
      dtype: parameter and compute dtype; None keeps the stored dtype.

    Raises:
      ValueError: the directory holds another model or its arrays do not match the config.
    """
    from models.text_encoders.t5 import T5Config, T5Encoder

    manifest = common.expect_manifest(path, MODEL, repr(MODEL))
    cfg = T5Config(**manifest["config"])
    return common.module_from_params(
        lambda dt, rngs: T5Encoder(cfg, rngs=rngs, dtype=dt, param_dtype=dt),
        common.read_checkpoint(path),
        dtype=dtype if dtype is not None else manifest["dtype"],
        where=str(path),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the umt5 subcommand's options."""
    common.add_common_arguments(
        parser, src_help="UMT5EncoderModel dir / .safetensors, or a Wan diffusers dir", default_dtype="bf16"
    )


def run(args: argparse.Namespace) -> int:
    """Runs the conversion described by the parsed arguments; returns the exit status."""
    m = common.convert_from_args(convert, args)
    print(f"wrote {args.dst}: UMT5 encoder ({common.size_text(m, 'B')})")
    return 0


DESCRIPTION = "UMT5 text encoder of Wan2.1 (transformers UMT5EncoderModel safetensors / diffusers text_encoder)"
EXAMPLES = """examples:
  python -m convert_weights umt5 --src Wan2.1-T2V-1.3B-Diffusers/text_encoder --dst ckpt/umt5-xxl
  python -m convert_weights umt5 --src Wan2.1-T2V-14B-Diffusers --dst ckpt/umt5-xxl --dtype bf16
load with convert_weights.umt5.load(DST).
"""
