"""Flux autoencoder weights -> ``models.vae.flux_ae.FluxAutoencoder``.

Two source layouts are accepted and told apart by their key names:

* ``diffusers``: ``AutoencoderKL`` (``encoder.down_blocks.0.resnets.0.norm1.weight``,
  ``...mid_block.attentions.0.to_q``), e.g. FLUX.1-dev ``vae/diffusion_pytorch_model.safetensors``; must have no
  quant / post-quant convs.
* ``bfl``: Black Forest Labs' ``ae.safetensors`` (``encoder.down.0.block.0.norm1.weight``, ``...mid.attn_1.q`` as
  1x1 convs, decoder ``up.{i}`` numbered by resolution level, so ``up.{L-1}`` runs first).

Example::

    from safetensors.numpy import load_file
    from convert_weights.flux_ae import convert_flux_ae

    ae = convert_flux_ae(load_file("ae.safetensors"))
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert_weights.t5 import ConversionError, KeyTable, fill_strict, layer_indices
from models.vae.flux_ae import AutoencoderConfig, FluxAutoencoder

FORMATS = ("diffusers", "bfl")


def detect_format(weights: Mapping[str, np.ndarray]) -> str:
    """Tells the autoencoder key layout from the key names.

    Args:
        weights: Flat checkpoint (only the keys are read).

    Returns:
        ``"diffusers"`` or ``"bfl"``.

    Raises:
        ConversionError: When neither or both layouts are present.
    """
    diffusers = any(".down_blocks." in k or ".mid_block." in k or ".up_blocks." in k for k in weights)
    bfl = any(".down." in k or ".mid.block_1." in k or ".up." in k for k in weights)
    if diffusers == bfl:
        found = "both" if diffusers else "neither"
        raise ConversionError(f"cannot tell the autoencoder layout: {found} of diffusers / BFL key names found")
    return "diffusers" if diffusers else "bfl"


class _Names:
    """Source key names of one layout; ``level`` is the diffusers-order index of a decoder level."""

    def __init__(self, fmt: str, num_levels: int):
        self.fmt = fmt
        self.num_levels = num_levels

    def enc_resnet(self, i: int, j: int) -> str:
        return f"encoder.down_blocks.{i}.resnets.{j}" if self.fmt == "diffusers" else f"encoder.down.{i}.block.{j}"

    def enc_down(self, i: int) -> str:
        return (
            f"encoder.down_blocks.{i}.downsamplers.0.conv"
            if self.fmt == "diffusers"
            else f"encoder.down.{i}.downsample.conv"
        )

    def dec_resnet(self, k: int, j: int) -> str:
        if self.fmt == "diffusers":
            return f"decoder.up_blocks.{k}.resnets.{j}"
        return f"decoder.up.{self.num_levels - 1 - k}.block.{j}"

    def dec_up(self, k: int) -> str:
        if self.fmt == "diffusers":
            return f"decoder.up_blocks.{k}.upsamplers.0.conv"
        return f"decoder.up.{self.num_levels - 1 - k}.upsample.conv"

    def mid(self, part: str, side: str) -> str:
        """part in {resnet_1, resnet_2, attn}."""
        if self.fmt == "diffusers":
            return {"resnet_1": f"{side}.mid_block.resnets.0", "resnet_2": f"{side}.mid_block.resnets.1"}.get(
                part, f"{side}.mid_block.attentions.0"
            )
        return {"resnet_1": f"{side}.mid.block_1", "resnet_2": f"{side}.mid.block_2"}.get(part, f"{side}.mid.attn_1")

    @property
    def shortcut(self) -> str:
        return "conv_shortcut" if self.fmt == "diffusers" else "nin_shortcut"

    @property
    def norm_out(self) -> str:
        return "conv_norm_out" if self.fmt == "diffusers" else "norm_out"

    def attn_parts(self) -> dict[str, str]:
        """Target attention submodule -> source name."""
        if self.fmt == "diffusers":
            return {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
        return {"norm": "norm", "q": "q", "k": "k", "v": "v", "proj_out": "proj_out"}


def _conv_entries(table: KeyTable, src: str, dst: tuple) -> None:
    table[f"{src}.weight"] = ((*dst, "kernel"), "conv_OIHW_to_HWIO")
    table[f"{src}.bias"] = ((*dst, "bias"), "identity")


def _norm_entries(table: KeyTable, src: str, dst: tuple) -> None:
    table[f"{src}.weight"] = ((*dst, "scale"), "identity")
    table[f"{src}.bias"] = ((*dst, "bias"), "identity")


def _resnet_entries(table: KeyTable, names: _Names, src: str, dst: tuple, has_shortcut: bool) -> None:
    _norm_entries(table, f"{src}.norm1", (*dst, "norm1"))
    _conv_entries(table, f"{src}.conv1", (*dst, "conv1"))
    _norm_entries(table, f"{src}.norm2", (*dst, "norm2"))
    _conv_entries(table, f"{src}.conv2", (*dst, "conv2"))
    if has_shortcut:
        _conv_entries(table, f"{src}.{names.shortcut}", (*dst, "shortcut"))


def _mid_entries(table: KeyTable, names: _Names, side: str, dst: tuple) -> None:
    _resnet_entries(table, names, names.mid("resnet_1", side), (*dst, "resnet_1"), False)
    _resnet_entries(table, names, names.mid("resnet_2", side), (*dst, "resnet_2"), False)
    attn = names.mid("attn", side)
    linear = "linear_T" if names.fmt == "diffusers" else "conv1x1_to_linear"
    for target, source in names.attn_parts().items():
        if target == "norm":
            _norm_entries(table, f"{attn}.{source}", (*dst, "attn", "norm"))
        else:
            table[f"{attn}.{source}.weight"] = ((*dst, "attn", target, "kernel"), linear)
            table[f"{attn}.{source}.bias"] = ((*dst, "attn", target, "bias"), "identity")


def flux_ae_key_table(config: AutoencoderConfig, fmt: str) -> KeyTable:
    """Source key -> (FluxAutoencoder parameter path, transform) for ``fmt`` in FORMATS."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    chans = config.block_out_channels
    n = len(chans)
    names = _Names(fmt, n)
    table: KeyTable = {}
    _conv_entries(table, "encoder.conv_in", ("encoder", "conv_in"))
    cin = chans[0]
    for i, cout in enumerate(chans):
        for j in range(config.layers_per_block):
            dst = ("encoder", "levels", i, "resnets", j)
            _resnet_entries(table, names, names.enc_resnet(i, j), dst, (cin if j == 0 else cout) != cout)
        if i < n - 1:
            _conv_entries(table, names.enc_down(i), ("encoder", "levels", i, "resample", "conv"))
        cin = cout
    _mid_entries(table, names, "encoder", ("encoder", "mid"))
    _norm_entries(table, f"encoder.{names.norm_out}", ("encoder", "norm_out"))
    _conv_entries(table, "encoder.conv_out", ("encoder", "conv_out"))

    rchans = tuple(reversed(chans))
    _conv_entries(table, "decoder.conv_in", ("decoder", "conv_in"))
    _mid_entries(table, names, "decoder", ("decoder", "mid"))
    cin = rchans[0]
    for k, cout in enumerate(rchans):
        for j in range(config.layers_per_block + 1):
            dst = ("decoder", "levels", k, "resnets", j)
            _resnet_entries(table, names, names.dec_resnet(k, j), dst, (cin if j == 0 else cout) != cout)
        if k < n - 1:
            _conv_entries(table, names.dec_up(k), ("decoder", "levels", k, "resample", "conv"))
        cin = cout
    _norm_entries(table, f"decoder.{names.norm_out}", ("decoder", "norm_out"))
    _conv_entries(table, "decoder.conv_out", ("decoder", "conv_out"))
    return table


def flux_ae_config_from_weights(
    weights: Mapping[str, np.ndarray],
    *,
    norm_num_groups: int = 32,
    scaling_factor: float = 0.3611,
    shift_factor: float = 0.1159,
) -> AutoencoderConfig:
    """Infers an AutoencoderConfig from tensor shapes (either layout).

    GroupNorm groups and the latent normalisation leave no trace in the weights; they come from the arguments
    (the Flux values by default).

    Args:
        weights: Flat checkpoint in the diffusers or BFL layout.
        norm_num_groups: GroupNorm groups.
        scaling_factor: Latent scaling factor.
        shift_factor: Latent shift factor.

    Returns:
        The inferred config.
    """
    fmt = detect_format(weights)
    level_rx, block_rx = (
        (r"encoder\.down_blocks\.(\d+)\..*", r"encoder\.down_blocks\.0\.resnets\.(\d+)\..*")
        if fmt == "diffusers"
        else (r"encoder\.down\.(\d+)\..*", r"encoder\.down\.0\.block\.(\d+)\..*")
    )
    levels = layer_indices(weights, level_rx)
    names = _Names(fmt, len(levels))
    needed = ["encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight"]
    needed += [f"{names.enc_resnet(i, 0)}.conv1.weight" for i in levels]
    missing = [k for k in needed if k not in weights]
    if not levels or missing:
        raise ConversionError(f"cannot infer the autoencoder config ({fmt} layout), missing {missing or 'levels'}")
    return AutoencoderConfig(
        in_channels=weights["encoder.conv_in.weight"].shape[1],
        out_channels=weights["decoder.conv_out.weight"].shape[0],
        latent_channels=weights["encoder.conv_out.weight"].shape[0] // 2,
        block_out_channels=tuple(int(weights[f"{names.enc_resnet(i, 0)}.conv1.weight"].shape[0]) for i in levels),
        layers_per_block=len(layer_indices(weights, block_rx)),
        norm_num_groups=norm_num_groups,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def convert_flux_ae(
    weights: Mapping[str, np.ndarray],
    config: AutoencoderConfig | None = None,
    *,
    fmt: str | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
) -> FluxAutoencoder:
    """Builds a FluxAutoencoder from a diffusers AutoencoderKL or a BFL ``ae.safetensors`` checkpoint.

    Args:
        weights: Flat ``name -> array``.
        config: Architecture; inferred from shapes (Flux defaults for groups and latent normalisation) when None.
        fmt: ``"diffusers"`` or ``"bfl"``; detected from the key names when None.
        dtype: Compute dtype.
        param_dtype: Storage dtype of the parameters.

    Returns:
        The filled autoencoder.

    Raises:
        ConversionError: On an undetectable layout, any unknown key (quant convs included), missing parameter or
            shape mismatch (all listed at once).
    """
    fmt = detect_format(weights) if fmt is None else fmt
    if config is None:
        config = flux_ae_config_from_weights(weights)
    abstract = nnx.eval_shape(lambda: FluxAutoencoder(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    return fill_strict(abstract, weights, flux_ae_key_table(config, fmt))
