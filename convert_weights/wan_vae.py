"""Wan2.1 VAE: diffusers ``AutoencoderKLWan`` and original Wan release weights -> ``models.vae.wan_vae.WanVAE``.

Two source layouts, told apart by their key names:

* ``diffusers``: the ``vae`` folder of the Wan2.1 diffusers repos (``encoder.down_blocks.0.norm1.gamma``,
  ``decoder.up_blocks.1.upsamplers.0.time_conv.weight``, ``quant_conv.weight``), safetensors.
* ``original``: the Wan2.1 release's ``Wan2.1_VAE.pth`` (``encoder.downsamples.0.residual.0.gamma``,
  ``decoder.upsamples.3.resample.1.weight``, ``conv1.weight``), as a ``.pth`` state dict (read with torch) or a
  ``.safetensors`` file with the same names (e.g. ComfyUI's ``wan_2.1_vae.safetensors``).

The architecture is read off the tensor shapes; the latent statistics (``latents_mean`` / ``latents_std``), which
no tensor carries, come from a diffusers ``config.json`` next to the weights when there is one, else the Wan2.1
values. Conversion is strict (``common.apply_rules``): any unknown key, unassigned parameter or shape mismatch
raises ``ConversionError`` listing all of them. Only the Wan2.1 architecture is supported (no Wan2.2 residual
blocks / patchified VAE, no encoder attention scales, decoder width equal to the encoder's).

Library use::

    tensors = {name: np.ndarray, ...}
    cfg = infer_config(tensors)
    params = convert_tensors(tensors, cfg)        # flat NNX path -> array
    vae = to_model(cfg, params)                   # WanVAE
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from convert_weights import common
from convert_weights.common import ConversionError, Rule, rule
from models.vae.wan_vae import MODEL, WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WanVAEConfig

DIFFUSERS = "diffusers"
ORIGINAL = "original"
FORMATS = (DIFFUSERS, ORIGINAL)

# ---------------------------------------------------------------------------------------------------------
# Named transforms: (source arrays, WanVAEConfig) -> target arrays. Torch convs are [out, in, (t,) h, w].


def _conv2d(w: np.ndarray) -> np.ndarray:
    if w.ndim != 4:
        raise ValueError(f"conv2d expects a [O, I, h, w] weight, got {w.shape}")
    return w.transpose(2, 3, 1, 0)


def _pointwise(w: np.ndarray) -> np.ndarray:
    if w.ndim < 2 or any(s != 1 for s in w.shape[2:]):
        raise ValueError(f"pointwise expects a [O, I, 1, ...] weight, got {w.shape}")
    return w.reshape(w.shape[:2]).T


def _gamma(g: np.ndarray) -> np.ndarray:
    if g.ndim < 1 or any(s != 1 for s in g.shape[1:]):
        raise ValueError(f"gamma expects a [C, 1, ...] weight, got {g.shape}")
    return g.reshape(g.shape[0])


TRANSFORMS = {
    "identity": lambda xs, cfg: (xs[0],),
    "conv3d": lambda xs, cfg: (common.conv3d_kernel(xs[0]),),  # Conv3d -> [t, h, w, I, O]
    "conv2d": lambda xs, cfg: (_conv2d(xs[0]),),  # Conv2d -> [h, w, I, O]
    "pointwise": lambda xs, cfg: (_pointwise(xs[0]),),  # 1x1(x1) conv -> Linear kernel [I, O]
    "gamma": lambda xs, cfg: (_gamma(xs[0]),),  # RMS norm gamma [C, 1, 1(, 1)] -> [C]
}

# ---------------------------------------------------------------------------------------------------------
# Names of the two layouts.


class _Names:
    """Source key prefixes of one layout."""

    def __init__(self, fmt: str, num_res_blocks: int):
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        self.fmt = fmt
        self.nrb = num_res_blocks

    @property
    def d(self) -> bool:
        return self.fmt == DIFFUSERS

    def conv_in(self, side: str) -> str:
        return f"{side}.conv_in" if self.d else f"{side}.conv1"

    def norm_out(self, side: str) -> str:
        return f"{side}.norm_out" if self.d else f"{side}.head.0"

    def conv_out(self, side: str) -> str:
        return f"{side}.conv_out" if self.d else f"{side}.head.2"

    @property
    def quant(self) -> str:
        return "quant_conv" if self.d else "conv1"

    @property
    def post_quant(self) -> str:
        return "post_quant_conv" if self.d else "conv2"

    def enc_layer(self, k: int | str) -> str:
        return f"encoder.down_blocks.{k}" if self.d else f"encoder.downsamples.{k}"

    def mid_resnet(self, side: str, j: int) -> str:
        return f"{side}.mid_block.resnets.{j}" if self.d else f"{side}.middle.{2 * j}"

    def mid_attn(self, side: str) -> str:
        return f"{side}.mid_block.attentions.0" if self.d else f"{side}.middle.1"

    def dec_resnet(self, i: int, j: int) -> str:
        # The release numbers the decoder layers flatly: per level nrb + 1 resnets, then one upsampler.
        return f"decoder.up_blocks.{i}.resnets.{j}" if self.d else f"decoder.upsamples.{i * (self.nrb + 2) + j}"

    def dec_upsampler(self, i: int) -> str:
        return (
            f"decoder.up_blocks.{i}.upsamplers.0"
            if self.d
            else f"decoder.upsamples.{i * (self.nrb + 2) + self.nrb + 1}"
        )

    def resnet_parts(self) -> dict[str, str]:
        """Target submodule -> source submodule of a residual block."""
        if self.d:
            return {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "shortcut": "conv_shortcut"}
        return {
            "norm1": "residual.0",
            "conv1": "residual.2",
            "norm2": "residual.3",
            "conv2": "residual.6",
            "shortcut": "shortcut",
        }


def _conv(src: str, dst: str, transform: str = "conv3d") -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}.kernel", transform), rule(f"{src}.bias", f"{dst}.bias")]


def _resnet(n: _Names, src: str, dst: str, shortcut: bool) -> list[Rule]:
    p = n.resnet_parts()
    rules = [
        rule(f"{src}.{p['norm1']}.gamma", f"{dst}.norm1.gamma", "gamma"),
        *_conv(f"{src}.{p['conv1']}", f"{dst}.conv1"),
        rule(f"{src}.{p['norm2']}.gamma", f"{dst}.norm2.gamma", "gamma"),
        *_conv(f"{src}.{p['conv2']}", f"{dst}.conv2"),
    ]
    if shortcut:
        rules += _conv(f"{src}.{p['shortcut']}", f"{dst}.shortcut", "pointwise")
    return rules


def _resample(src: str, dst: str, temporal: bool) -> list[Rule]:
    rules = _conv(f"{src}.resample.1", f"{dst}.conv", "conv2d")
    if temporal:
        rules += _conv(f"{src}.time_conv", f"{dst}.time_conv")
    return rules


def _mid(n: _Names, side: str) -> list[Rule]:
    attn, dst = n.mid_attn(side), f"{side}.mid_block"
    return [
        *_resnet(n, n.mid_resnet(side, 0), f"{dst}.resnet_0", False),
        rule(f"{attn}.norm.gamma", f"{dst}.attention.norm.gamma", "gamma"),
        *_conv(f"{attn}.to_qkv", f"{dst}.attention.to_qkv", "pointwise"),
        *_conv(f"{attn}.proj", f"{dst}.attention.proj", "pointwise"),
        *_resnet(n, n.mid_resnet(side, 1), f"{dst}.resnet_1", False),
    ]


def key_rules(cfg: WanVAEConfig, fmt: str) -> tuple[Rule, ...]:
    """The key table of ``fmt`` ('diffusers' or 'original') for the architecture ``cfg``."""
    n = _Names(fmt, cfg.num_res_blocks)
    levels = len(cfg.dim_mult)
    rules = [*_conv(n.conv_in("encoder"), "encoder.conv_in")]
    dims, k = cfg.dims_encoder, 0
    for i in range(levels):
        cin = dims[i]
        for _ in range(cfg.num_res_blocks):
            rules += _resnet(n, n.enc_layer(k), f"encoder.down_blocks.{k}", cin != dims[i + 1])
            cin, k = dims[i + 1], k + 1
        if i < levels - 1:
            rules += _resample(n.enc_layer(k), f"encoder.down_blocks.{k}", cfg.temperal_downsample[i])
            k += 1
    rules += _mid(n, "encoder")
    rules += [rule(f"{n.norm_out('encoder')}.gamma", "encoder.norm_out.gamma", "gamma")]
    rules += _conv(n.conv_out("encoder"), "encoder.conv_out")
    rules += _conv(n.quant, "quant_conv", "pointwise") + _conv(n.post_quant, "post_quant_conv", "pointwise")

    rules += _conv(n.conv_in("decoder"), "decoder.conv_in")
    rules += _mid(n, "decoder")
    dims, upsample = cfg.dims_decoder, tuple(reversed(cfg.temperal_downsample))
    for i in range(levels):
        cin = dims[i] // (2 if i > 0 else 1)
        for j in range(cfg.num_res_blocks + 1):
            rules += _resnet(n, n.dec_resnet(i, j), f"decoder.up_blocks.{i}.resnets.{j}", cin != dims[i + 1])
            cin = dims[i + 1]
        if i < levels - 1:
            rules += _resample(n.dec_upsampler(i), f"decoder.up_blocks.{i}.upsampler", upsample[i])
    rules += [rule(f"{n.norm_out('decoder')}.gamma", "decoder.norm_out.gamma", "gamma")]
    rules += _conv(n.conv_out("decoder"), "decoder.conv_out")
    return tuple(rules)


# ---------------------------------------------------------------------------------------------------------
# Architecture from the shapes.


def detect_format(tensors) -> str:
    """'diffusers' or 'original', from the key names of a mapping or a source."""
    keys = set(common.as_source(tensors).keys())
    if "encoder.conv_in.weight" in keys and "quant_conv.weight" in keys:
        return DIFFUSERS
    if "encoder.conv1.weight" in keys and "conv1.weight" in keys:
        return ORIGINAL
    raise ConversionError(
        "not a Wan2.1 VAE checkpoint: neither encoder.conv_in.weight + quant_conv.weight (diffusers) nor "
        f"encoder.conv1.weight + conv1.weight (original release) is present; first keys: {sorted(keys)[:8]}"
    )


def _shape(source, key: str) -> tuple[int, ...]:
    return common.require_shape(source, key, "the VAE architecture")


def infer_config(tensors, **overrides) -> WanVAEConfig:
    """The WanVAEConfig of a checkpoint, read off its tensor shapes.

    Args:
      tensors: the flat checkpoint (diffusers or original names): a mapping or a ``common.SafetensorsSource``.
      **overrides: fields no tensor carries (``latents_mean``, ``latents_std``; Wan2.1 values by default).

    Returns:
      The architecture config.

    Raises:
      ConversionError: an unrecognised layout or a tensor needed for inference is missing.
    """
    source = common.as_source(tensors)
    fmt = detect_format(source)
    n = _Names(fmt, 0)
    keys = source.keys()
    base_dim, in_channels = _shape(source, f"{n.conv_in('encoder')}.weight")[:2]
    z_dim = _shape(source, f"{n.post_quant}.weight")[0]
    out_channels, dec_base = _shape(source, f"{n.conv_out('decoder')}.weight")[:2]
    if dec_base != base_dim:
        raise ConversionError(f"decoder base width {dec_base} differs from the encoder's {base_dim} (not Wan2.1)")
    gamma = f"{n.resnet_parts()['norm1']}.gamma"
    layers = common.layer_indices(keys, n.enc_layer("{i}") + ".resample.1.weight")
    resnets = common.layer_indices(keys, n.enc_layer("{i}") + "." + gamma)
    if not resnets:
        raise ConversionError("cannot infer the VAE architecture: no encoder residual blocks found")
    nrb = layers[0] if layers else len(resnets)
    num_levels = len(layers) + 1
    dim_mult, temporal = [], []
    for i in range(num_levels):
        width = _shape(source, f"{n.enc_layer(i * (nrb + 1))}.{n.resnet_parts()['conv1']}.weight")[0]
        if width % base_dim:
            raise ConversionError(f"encoder level {i} width {width} is not a multiple of the base width {base_dim}")
        dim_mult.append(width // base_dim)
        if i < num_levels - 1:
            temporal.append(f"{n.enc_layer(i * (nrb + 1) + nrb)}.time_conv.weight" in source)
    fields = dict(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=tuple(dim_mult),
        num_res_blocks=nrb,
        temperal_downsample=tuple(temporal),
        in_channels=in_channels,
        out_channels=out_channels,
    )
    if z_dim == len(WAN21_LATENTS_MEAN):
        fields.update(latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD)
    fields.update(overrides)
    if "latents_mean" not in fields or "latents_std" not in fields:
        raise ConversionError(f"z_dim={z_dim}: pass latents_mean and latents_std (no Wan2.1 defaults for it)")
    try:
        return WanVAEConfig(**fields)
    except ValueError as e:
        raise ConversionError(f"inferred VAE config is invalid: {e}") from e


def target_shapes(cfg: WanVAEConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Flat parameter path -> (shape, layered=False) of ``WanVAE(cfg)``, without allocating it."""
    from models.vae.wan_vae import WanVAE

    return common.module_target_shapes(WanVAE, cfg)


def param_count(cfg: WanVAEConfig) -> int:
    """Parameters of ``WanVAE(cfg)`` (through ``nnx.eval_shape``; nothing is allocated)."""
    from models.vae.wan_vae import WanVAE

    return common.module_param_count(WanVAE, cfg)


def convert_tensors(tensors, cfg: WanVAEConfig | None = None, *, dtype=np.float32) -> dict[str, np.ndarray]:
    """Maps a flat Wan VAE checkpoint onto the flat parameter paths of ``WanVAE``, strictly.

    Args:
      tensors: name -> numpy array with diffusers or original release names (or a ``common.SafetensorsSource``).
      cfg: the architecture (default: ``infer_config(tensors)``).
      dtype: numpy dtype of the outputs.

    Returns:
      Flat NNX parameter path ('encoder.down_blocks.0.conv1.kernel', ...) -> array.

    Raises:
      ConversionError: listing unknown source keys, unassigned targets and shape mismatches.
    """
    source = common.as_source(tensors)
    fmt = detect_format(source)
    cfg = cfg if cfg is not None else infer_config(source)
    return common.apply_rules(source, key_rules(cfg, fmt), TRANSFORMS, target_shapes(cfg), cfg, np.dtype(dtype))


def to_model(cfg: WanVAEConfig, params: Mapping[str, np.ndarray], *, dtype=None):
    """A ``WanVAE`` holding ``params`` (from ``convert_tensors``), built on ``nnx.eval_shape``.

    Args:
      cfg: the architecture.
      params: flat parameter path -> array, covering the model exactly.
      dtype: parameter and compute dtype (default: that of the arrays).

    Raises:
      ValueError: missing, unexpected or mis-shaped parameters (all listed).
    """
    from models.vae.wan_vae import WanVAE

    return common.module_from_params(
        lambda dt, rngs: WanVAE(cfg, rngs=rngs, dtype=dt, param_dtype=dt),
        params,
        dtype=dtype,
        where="converted Wan VAE",
    )


# ---------------------------------------------------------------------------------------------------------
# Files.


def open_source(src) -> tuple[common.ArraySource | common.SafetensorsSource, list[Path], dict]:
    """(source, files, diffusers config.json contents or {}) of a VAE checkpoint.

    ``src`` is a ``.safetensors`` file, a ``.pth`` state dict (the original release; needs torch), a diffusers
    ``vae`` directory, or a diffusers pipeline directory holding ``vae/``.
    """
    src = common.component_dir(src, "vae")
    if src.is_file() and src.suffix in (".pth", ".pt"):
        try:
            import torch
        except ImportError as e:
            raise ConversionError(f"{src}: reading a .pth checkpoint needs torch; or pass a .safetensors copy") from e
        state = torch.load(src, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ConversionError(f"{src}: expected a state dict, got {type(state).__name__}")
        tensors = {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
        return common.ArraySource(tensors), [src], {}
    files = common.find_source_files(src)
    hf = common.read_json(src / "config.json") if src.is_dir() else {}
    return common.SafetensorsSource(files), files, hf


def _config_overrides(hf: Mapping) -> dict:
    unsupported = {
        k: hf[k]
        for k, ok in (("is_residual", False), ("patch_size", None), ("attn_scales", []), ("decoder_base_dim", None))
        if k in hf and hf[k] != ok
    }
    if unsupported:
        raise ConversionError(f"config.json describes a VAE other than Wan2.1 ({unsupported}); not supported")
    return {k: tuple(hf[k]) for k in ("latents_mean", "latents_std") if hf.get(k) is not None}


def convert(src, dst, *, dtype: str = "fp32", hash_sources: bool = True, **overrides) -> dict:
    """Converts a Wan2.1 VAE checkpoint into an orbax checkpoint directory; returns the manifest.

    Args:
      src: see ``open_source``.
      dst: output directory (written atomically).
      dtype: 'fp32' (default; the VAE is small and the release runs it in float32), 'bf16' or 'fp16'.
      hash_sources: record the sha256 of each source file in the manifest.
      **overrides: ``latents_mean`` / ``latents_std``, taking precedence over config.json and the Wan2.1 values.
    """
    np_dtype = common.numpy_dtype(dtype)
    source, files, hf = open_source(src)
    fmt = detect_format(source)
    cfg = infer_config(source, **{**_config_overrides(hf), **overrides})
    params = convert_tensors(source, cfg, dtype=np_dtype)
    return common.write_converted(
        dst,
        params,
        model=MODEL,
        variant="wan2.1",
        source_format=fmt,
        config=cfg,
        dtype=np_dtype,
        files=files,
        hash_sources=hash_sources,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the wan-vae subcommand's options."""
    common.add_common_arguments(
        parser, src_help="diffusers vae dir / pipeline dir, .safetensors or Wan2.1_VAE.pth", default_dtype="fp32"
    )


def run(args: argparse.Namespace) -> int:
    """Runs the conversion described by the parsed arguments; returns the exit status."""
    m = common.convert_from_args(convert, args)
    print(f"wrote {args.dst}: Wan2.1 VAE from {m['source_format']} ({common.size_text(m, 'M')})")
    return 0


DESCRIPTION = "Wan2.1 VAE (diffusers vae directory, or the original release Wan2.1_VAE.pth / .safetensors)"
EXAMPLES = """examples:
  python -m convert_weights wan-vae --src Wan2.1-T2V-1.3B-Diffusers/vae --dst ckpt/wan-vae
  python -m convert_weights wan-vae --src Wan2.1-T2V-14B/Wan2.1_VAE.pth --dst ckpt/wan-vae
load with models.vae.wan_vae.load(DST).
"""
