"""HunyuanVideo VAE: diffusers ``AutoencoderKLHunyuanVideo`` / original release weights -> ``HunyuanVAE``.

Sources (told apart only for the manifest; the tensor names are the same):

* ``diffusers``: the ``vae`` folder of ``hunyuanvideo-community/HunyuanVideo`` (``diffusion_pytorch_model
  .safetensors`` + ``config.json``), or a pipeline directory holding ``vae/``.
* ``original``: the release's ``hunyuan-video-t2v-720p/vae/pytorch_model.pt``, converted to safetensors first (this
  project reads no pickles): its names are diffusers' names. diffusers' own conversion script
  (``scripts/convert_hunyuan_video_to_diffusers.py``, ``convert_vae``) has empty rename tables and loads the
  release state dict into ``AutoencoderKLHunyuanVideo`` with ``strict=True``. HunyuanVideo's loader also accepts
  a ``vae.`` prefix on every key, so a ``vae.`` prefix is stripped here too. One way to make the file (where
  torch is available)::

      sd = torch.load("pytorch_model.pt", map_location="cpu", weights_only=True)
      sd = sd.get("state_dict", sd)
      safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, "vae.safetensors")

The architecture is read off the tensor shapes (widths, levels, blocks per level, latent and video channels,
mid-block attention); ``norm_num_groups``, the compression ratios and ``scaling_factor`` (which no tensor carries)
come from a ``config.json`` next to the weights (diffusers' or the release's, whose ``time_compression_ratio`` is
read too), else the release values. Conversion is strict (``common.apply_rules``): any unknown key, unassigned
parameter or shape mismatch raises ``ConversionError`` listing all of them.

Library use::

    cfg = infer_config(tensors)                   # tensors: name -> np.ndarray
    params = convert_tensors(tensors, cfg)        # flat NNX path -> array
    vae = to_model(cfg, params)                   # HunyuanVAE
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from convert_weights import common
from convert_weights.common import ConversionError, Rule, rule
from convert_weights.wan_vae import TRANSFORMS as _WAN_VAE_TRANSFORMS
from models.vae.hunyuan_vae import HUNYUAN_VAE, MODEL, HunyuanVAEConfig

DIFFUSERS = "diffusers"
ORIGINAL = "original"
PREFIX = "vae."  # HunyuanVideo's loader strips it when every key carries it

# Named transforms: (source arrays, config) -> target arrays. Torch Conv3d weights are [O, I, t, h, w] ->
# [t, h, w, I, O]; 1x1x1 convs -> Linear kernels [I, O]; torch Linear [O, I] -> [I, O].
TRANSFORMS = {
    "identity": _WAN_VAE_TRANSFORMS["identity"],
    "conv3d": _WAN_VAE_TRANSFORMS["conv3d"],
    "pointwise": _WAN_VAE_TRANSFORMS["pointwise"],
    "linear": lambda xs, cfg: (_linear(xs[0]),),
}


def _linear(w: np.ndarray) -> np.ndarray:
    if w.ndim != 2:
        raise ValueError(f"linear expects an [O, I] weight, got {w.shape}")
    return w.T


# ---------------------------------------------------------------------------------------------------------
# Key table.


def _conv(src: str, dst: str) -> list[Rule]:
    """A ``HunyuanVideoCausalConv3d`` (weights under ``.conv``) -> ``CausalConv3d``."""
    return [rule(f"{src}.conv.weight", f"{dst}.kernel", "conv3d"), rule(f"{src}.conv.bias", f"{dst}.bias")]


def _pointwise(src: str, dst: str) -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}.kernel", "pointwise"), rule(f"{src}.bias", f"{dst}.bias")]


def _linear_rules(src: str, dst: str) -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}.kernel", "linear"), rule(f"{src}.bias", f"{dst}.bias")]


def _norm(src: str, dst: str) -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}.weight"), rule(f"{src}.bias", f"{dst}.bias")]


def _resnet(src: str, dst: str, shortcut: bool) -> list[Rule]:
    rules = [*_norm(f"{src}.norm1", f"{dst}.norm1"), *_conv(f"{src}.conv1", f"{dst}.conv1")]
    rules += [*_norm(f"{src}.norm2", f"{dst}.norm2"), *_conv(f"{src}.conv2", f"{dst}.conv2")]
    if shortcut:
        rules += [
            rule(f"{src}.conv_shortcut.conv.weight", f"{dst}.conv_shortcut.kernel", "pointwise"),
            rule(f"{src}.conv_shortcut.conv.bias", f"{dst}.conv_shortcut.bias"),
        ]
    return rules


def _mid(side: str, attention: bool) -> list[Rule]:
    src = dst = f"{side}.mid_block"
    rules = [r for j in (0, 1) for r in _resnet(f"{src}.resnets.{j}", f"{dst}.resnets.{j}", False)]
    if attention:
        a, b = f"{src}.attentions.0", f"{dst}.attention"
        rules += _norm(f"{a}.group_norm", f"{b}.group_norm")
        for name in ("to_q", "to_k", "to_v"):
            rules += _linear_rules(f"{a}.{name}", f"{b}.{name}")
        rules += _linear_rules(f"{a}.to_out.0", f"{b}.to_out")
    return rules


def key_rules(cfg: HunyuanVAEConfig) -> tuple[Rule, ...]:
    """The key table (diffusers = release names, without the ``vae.`` prefix) for the architecture ``cfg``."""
    ch, nrb = cfg.block_out_channels, cfg.layers_per_block
    rules = _conv("encoder.conv_in", "encoder.conv_in")
    for i, stride in enumerate(cfg.down_strides):
        cin = ch[max(i - 1, 0)]
        for j in range(nrb):
            p = f"encoder.down_blocks.{i}.resnets.{j}"
            rules += _resnet(p, p, (cin if j == 0 else ch[i]) != ch[i])
        if stride is not None:
            rules += _conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down_blocks.{i}.downsampler")
    rules += _mid("encoder", cfg.mid_block_add_attention)
    rules += _norm("encoder.conv_norm_out", "encoder.conv_norm_out") + _conv("encoder.conv_out", "encoder.conv_out")
    rules += _pointwise("quant_conv", "quant_conv") + _pointwise("post_quant_conv", "post_quant_conv")
    rules += _conv("decoder.conv_in", "decoder.conv_in") + _mid("decoder", cfg.mid_block_add_attention)
    rch = tuple(reversed(ch))
    for i, factor in enumerate(cfg.down_strides):
        cin = rch[max(i - 1, 0)]
        for j in range(nrb + 1):
            p = f"decoder.up_blocks.{i}.resnets.{j}"
            rules += _resnet(p, p, (cin if j == 0 else rch[i]) != rch[i])
        if factor is not None:
            rules += _conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up_blocks.{i}.upsampler.conv")
    rules += _norm("decoder.conv_norm_out", "decoder.conv_norm_out") + _conv("decoder.conv_out", "decoder.conv_out")
    return tuple(rules)


# ---------------------------------------------------------------------------------------------------------
# Architecture from the shapes.


def _as_source(tensors) -> common.ArraySource | common.SafetensorsSource:
    """A source view with the ``vae.`` prefix removed from the names that carry it."""
    if isinstance(tensors, (common.ArraySource, common.SafetensorsSource)):
        return tensors
    stripped = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    if len(stripped) != len(tensors):
        raise ConversionError(f"keys appear both with and without the {PREFIX!r} prefix")
    return common.ArraySource(stripped)


def _shape(source, key: str) -> tuple[int, ...]:
    if key not in source:
        raise ConversionError(
            f"not a HunyuanVideo VAE checkpoint: {key!r} is missing (first keys: {sorted(source.keys())[:6]})"
        )
    return tuple(source.shape(key))


def infer_config(tensors, **overrides) -> HunyuanVAEConfig:
    """The HunyuanVAEConfig of a checkpoint, read off its tensor shapes.

    Args:
      tensors: the flat checkpoint (a mapping, or a ``common.SafetensorsSource``).
      **overrides: fields no tensor carries (``norm_num_groups``, ``scaling_factor``, ``spatial_compression_ratio``,
        ``temporal_compression_ratio``; release values by default).

    Raises:
      ConversionError: not a HunyuanVideo VAE, or the inferred config is invalid.
    """
    source = _as_source(tensors)
    keys = source.keys()
    width0, in_channels = _shape(source, "encoder.conv_in.conv.weight")[:2]
    latent = _shape(source, "post_quant_conv.weight")[0]
    out_channels = _shape(source, "decoder.conv_out.conv.weight")[0]
    levels = common.layer_indices(keys, "encoder.down_blocks.{i}.resnets.0.norm1.weight")
    nrb = len(common.layer_indices(keys, "encoder.down_blocks.0.resnets.{i}.norm1.weight"))
    if not levels or levels != list(range(len(levels))) or nrb == 0:
        raise ConversionError(f"cannot infer the VAE levels: encoder down blocks {levels}, {nrb} resnets in block 0")
    widths = tuple(_shape(source, f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight")[0] for i in levels)
    if widths[0] != width0:
        raise ConversionError(f"encoder conv_in width {width0} differs from the first level's {widths[0]}")
    fields = dict(
        in_channels=in_channels,
        out_channels=out_channels,
        latent_channels=latent,
        block_out_channels=widths,
        layers_per_block=nrb,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in source,
    )
    fields.update(overrides)
    try:
        return HunyuanVAEConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"inferred VAE config is invalid: {e}") from e


def target_shapes(cfg: HunyuanVAEConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Flat parameter path -> (shape, layered=False) of ``HunyuanVAE(cfg)``, without allocating it."""
    from models.vae.hunyuan_vae import HunyuanVAE

    return common.module_target_shapes(HunyuanVAE, cfg)


def param_count(cfg: HunyuanVAEConfig) -> int:
    """Parameters of ``HunyuanVAE(cfg)`` (through ``nnx.eval_shape``; nothing is allocated)."""
    from models.vae.hunyuan_vae import HunyuanVAE

    return common.module_param_count(HunyuanVAE, cfg)


def convert_tensors(tensors, cfg: HunyuanVAEConfig | None = None, *, dtype=np.float32) -> dict[str, np.ndarray]:
    """Maps a flat HunyuanVideo VAE checkpoint onto the flat parameter paths of ``HunyuanVAE``, strictly.

    Args:
      tensors: name -> numpy array (diffusers / release names, optionally ``vae.``-prefixed) or a source.
      cfg: the architecture (default: ``infer_config(tensors)``).
      dtype: numpy dtype of the outputs.

    Raises:
      ConversionError: listing unknown source keys, unassigned targets and shape mismatches.
    """
    source = _as_source(tensors)
    cfg = cfg if cfg is not None else infer_config(source)
    return common.apply_rules(source, key_rules(cfg), TRANSFORMS, target_shapes(cfg), cfg, np.dtype(dtype))


def to_model(cfg: HunyuanVAEConfig, params: Mapping[str, np.ndarray], *, dtype=None):
    """A ``HunyuanVAE`` holding ``params`` (from ``convert_tensors``), built on ``nnx.eval_shape``."""
    from models.vae.hunyuan_vae import HunyuanVAE

    return common.module_from_params(
        lambda dt, rngs: HunyuanVAE(cfg, rngs=rngs, dtype=dt, param_dtype=dt),
        params,
        dtype=dtype,
        where="converted HunyuanVideo VAE",
    )


# ---------------------------------------------------------------------------------------------------------
# Files.

# config.json field -> HunyuanVAEConfig field, for the fields no tensor carries.
_CONFIG_FIELDS = {
    "norm_num_groups": "norm_num_groups",
    "scaling_factor": "scaling_factor",
    "spatial_compression_ratio": "spatial_compression_ratio",
    "temporal_compression_ratio": "temporal_compression_ratio",
    "time_compression_ratio": "temporal_compression_ratio",  # the release's AutoencoderKLCausal3D name
}
# config.json fields that the shapes determine: they must agree with what is inferred.
_CHECKED_FIELDS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block")


def open_source(src) -> tuple[common.SafetensorsSource, list[Path], dict]:
    """(source, files, config.json contents or {}) of a VAE checkpoint.

    ``src`` is a ``.safetensors`` file (a ``config.json`` beside it is used), a diffusers ``vae`` directory, or a
    pipeline directory holding ``vae/``. Pickles (``.pt`` / ``.pth``) are refused with the way to convert them.
    """
    src = common.component_dir(src, "vae")
    if src.is_file() and src.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        raise ConversionError(
            f"{src}: torch pickles are not read here; save its state dict as .safetensors first (see "
            "`python -m convert_weights hunyuan-vae --help`)"
        )
    files = common.find_source_files(src)
    folder = src if src.is_dir() else src.parent
    hf = common.read_json(folder / "config.json")
    return common.SafetensorsSource(files, strip_prefix=PREFIX), files, hf


def _config_overrides(hf: Mapping) -> dict:
    act = hf.get("act_fn", "silu")
    if act not in ("silu", "swish"):
        raise ConversionError(f"config.json act_fn={act!r}: only silu is supported (the release's)")
    return {field: hf[key] for key, field in _CONFIG_FIELDS.items() if hf.get(key) is not None}


def _check_against(cfg: HunyuanVAEConfig, hf: Mapping) -> None:
    wrong = {
        k: (hf[k], getattr(cfg, k))
        for k in _CHECKED_FIELDS
        if k in hf and (tuple(hf[k]) if isinstance(hf[k], list) else hf[k]) != getattr(cfg, k)
    }
    if wrong:
        raise ConversionError(f"config.json disagrees with the weights (config.json, weights): {wrong}")


def convert(src, dst, *, dtype: str = "fp32", hash_sources: bool = True, **overrides) -> dict:
    """Converts a HunyuanVideo VAE checkpoint into an orbax checkpoint directory; returns the manifest.

    Args:
      src: see ``open_source``.
      dst: output directory (written atomically).
      dtype: 'fp32' (default; the release decodes in fp16 / fp32, and the VAE is small), 'bf16' or 'fp16'.
      hash_sources: record the sha256 of each source file in the manifest.
      **overrides: config fields no tensor carries, taking precedence over config.json.
    """
    np_dtype = common.numpy_dtype(dtype)
    source, files, hf = open_source(src)
    cfg = infer_config(source, **{**_config_overrides(hf), **overrides})
    _check_against(cfg, hf)
    params = convert_tensors(source, cfg, dtype=np_dtype)
    original = hf.get("_class_name") == "AutoencoderKLCausal3D" or any(
        k.startswith(PREFIX) for f in files for k in common._header(f)[0]
    )
    return common.write_converted(
        dst,
        params,
        model=MODEL,
        variant="hunyuan-video" if cfg == HUNYUAN_VAE else "custom",
        source_format=ORIGINAL if original else DIFFUSERS,
        config=cfg,
        dtype=np_dtype,
        files=files,
        hash_sources=hash_sources,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the hunyuan-vae subcommand's options."""
    common.add_common_arguments(
        parser,
        src_help="diffusers vae dir / pipeline dir, or a .safetensors copy of the release's vae/pytorch_model.pt",
        default_dtype="fp32",
    )


def run(args: argparse.Namespace) -> int:
    """Runs the conversion described by the parsed arguments; returns the exit status."""
    m = common.convert_from_args(convert, args)
    print(f"wrote {args.dst}: HunyuanVideo VAE from {m['source_format']} ({common.size_text(m, 'M')})")
    return 0


DESCRIPTION = "HunyuanVideo causal 3-D VAE (diffusers vae directory, or a safetensors copy of the release's .pt)"
EXAMPLES = """examples:
  python -m convert_weights hunyuan-vae --src HunyuanVideo/vae --dst ckpt/hunyuan-vae
  python -m convert_weights hunyuan-vae --src HunyuanVideo --dst ckpt/hunyuan-vae          # pipeline dir: uses vae/
  python -m convert_weights hunyuan-vae --src hunyuan-video-t2v-720p/vae/vae.safetensors --dst ckpt/hunyuan-vae

The release ships vae/pytorch_model.pt, a torch pickle that is not read here; convert it once where torch is
installed (its names are diffusers' names; a 'vae.' prefix is stripped):
  python -c "import torch, safetensors.torch as st; sd = torch.load('pytorch_model.pt', map_location='cpu', \\
      weights_only=True); sd = sd.get('state_dict', sd); st.save_file({k: v.contiguous() for k, v in sd.items()}, \\
      'vae.safetensors')"
The config.json beside the weights (diffusers' or the release's) supplies norm_num_groups, the compression ratios
and scaling_factor; without one the release values are used. Load with models.vae.hunyuan_vae.load(DST).
"""
