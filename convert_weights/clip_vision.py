"""CLIP vision tower: transformers ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` safetensors -> orbax.

The Wan2.1 I2V diffusers repos ship the image encoder (OpenCLIP ViT-H/14 in transformers layout) in
``image_encoder/`` and its preprocessing in ``image_processor/``. Accepted sources: a ``.safetensors`` file, a
transformers model directory, or a diffusers pipeline directory holding ``image_encoder/``.

Names: files saved by transformers carry the ``vision_model.`` prefix (``vision_model.encoder.layers.0...``) and,
for ``CLIPVisionModelWithProjection``, a top-level ``visual_projection.weight``; state dicts of transformers 5's
``CLIPVisionModel`` have no prefix. Both are accepted (not mixed). The ``embeddings.position_ids`` buffer of old
checkpoints is dropped. A full ``CLIPModel`` checkpoint (with ``text_model.`` keys) is refused: its text keys
are unknown here.

The architecture comes from the tensor shapes, except what no tensor carries: the head count, the activation and
the LayerNorm epsilon are read from ``config.json`` next to the weights (its ``vision_config`` for a CLIPConfig),
else from the arguments (defaults: 16 heads, exact GELU, 1e-5: ViT-H/14), and the preprocessing mean / std from
``preprocessor_config.json`` (``image_processor/`` of a pipeline) when present, else CLIP's. Conversion is
strict (``common.apply_rules``): unknown keys, unassigned parameters and shape mismatches are listed together.

Library use::

    cfg = infer_config(tensors)                       # tensors: name -> numpy array
    params = convert_tensors(tensors, cfg)            # flat NNX path -> array
    encoder = to_model(cfg, params)                   # models.image_encoders.clip_vision.CLIPVisionEncoder
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from convert_weights import common
from convert_weights.common import ConversionError, Rule, rule
from models.image_encoders.clip_vision import CLIP_MEAN, CLIP_STD, CLIPVisionConfig

MODEL = "clip_vision"
PREFIX = "vision_model."
PROJECTION_KEY = "visual_projection.weight"
BUFFERS = ("embeddings.position_ids",)

# ---------------------------------------------------------------------------------------------------------
# Named transforms: (source arrays, CLIPVisionConfig) -> target arrays. Torch linears are [out, in].


def _patch_conv(w: np.ndarray) -> np.ndarray:
    """Conv2d weight [W, C, p, p] -> kernel [p*p*C, W] over (row, column, channel)-ordered patches."""
    if w.ndim != 4:
        raise ValueError(f"patch conv expects a [W, C, p, p] weight, got {w.shape}")
    return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


TRANSFORMS = {
    "identity": lambda xs, cfg: (xs[0],),
    "linear_T": lambda xs, cfg: (xs[0].T,),
    "patch_conv": lambda xs, cfg: (_patch_conv(xs[0]),),
    "qkv_kernel": lambda xs, cfg: (np.stack([x.T for x in xs], axis=1),),  # 3 x [W, W] -> [W_in, 3, W_out]
    "qkv_bias": lambda xs, cfg: (np.stack(xs, axis=0),),  # 3 x [W] -> [3, W]
}

_LAYER = "encoder.layers.{i}"


def key_rules(cfg: CLIPVisionConfig) -> tuple[Rule, ...]:
    """The key table (source names without the ``vision_model.`` prefix) for the architecture ``cfg``."""
    qkv = tuple(f"{_LAYER}.self_attn.{n}_proj" for n in ("q", "k", "v"))
    rules = [
        rule("embeddings.class_embedding", "class_embedding"),
        rule("embeddings.patch_embedding.weight", "patch_kernel", "patch_conv"),
        rule("embeddings.position_embedding.weight", "position_embedding"),
        rule("pre_layrnorm.weight", "pre_norm_scale"),
        rule("pre_layrnorm.bias", "pre_norm_bias"),
        rule(tuple(f"{s}.weight" for s in qkv), "layers.qkv_kernel", "qkv_kernel"),
        rule(tuple(f"{s}.bias" for s in qkv), "layers.qkv_bias", "qkv_bias"),
        rule(f"{_LAYER}.self_attn.out_proj.weight", "layers.out_kernel", "linear_T"),
        rule(f"{_LAYER}.self_attn.out_proj.bias", "layers.out_bias"),
        rule(f"{_LAYER}.mlp.fc1.weight", "layers.fc1_kernel", "linear_T"),
        rule(f"{_LAYER}.mlp.fc1.bias", "layers.fc1_bias"),
        rule(f"{_LAYER}.mlp.fc2.weight", "layers.fc2_kernel", "linear_T"),
        rule(f"{_LAYER}.mlp.fc2.bias", "layers.fc2_bias"),
        rule("post_layernorm.weight", "post_norm_scale"),
        rule("post_layernorm.bias", "post_norm_bias"),
    ]
    for n in (1, 2):
        rules += [
            rule(f"{_LAYER}.layer_norm{n}.weight", f"layers.norm{n}_scale"),
            rule(f"{_LAYER}.layer_norm{n}.bias", f"layers.norm{n}_bias"),
        ]
    if cfg.projection_dim is not None:
        rules.append(rule(PROJECTION_KEY, "projection", "linear_T"))
    return tuple(rules)


class _Canonical:
    """A source seen with canonical names: the ``vision_model.`` prefix stripped, known buffers dropped."""

    def __init__(self, source):
        raw = [k for k in source.keys() if k.removeprefix(PREFIX) not in BUFFERS]
        body = [k for k in raw if k != PROJECTION_KEY]
        prefixed = [k.startswith(PREFIX) for k in body]
        if any(prefixed) and not all(prefixed):
            odd = sorted(k for k in body if not k.startswith(PREFIX))
            raise ConversionError(
                f"mixed key layout: these keys lack the {PREFIX!r} prefix the others have: {odd[:20]} "
                "(a full CLIPModel checkpoint? convert its vision tower only)"
            )
        self._raw = {k.removeprefix(PREFIX): k for k in raw}
        self._source = source

    def keys(self) -> list[str]:
        return sorted(self._raw)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._source.shape(self._raw[key]))

    def __contains__(self, key: str) -> bool:
        return key in self._raw

    def get(self, key: str) -> np.ndarray:
        return self._source.get(self._raw[key])


def _canonical(tensors) -> _Canonical:
    if isinstance(tensors, _Canonical):
        return tensors
    return _Canonical(common.as_source(tensors))


def _shape(source: _Canonical, key: str) -> tuple[int, ...]:
    if key not in source:
        raise ConversionError(f"not a CLIP vision tower: {key!r} is missing (first keys: {source.keys()[:6]})")
    return source.shape(key)


def infer_config(
    tensors,
    *,
    num_heads: int = 16,
    activation: str = "gelu",
    eps: float = 1e-5,
    image_mean=CLIP_MEAN,
    image_std=CLIP_STD,
) -> CLIPVisionConfig:
    """The CLIPVisionConfig of a checkpoint: sizes from the tensor shapes, the rest from the arguments.

    Args:
      tensors: name -> numpy array (transformers names, with or without ``vision_model.``), or a source.
      num_heads: attention heads (not recorded in any tensor).
      activation: 'gelu' or 'quick_gelu'.
      eps: LayerNorm epsilon.
      image_mean, image_std: preprocessing statistics.

    Raises:
      ConversionError: a tensor needed for the inference is missing or the shapes are inconsistent.
    """
    source = _canonical(tensors)
    width, channels, p, p2 = _shape(source, "embeddings.patch_embedding.weight")
    positions = _shape(source, "embeddings.position_embedding.weight")[0]
    grid = math.isqrt(positions - 1)
    if p != p2 or grid * grid != positions - 1:
        raise ConversionError(f"patch {p}x{p2} / {positions} positions do not describe a square ViT")
    layers = common.layer_indices(source.keys(), _LAYER + ".layer_norm1.weight")
    if not layers:
        raise ConversionError("not a CLIP vision tower: no encoder.layers.{i}.layer_norm1.weight keys")
    projection = source.shape(PROJECTION_KEY)[0] if PROJECTION_KEY in source else None
    try:
        return CLIPVisionConfig(
            image_size=grid * p,
            patch_size=p,
            num_channels=channels,
            width=width,
            num_layers=len(layers),
            num_heads=num_heads,
            mlp_dim=_shape(source, "encoder.layers.0.mlp.fc1.weight")[0],
            eps=eps,
            activation=activation,
            projection_dim=projection,
            image_mean=tuple(image_mean),
            image_std=tuple(image_std),
        )
    except ValueError as e:
        raise ConversionError(f"inferred CLIP vision config is invalid: {e}") from e


def target_shapes(cfg: CLIPVisionConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Flat parameter path -> (shape, layered) of ``CLIPVisionEncoder(cfg)``; 'layers.*' have the layer axis."""
    from models.image_encoders.clip_vision import CLIPVisionEncoder

    return common.module_target_shapes(CLIPVisionEncoder, cfg, layered=("layers.",))


def convert_tensors(tensors, cfg: CLIPVisionConfig | None = None, *, dtype=np.float32) -> dict[str, np.ndarray]:
    """Maps a transformers CLIP vision checkpoint onto the flat parameter paths of ``CLIPVisionEncoder``, strictly.

    Raises:
      ConversionError: listing unknown source keys, unassigned targets and shape mismatches.
    """
    source = _canonical(tensors)
    cfg = cfg if cfg is not None else infer_config(source)
    return common.apply_rules(source, key_rules(cfg), TRANSFORMS, target_shapes(cfg), cfg, np.dtype(dtype))


def to_model(cfg: CLIPVisionConfig, params: Mapping[str, np.ndarray], *, dtype=None):
    """A ``CLIPVisionEncoder`` holding ``params`` (from ``convert_tensors``), built on ``nnx.eval_shape``.

    Args:
      cfg: the architecture.
      params: flat parameter path -> array, covering the model exactly.
      dtype: parameter and compute dtype (default: that of the arrays).

    Raises:
      ValueError: missing, unexpected or mis-shaped parameters (all listed).
    """
    from models.image_encoders.clip_vision import CLIPVisionEncoder

    return common.module_from_params(
        lambda dt, rngs: CLIPVisionEncoder(cfg, rngs=rngs, dtype=dt),
        params,
        dtype=dtype,
        where="converted CLIP vision tower",
        cast=True,
    )


# ---------------------------------------------------------------------------------------------------------
# Files.


def open_source(src) -> tuple[common.SafetensorsSource, list[Path], dict, dict]:
    """(source, files, model config.json or {}, preprocessor_config.json or {}) of a checkpoint ``src``."""
    src, processor = Path(src), {}
    if common.component_dir(src, "image_encoder") != src:  # a pipeline: image_processor/ holds the statistics
        processor = common.read_json(src / "image_processor" / "preprocessor_config.json")
        src = src / "image_encoder"
    files = common.find_source_files(src)
    folder = src if src.is_dir() else src.parent
    hf = common.read_json(folder / "config.json")
    hf = hf.get("vision_config", hf)
    processor = processor or common.read_json(folder / "preprocessor_config.json")
    return common.SafetensorsSource(files), files, hf, processor


def _settings(hf: Mapping, processor: Mapping, num_heads: int | None, activation: str | None) -> dict:
    """infer_config's keyword arguments from config.json / preprocessor_config.json and the overrides."""
    out = {
        "num_heads": num_heads or hf.get("num_attention_heads", 16),
        "activation": activation or hf.get("hidden_act", "gelu"),
        "eps": hf.get("layer_norm_eps", 1e-5),
    }
    for key in ("image_mean", "image_std"):
        if processor.get(key) is not None:
            out[key] = tuple(processor[key])
    return out


def convert(
    src,
    dst,
    *,
    dtype: str = "fp32",
    num_heads: int | None = None,
    activation: str | None = None,
    hash_sources: bool = True,
) -> dict:
    """Converts a CLIP vision checkpoint into an orbax checkpoint directory; returns the manifest.

    Args:
      src: a ``.safetensors`` file, a transformers model directory, or a diffusers pipeline directory holding
        ``image_encoder/`` (its ``image_processor/`` gives the preprocessing statistics).
      dst: output directory (written atomically).
      dtype: 'fp32' (default; Wan runs its CLIP in float32), 'bf16' or 'fp16'.
      num_heads, activation: override config.json (needed only without one, for towers other than ViT-H/14).
      hash_sources: record the sha256 of each source file in the manifest.
    """
    np_dtype = common.numpy_dtype(dtype)
    source, files, hf, processor = open_source(src)
    canonical = _canonical(source)
    cfg = infer_config(canonical, **_settings(hf, processor, num_heads, activation))
    params = convert_tensors(canonical, cfg, dtype=np_dtype)
    return common.write_converted(
        dst,
        params,
        model=MODEL,
        variant="with_projection" if cfg.projection_dim is not None else "vision_model",
        source_format="transformers",
        config=cfg,
        dtype=np_dtype,
        files=files,
        hash_sources=hash_sources,
    )


def load(path, *, dtype=None):
    """The ``CLIPVisionEncoder`` stored by ``convert`` in ``path`` (built on nnx.eval_shape, no random init).

    Args:
      path: a directory written by ``convert`` / ``python -m convert_weights clip-vision``.
      dtype: parameter and compute dtype (default: as stored).
    """
    manifest = common.expect_manifest(path, MODEL, "a CLIP vision tower")
    cfg = CLIPVisionConfig.from_dict(manifest["config"])
    return to_model(cfg, common.read_checkpoint(path), dtype=dtype)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the clip-vision subcommand's options."""
    common.add_common_arguments(
        parser, src_help="CLIPVisionModel dir / .safetensors, or a Wan I2V diffusers dir", default_dtype="fp32"
    )
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default: config.json, else 16)")
    parser.add_argument(
        "--activation", choices=("gelu", "quick_gelu"), default=None, help="MLP activation (default: config.json)"
    )


def run(args: argparse.Namespace) -> int:
    """Runs the conversion described by the parsed arguments; returns the exit status."""
    m = common.convert_from_args(convert, args, num_heads=args.heads, activation=args.activation)
    c = m["config"]
    print(
        f"wrote {args.dst}: CLIP vision tower ({c['num_layers']} layers, width {c['width']}, "
        f"{c['num_heads']} heads, {common.size_text(m, 'M')})"
    )
    return 0


DESCRIPTION = "CLIP vision tower, e.g. Wan2.1 I2V's image_encoder (transformers CLIPVisionModel safetensors)"
EXAMPLES = """examples:
  python -m convert_weights clip-vision --src Wan2.1-I2V-14B-480P-Diffusers --dst ckpt/clip-vit-h-14
  python -m convert_weights clip-vision --src Wan2.1-I2V-14B-480P-Diffusers/image_encoder --dst ckpt/clip-h
load with convert_weights.clip_vision.load(DST).
"""
