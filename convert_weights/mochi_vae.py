"""Mochi 1 VAE: diffusers ``AutoencoderKLMochi`` and genmo release weights -> ``models.vae.mochi_vae.MochiVAE``.

Two source layouts, told apart by their key names:

* ``diffusers``: the ``vae`` folder of ``genmo/mochi-1-preview`` in diffusers format
  (``decoder.up_blocks.0.resnets.0.conv1.conv.weight``, ``encoder.down_blocks.1.attentions.0.to_q.weight``),
  safetensors, plus ``config.json``.
* ``original``: genmo's ``decoder.safetensors`` and ``encoder.safetensors`` (each without a prefix:
  ``blocks.1.blocks.0.stack.2.weight``, ``layers.5.layers.1.attn_block.attn.qkv.weight``). The names are those
  of diffusers' upstream ``scripts/convert_mochi_to_diffusers.py`` (``convert_mochi_vae_state_dict_to_diffusers``,
  not shipped in the diffusers wheel): residual blocks ``stack.{0, 2, 3, 5}`` = norm1, conv1, norm2, conv2; the
  encoder's attention ``attn_block.{norm, attn.qkv, attn.out}`` with q, k, v fused. No real genmo file was
  available to check them against; the decoder file alone gives a decoder-only model.

The architecture is read off the tensor shapes; the latent statistics, which no tensor carries, come from a
diffusers ``config.json`` next to the weights when there is one, else the Mochi 1 values. Conversion is strict
(``common.apply_rules``): any unknown key, unassigned parameter or shape mismatch raises ``ConversionError``
listing all of them.

Library use::

    tensors = {name: np.ndarray, ...}             # diffusers names, or original names with encoder./decoder.
    cfg = infer_config(tensors)
    params = convert_tensors(tensors, cfg)        # flat NNX path -> array
    vae = to_model(cfg, params)                   # MochiVAE
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from convert_weights import common
from convert_weights.common import ConversionError, Rule, rule
from models.vae.mochi_vae import MOCHI_VAE, MODEL, MochiVAEConfig

DIFFUSERS = "diffusers"
ORIGINAL = "original"
FORMATS = (DIFFUSERS, ORIGINAL)
GENMO_FILES = ("encoder.safetensors", "decoder.safetensors")

# ---------------------------------------------------------------------------------------------------------
# Named transforms: (source arrays, MochiVAEConfig) -> target arrays. Torch layouts: Conv3d [O, I, t, h, w],
# Linear [O, I].


def _linear(w: np.ndarray) -> np.ndarray:
    # nn.Linear [O, I], or a 1x1x1 Conv3d [O, I, 1, 1, 1] (the decoder's conv_in).
    if w.ndim < 2 or any(s != 1 for s in w.shape[2:]):
        raise ValueError(f"linear expects a [O, I] or [O, I, 1, 1, 1] weight, got {w.shape}")
    return w.reshape(w.shape[:2]).T


def _qkv(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if w.ndim != 2 or w.shape[0] != 3 * w.shape[1]:
        raise ValueError(f"qkv expects a fused [3C, C] weight, got {w.shape}")
    return tuple(part.T for part in np.split(w, 3, axis=0))


TRANSFORMS = {
    "identity": lambda xs, cfg: (xs[0],),
    "conv3d": lambda xs, cfg: (common.conv3d_kernel(xs[0]),),  # -> [t, h, w, I, O]
    "linear": lambda xs, cfg: (_linear(xs[0]),),  # -> nnx.Linear kernel [I, O]
    "qkv": lambda xs, cfg: _qkv(xs[0]),  # fused genmo qkv -> to_q, to_k, to_v kernels
}

# ---------------------------------------------------------------------------------------------------------
# Names of the two layouts. Encoder blocks are numbered k = 0 (block_in), 1..n (down blocks), n + 1
# (block_out); decoder blocks k = 0 (block_in), 1..n (up blocks), n + 1 (block_out).


class _Names:
    """Source key prefixes of one layout; ``enc_in_layers`` is the number of residual blocks of the encoder's
    block_in and ``n`` the number of down / up blocks (genmo numbers the encoder's layers flatly)."""

    def __init__(self, fmt: str, n: int, enc_in_layers: int):
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        self.d = fmt == DIFFUSERS
        self.n = n
        self.l0 = enc_in_layers

    def enc_resnet(self, k: int, i: int) -> str:
        if self.d:
            return f"{self._enc_block(k)}.resnets.{i}"
        if k == 0:
            return f"encoder.layers.{i + 1}"
        if k <= self.n:
            return f"encoder.layers.{self.l0 + k}.layers.{i + 1}"
        return f"encoder.layers.{self.l0 + self.n + 1 + i}"

    def enc_norm(self, k: int, i: int) -> str:
        return f"{self._enc_block(k)}.norms.{i}.norm_layer" if self.d else f"{self.enc_resnet(k, i)}.attn_block.norm"

    def enc_attn(self, k: int, i: int) -> str:
        return f"{self._enc_block(k)}.attentions.{i}" if self.d else f"{self.enc_resnet(k, i)}.attn_block.attn"

    def enc_down_conv(self, k: int) -> str:
        return f"encoder.down_blocks.{k - 1}.conv_in.conv" if self.d else f"encoder.layers.{self.l0 + k}.layers.0"

    @property
    def enc_proj_in(self) -> str:
        return "encoder.proj_in" if self.d else "encoder.layers.0"

    @property
    def enc_norm_out(self) -> str:
        return "encoder.norm_out.norm_layer" if self.d else "encoder.output_norm"

    @property
    def enc_proj_out(self) -> str:
        return "encoder.proj_out" if self.d else "encoder.output_proj"

    def dec_resnet(self, k: int, i: int) -> str:
        if self.d:
            block = "block_in" if k == 0 else "block_out" if k == self.n + 1 else f"up_blocks.{k - 1}"
            return f"decoder.{block}.resnets.{i}"
        if k == 0:
            return f"decoder.blocks.0.{i + 1}"
        if k <= self.n:
            return f"decoder.blocks.{k}.blocks.{i}"
        return f"decoder.blocks.{self.n + 1}.{i}"

    def dec_up_proj(self, k: int) -> str:
        return f"decoder.up_blocks.{k - 1}.proj" if self.d else f"decoder.blocks.{k}.proj"

    @property
    def dec_conv_in(self) -> str:
        return "decoder.conv_in" if self.d else "decoder.blocks.0.0"

    @property
    def dec_proj_out(self) -> str:
        return "decoder.proj_out" if self.d else "decoder.output_proj"

    def resnet_part(self, part: str) -> str:
        """Source submodule holding the weight and bias of a residual block's norm1 / conv1 / norm2 / conv2."""
        if self.d:
            return f"{part}.norm_layer" if part.startswith("norm") else f"{part}.conv"
        return {"norm1": "stack.0", "conv1": "stack.2", "norm2": "stack.3", "conv2": "stack.5"}[part]

    def _enc_block(self, k: int) -> str:
        if k == 0:
            return "encoder.block_in"
        return f"encoder.down_blocks.{k - 1}" if k <= self.n else "encoder.block_out"


def _gn(src: str, dst: str) -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}.scale"), rule(f"{src}.bias", f"{dst}.bias")]


def _conv(src: str, dst: str) -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}.kernel", "conv3d"), rule(f"{src}.bias", f"{dst}.bias")]


def _lin(src: str, dst: str, bias: bool = True) -> list[Rule]:
    rules = [rule(f"{src}.weight", f"{dst}.kernel", "linear")]
    return rules + [rule(f"{src}.bias", f"{dst}.bias")] if bias else rules


def _resnet(n: _Names, src: str, dst: str) -> list[Rule]:
    rules = []
    for part in ("norm1", "conv1", "norm2", "conv2"):
        rules += (_gn if part.startswith("norm") else _conv)(f"{src}.{n.resnet_part(part)}", f"{dst}.{part}")
    return rules


def _attention(n: _Names, k: int, i: int, dst: str) -> list[Rule]:
    src = n.enc_attn(k, i)
    rules = _gn(n.enc_norm(k, i), f"{dst}.norms.{i}")
    a = f"{dst}.attentions.{i}"
    if n.d:
        rules += [rule(f"{src}.to_{p}.weight", f"{a}.to_{p}.kernel", "linear") for p in "qkv"]
        return rules + _lin(f"{src}.to_out.0", f"{a}.to_out")
    rules += [rule(f"{src}.qkv.weight", (f"{a}.to_q.kernel", f"{a}.to_k.kernel", f"{a}.to_v.kernel"), "qkv")]
    return rules + _lin(f"{src}.out", f"{a}.to_out")


def _block_path(side: str, middle: str, k: int, nb: int) -> str:
    """Target path of block k: block_in (0), ``middle.{k - 1}`` (1..nb), block_out (nb + 1)."""
    if k == 0:
        return f"{side}.block_in"
    return f"{side}.block_out" if k == nb + 1 else f"{side}.{middle}.{k - 1}"


def key_rules(cfg: MochiVAEConfig, fmt: str) -> tuple[Rule, ...]:
    """The key table of ``fmt`` ('diffusers' or 'original') for the architecture ``cfg``."""
    layers, nb = cfg.layers_per_block, len(cfg.decoder_block_out_channels) - 1
    n = _Names(fmt, nb, layers[0])
    rules: list[Rule] = []
    if cfg.with_encoder:
        rules += _lin(n.enc_proj_in, "encoder.proj_in")
        for k in range(nb + 2):
            dst = _block_path("encoder", "down_blocks", k, nb)
            if 0 < k <= nb:
                rules += _conv(n.enc_down_conv(k), f"{dst}.conv_in")
            for i in range(layers[k]):
                rules += _resnet(n, n.enc_resnet(k, i), f"{dst}.resnets.{i}")
                if cfg.add_attention_block[k]:
                    rules += _attention(n, k, i, dst)
        rules += _gn(n.enc_norm_out, "encoder.norm_out") + _lin(n.enc_proj_out, "encoder.proj_out", bias=False)
    rules += _lin(n.dec_conv_in, "decoder.conv_in")
    for k in range(nb + 2):
        dst = _block_path("decoder", "up_blocks", k, nb)
        for i in range(layers[-1 - k]):  # the decoder runs the blocks in reverse order
            rules += _resnet(n, n.dec_resnet(k, i), f"{dst}.resnets.{i}")
        if 0 < k <= nb:
            rules += _lin(n.dec_up_proj(k), f"{dst}.proj")
    rules += _lin(n.dec_proj_out, "decoder.proj_out")
    return tuple(rules)


# ---------------------------------------------------------------------------------------------------------
# Sources and architecture from the shapes.


class PrefixedSource:
    """Several sources seen as one, each key prefixed (genmo's ``encoder.safetensors`` -> ``encoder.*``)."""

    def __init__(self, parts: Sequence[tuple[str, common.ArraySource | common.SafetensorsSource]]):
        self._where: dict[str, tuple[object, str]] = {}
        for prefix, source in parts:
            for key in source.keys():
                self._where[prefix + key] = (source, key)

    def keys(self) -> list[str]:
        return sorted(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        source, raw = self._where[key]
        return tuple(source.shape(raw))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> np.ndarray:
        source, raw = self._where[key]
        return source.get(raw)


Source = common.ArraySource | common.SafetensorsSource | PrefixedSource


def detect_format(tensors) -> str:
    """'diffusers' or 'original' (genmo names with ``encoder.`` / ``decoder.`` prefixes), from the key names."""
    keys = set(common.as_source(tensors).keys())
    if "decoder.conv_in.weight" in keys and "decoder.proj_out.weight" in keys:
        return DIFFUSERS
    if "decoder.blocks.0.0.weight" in keys and "decoder.output_proj.weight" in keys:
        return ORIGINAL
    raise ConversionError(
        "not a Mochi VAE checkpoint: neither decoder.conv_in.weight + decoder.proj_out.weight (diffusers) nor "
        f"decoder.blocks.0.0.weight + decoder.output_proj.weight (genmo, prefixed) is present; first keys: "
        f"{sorted(keys)[:8]}"
    )


def _shape(source: Source, key: str) -> tuple[int, ...]:
    return common.require_shape(source, key, "the VAE architecture")


def _layer_counts(keys: Sequence[str], fmt: str) -> tuple[int, tuple[int, ...], tuple[int, ...] | None]:
    """(up / down block count, residual blocks per decoder block k = 0..n+1, per encoder block or None)."""
    n_of = lambda pattern: len(common.layer_indices(keys, pattern))  # noqa: E731
    if fmt == DIFFUSERS:
        nb = n_of("decoder.up_blocks.{i}.proj.weight")
        dec = [n_of("decoder.block_in.resnets.{i}.norm1.norm_layer.weight")]
        dec += [n_of(f"decoder.up_blocks.{k}.resnets.{{i}}.norm1.norm_layer.weight") for k in range(nb)]
        dec += [n_of("decoder.block_out.resnets.{i}.norm1.norm_layer.weight")]
        if not any(k.startswith("encoder.") for k in keys):
            return nb, tuple(dec), None
        enc = [n_of("encoder.block_in.resnets.{i}.norm1.norm_layer.weight")]
        enc += [n_of(f"encoder.down_blocks.{k}.resnets.{{i}}.norm1.norm_layer.weight") for k in range(nb)]
        enc += [n_of("encoder.block_out.resnets.{i}.norm1.norm_layer.weight")]
        return nb, tuple(dec), tuple(enc)
    nb = n_of("decoder.blocks.{i}.proj.weight")  # up blocks are blocks.1 .. blocks.nb
    dec = [n_of("decoder.blocks.0.{i}.stack.0.weight")]  # blocks.0.0 is conv_in
    dec += [n_of(f"decoder.blocks.{k}.blocks.{{i}}.stack.0.weight") for k in range(1, nb + 1)]
    dec += [n_of(f"decoder.blocks.{nb + 1}.{{i}}.stack.0.weight")]
    if not any(k.startswith("encoder.") for k in keys):
        return nb, tuple(dec), None
    top = common.layer_indices(keys, "encoder.layers.{i}.stack.0.weight")  # block_in and block_out resnets
    down = common.layer_indices(keys, "encoder.layers.{i}.layers.0.weight")  # down blocks' strided convs
    if len(down) != nb:
        raise ConversionError(f"genmo encoder has {len(down)} down blocks, the decoder {nb} up blocks")
    first, last = (down[0], down[-1]) if down else (len(top) + 1, len(top))
    enc = [sum(i < first for i in top)]
    enc += [len([i for i in common.layer_indices(keys, f"encoder.layers.{d}.layers.{{i}}.stack.0.weight") if i > 0])
            for d in down]  # fmt: skip
    enc += [sum(i > last for i in top)]
    return nb, tuple(dec), tuple(enc)


def infer_config(tensors, **overrides) -> MochiVAEConfig:
    """The MochiVAEConfig of a checkpoint, read off its tensor shapes.

    Args:
        tensors: the flat checkpoint (diffusers names, or genmo names prefixed ``encoder.`` / ``decoder.``): a
            mapping or a source.
        **overrides: fields no tensor carries (``latents_mean``, ``latents_std``, ``scaling_factor``; Mochi 1
            values by default), and for a decoder-only checkpoint ``temporal_expansions`` /
            ``spatial_expansions`` when they are not Mochi 1's.

    Raises:
        ConversionError: an unrecognised layout, a tensor needed for inference is missing, or the parts disagree.
    """
    source = common.as_source(tensors)
    fmt = detect_format(source)
    d = fmt == DIFFUSERS
    nb, dec_layers, enc_layers = _layer_counts(source.keys(), fmt)
    if nb < 1:
        raise ConversionError("cannot infer the VAE architecture: no decoder up blocks found")
    with_encoder = enc_layers is not None
    layers = tuple(reversed(dec_layers))  # encoder order: block_in, down blocks, block_out
    n = _Names(fmt, nb, layers[0])
    latent_channels = _shape(source, f"{n.dec_conv_in}.weight")[1]
    out_channels = _shape(source, f"{n.dec_proj_out}.weight")[0]
    dec_ch = [_shape(source, f"{n.dec_conv_in}.weight")[0]]  # lowest resolution first
    for k in range(1, nb + 1):
        dec_ch.append(_shape(source, f"{n.dec_up_proj(k)}.weight")[1])
    dec_ch.append(_shape(source, f"{n.dec_proj_out}.weight")[1])
    if dec_ch[0] != dec_ch[1]:
        raise ConversionError(f"decoder conv_in width {dec_ch[0]} differs from the first up block's {dec_ch[1]}")
    decoder_block_out_channels = tuple(reversed(dec_ch[1:]))  # highest resolution first
    fields: dict = dict(
        out_channels=out_channels,
        latent_channels=latent_channels,
        decoder_block_out_channels=decoder_block_out_channels,
        layers_per_block=layers,
        with_encoder=with_encoder,
    )
    if with_encoder:
        enc_ch, temporal, spatial = [_shape(source, f"{n.enc_proj_in}.weight")[0]], [], []
        fields["in_channels"] = _shape(source, f"{n.enc_proj_in}.weight")[1]
        for k in range(1, nb + 1):
            o, i, st, sh, sw = _shape(source, f"{n.enc_down_conv(k)}.weight")
            if sh != sw or i != enc_ch[-1]:
                raise ConversionError(f"encoder down block {k - 1}: unexpected conv shape {(o, i, st, sh, sw)}")
            enc_ch.append(o)
            temporal.append(st)
            spatial.append(sh)
        if enc_layers != layers:
            raise ConversionError(f"encoder residual blocks per block {enc_layers} differ from the decoder's {layers}")
        fields.update(
            encoder_block_out_channels=tuple(enc_ch),
            temporal_expansions=tuple(temporal),
            spatial_expansions=tuple(spatial),
            add_attention_block=tuple(
                layers[k] > 0 and f"{n.enc_attn(k, 0)}.{'to_q' if d else 'qkv'}.weight" in source for k in range(nb + 2)
            ),
        )
        z2 = _shape(source, f"{n.enc_proj_out}.weight")[0]
        if z2 != 2 * latent_channels:
            raise ConversionError(f"encoder emits {z2} channels, expected 2 x {latent_channels} latent channels")
    else:
        # Time and space factors of an up block are not separable from its projection alone: Mochi 1's unless
        # overridden, checked against the shapes.
        temporal = tuple(overrides.get("temporal_expansions", MOCHI_VAE.temporal_expansions))
        spatial = tuple(overrides.get("spatial_expansions", MOCHI_VAE.spatial_expansions))
        same_len = len(MOCHI_VAE.encoder_block_out_channels) == nb + 1
        fields.update(
            temporal_expansions=temporal,
            spatial_expansions=spatial,
            encoder_block_out_channels=MOCHI_VAE.encoder_block_out_channels if same_len else decoder_block_out_channels,
            add_attention_block=MOCHI_VAE.add_attention_block if same_len else (False,) * (nb + 2),
        )
        if len(temporal) != nb or len(spatial) != nb:
            raise ConversionError(f"decoder-only checkpoint with {nb} up blocks: pass temporal/spatial_expansions")
    # Each up block's projection must produce cout * st * ss * ss channels.
    for k in range(1, nb + 1):
        width = _shape(source, f"{n.dec_up_proj(k)}.weight")[0]
        st, ss = fields["temporal_expansions"][-k], fields["spatial_expansions"][-k]
        cout = decoder_block_out_channels[-k - 1]
        if width != cout * st * ss * ss:
            raise ConversionError(
                f"decoder up block {k - 1}: projection to {width} channels, expected {cout} x {st} x {ss}^2; "
                "pass temporal_expansions / spatial_expansions"
            )
    if latent_channels == len(MOCHI_VAE.latents_mean):
        fields.update(latents_mean=MOCHI_VAE.latents_mean, latents_std=MOCHI_VAE.latents_std)
    fields.update(overrides)
    if "latents_mean" not in fields or "latents_std" not in fields:
        raise ConversionError(f"latent_channels={latent_channels}: pass latents_mean and latents_std")
    try:
        return MochiVAEConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"inferred VAE config is invalid: {e}") from e


def target_shapes(cfg: MochiVAEConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Flat parameter path -> (shape, layered=False) of ``MochiVAE(cfg)``, without allocating it."""
    from models.vae.mochi_vae import MochiVAE

    return common.module_target_shapes(MochiVAE, cfg)


def param_count(cfg: MochiVAEConfig) -> int:
    """Parameters of ``MochiVAE(cfg)`` (through ``nnx.eval_shape``; nothing is allocated)."""
    from models.vae.mochi_vae import MochiVAE

    return common.module_param_count(MochiVAE, cfg)


def convert_tensors(tensors, cfg: MochiVAEConfig | None = None, *, dtype=np.float32) -> dict[str, np.ndarray]:
    """Maps a flat Mochi VAE checkpoint onto the flat parameter paths of ``MochiVAE``, strictly.

    Args:
        tensors: name -> numpy array (diffusers names, or genmo names prefixed ``encoder.`` / ``decoder.``), or
            a source.
        cfg: the architecture (default: ``infer_config(tensors)``).
        dtype: numpy dtype of the outputs.

    Returns:
        Flat NNX parameter path ('decoder.up_blocks.0.proj.kernel', ...) -> array.

    Raises:
        ConversionError: listing unknown source keys, unassigned targets and shape mismatches.
    """
    source = common.as_source(tensors)
    fmt = detect_format(source)
    cfg = cfg if cfg is not None else infer_config(source)
    return common.apply_rules(source, key_rules(cfg, fmt), TRANSFORMS, target_shapes(cfg), cfg, np.dtype(dtype))


def to_model(cfg: MochiVAEConfig, params: Mapping[str, np.ndarray], *, dtype=None):
    """A ``MochiVAE`` holding ``params`` (from ``convert_tensors``), built on ``nnx.eval_shape``.

    Raises:
        ValueError: missing, unexpected or mis-shaped parameters (all listed).
    """
    from models.vae.mochi_vae import MochiVAE

    return common.module_from_params(
        lambda dt, rngs: MochiVAE(cfg, rngs=rngs, dtype=dt, param_dtype=dt),
        params,
        dtype=dtype,
        where="converted Mochi VAE",
    )


# ---------------------------------------------------------------------------------------------------------
# Files.


def open_source(src) -> tuple[Source, list[Path], dict]:
    """(source, files, diffusers config.json contents or {}) of a Mochi VAE checkpoint.

    ``src`` is one of: a diffusers ``vae`` directory (or a pipeline directory holding ``vae/``, e.g. a full
    ``genmo/mochi-1-preview`` download); a directory holding genmo's ``encoder.safetensors`` and / or
    ``decoder.safetensors``; one of those two files (the decoder alone gives a decoder-only model); a diffusers
    ``diffusion_pytorch_model.safetensors`` file.
    """
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"source {src} does not exist")
    if src.is_dir() and (src / "vae").is_dir():
        src = src / "vae"
    genmo: list[Path] = []
    if src.is_dir():
        genmo = [src / name for name in GENMO_FILES if (src / name).is_file()]
    elif src.name in GENMO_FILES:
        genmo = [src]
    if genmo:
        parts = [(f"{f.name.split('.')[0]}.", common.SafetensorsSource([f])) for f in genmo]
        if any(k.startswith(("encoder.", "decoder.")) for _, s in parts for k in s.keys()):
            raise ConversionError(f"{genmo}: keys already carry encoder./decoder. prefixes; pass a diffusers vae dir")
        return PrefixedSource(parts), genmo, {}
    files = common.find_source_files(src)
    hf = common.read_json(src / "config.json") if src.is_dir() else {}
    return common.SafetensorsSource(files), files, hf


_ARCH_FIELDS = (
    "in_channels",
    "out_channels",
    "encoder_block_out_channels",
    "decoder_block_out_channels",
    "latent_channels",
    "layers_per_block",
    "temporal_expansions",
    "spatial_expansions",
    "add_attention_block",
)


def _config_overrides(hf: Mapping) -> dict:
    if hf.get("act_fn", "silu") not in ("silu", "swish"):
        raise ConversionError(f"config.json act_fn={hf['act_fn']!r}; only silu is supported")
    out = {k: tuple(hf[k]) for k in ("latents_mean", "latents_std") if hf.get(k) is not None}
    if hf.get("scaling_factor") is not None:
        out["scaling_factor"] = float(hf["scaling_factor"])
    return out


def _check_against_config(cfg: MochiVAEConfig, hf: Mapping) -> None:
    """config.json's architecture fields must agree with the shapes (the encoder ones only with an encoder)."""
    enc_only = {"in_channels", "encoder_block_out_channels", "add_attention_block"}
    bad = {}
    for k in _ARCH_FIELDS:
        if k in hf and (cfg.with_encoder or k not in enc_only):
            ours = getattr(cfg, k)
            if (list(ours) if isinstance(ours, tuple) else ours) != hf[k]:
                bad[k] = (hf[k], ours)
    if bad:
        raise ConversionError(f"config.json disagrees with the weight shapes (config, weights): {bad}")


def convert(src, dst, *, dtype: str = "fp32", hash_sources: bool = True, **overrides) -> dict:
    """Converts a Mochi VAE checkpoint into an orbax checkpoint directory; returns the manifest.

    Args:
        src: see ``open_source``.
        dst: output directory (written atomically).
        dtype: 'fp32' (default), 'bf16' or 'fp16'.
        hash_sources: record the sha256 of each source file in the manifest.
        **overrides: ``latents_mean`` / ``latents_std`` / ``scaling_factor`` (over config.json and the Mochi 1
            values), ``temporal_expansions`` / ``spatial_expansions`` for a decoder-only non-Mochi-1 file.
    """
    np_dtype = common.numpy_dtype(dtype)
    source, files, hf = open_source(src)
    fmt = detect_format(source)
    cfg = infer_config(source, **{**_config_overrides(hf), **overrides})
    _check_against_config(cfg, hf)
    params = convert_tensors(source, cfg, dtype=np_dtype)
    return common.write_converted(
        dst,
        params,
        model=MODEL,
        variant="mochi-1" if cfg.with_encoder else "mochi-1-decoder",
        source_format=fmt,
        config=cfg,
        dtype=np_dtype,
        files=files,
        hash_sources=hash_sources,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the mochi-vae subcommand's options."""
    common.add_common_arguments(
        parser,
        src_help="diffusers vae dir / pipeline dir / .safetensors, or genmo encoder.safetensors + decoder.safetensors "
        "(their directory, or decoder.safetensors alone for a decoder-only model)",
        default_dtype="fp32",
    )


def run(args: argparse.Namespace) -> int:
    """Runs the conversion described by the parsed arguments; returns the exit status."""
    m = common.convert_from_args(convert, args)
    print(f"wrote {args.dst}: Mochi VAE ({m['variant']}) from {m['source_format']} ({common.size_text(m, 'M')})")
    return 0


DESCRIPTION = "Mochi 1 VAE (diffusers vae directory, or genmo's encoder.safetensors / decoder.safetensors)"
EXAMPLES = """examples:
  python -m convert_weights mochi-vae --src mochi-1-preview/vae --dst ckpt/mochi-vae
  python -m convert_weights mochi-vae --src mochi-1-preview --dst ckpt/mochi-vae          # uses vae/
  python -m convert_weights mochi-vae --src genmo-weights/ --dst ckpt/mochi-vae           # encoder/decoder.safetensors
  python -m convert_weights mochi-vae --src genmo-weights/decoder.safetensors --dst ckpt/mochi-decoder
load with models.vae.mochi_vae.load(DST).
"""
