"""Llama text encoder (HunyuanVideo ``text_encoder``): transformers safetensors -> orbax, strictly.

Accepted sources: a ``.safetensors`` file, a directory of (sharded, with ``*.safetensors.index.json``) safetensors
with an optional ``config.json``, or a HunyuanVideo diffusers pipeline directory holding ``text_encoder/``. The key
layout is detected from where ``embed_tokens.weight`` lives:

* no prefix: ``LlamaModel`` as saved in HunyuanVideo's diffusers ``text_encoder/``;
* ``model.``: ``LlamaForCausalLM``;
* ``language_model.model.``: llava (``LlavaForConditionalGeneration``, transformers < 4.52), e.g.
  ``xtuner/llava-llama-3-8b-v1_1-transformers``;
* ``model.language_model.``: the same llava saved by transformers >= 4.52.

Only the decoder is converted. ``lm_head`` (the language-model head), llava's ``vision_tower`` /
``multi_modal_projector`` / ``image_newline`` and old ``rotary_emb.inv_freq`` buffers are not part of the text
encoder: they are skipped, listed in the manifest (``ignored_source_keys``) and reported by the CLI. Every other key
must map onto a parameter: unknown keys, missing parameters (or layers) and shape mismatches stop the conversion
with the full list (``common.apply_rules``).

The architecture is read off the shapes (vocabulary, width, layers, query / key-value widths, MLP width). The head
width, RMS epsilon and RoPE settings leave no trace in the weights; they come from ``config.json`` (llava's
``text_config`` when nested) when present, else the Llama-3 / HunyuanVideo values (head_dim 128, eps 1e-5,
rope_theta 500000, no RoPE scaling). Unsupported configurations (RoPE scaling other than llama3, biases, an
activation other than silu) are refused.

Library use::

    source = open_source("HunyuanVideo/text_encoder")
    cfg = infer_config(source, read_hf_config("HunyuanVideo/text_encoder"))
    params = convert_tensors(source, cfg)       # flat NNX path -> array
    encoder = to_model(cfg, params)             # LlamaEncoder
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convert_weights import common
from convert_weights.common import ConversionError, Rule, rule
from models.text_encoders.llama import LlamaConfig, rope_from_hf

MODEL = "llama"

# Prefix of the decoder keys, most specific first ("" = a bare LlamaModel).
PREFIXES = ("language_model.model.", "model.language_model.", "model.", "")
# Keys outside the decoder that are skipped (with a note), matched on the full source name.
_IGNORED_OUTSIDE = re.compile(
    r"(language_model\.)?lm_head\.weight|(model\.)?(vision_tower|multi_modal_projector|image_newline)(\..*)?"
)
# Non-parameter buffers inside the decoder (transformers < 4.31 saved RoPE's inverse frequencies).
_IGNORED_INSIDE = re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


# ---------------------------------------------------------------------------------------------------------
# Key table.


def _linear_t(w: np.ndarray) -> np.ndarray:
    if w.ndim != 2:
        raise ValueError(f"linear_T expects a 2-D [out, in] weight, got {w.shape}")
    return w.T


TRANSFORMS = {
    "identity": lambda xs, cfg: (xs[0],),
    "linear_T": lambda xs, cfg: (_linear_t(xs[0]),),  # torch Linear [out, in] -> kernel [in, out]
}

_LAYER = "layers.{i}."
RULES: tuple[Rule, ...] = (
    rule("embed_tokens.weight", "embed_tokens"),
    rule("norm.weight", "norm"),
    rule(_LAYER + "input_layernorm.weight", "layers.attn_norm"),
    rule(_LAYER + "self_attn.q_proj.weight", "layers.q", "linear_T"),
    rule(_LAYER + "self_attn.k_proj.weight", "layers.k", "linear_T"),
    rule(_LAYER + "self_attn.v_proj.weight", "layers.v", "linear_T"),
    rule(_LAYER + "self_attn.o_proj.weight", "layers.o", "linear_T"),
    rule(_LAYER + "post_attention_layernorm.weight", "layers.mlp_norm"),
    rule(_LAYER + "mlp.gate_proj.weight", "layers.gate", "linear_T"),
    rule(_LAYER + "mlp.up_proj.weight", "layers.up", "linear_T"),
    rule(_LAYER + "mlp.down_proj.weight", "layers.down", "linear_T"),
)


# ---------------------------------------------------------------------------------------------------------
# Sources.


class DecoderView:
    """The decoder keys of a checkpoint with their layout prefix removed (the source interface of apply_rules).

    Keys outside the prefix that are known non-decoder parts are set aside in ``ignored``; any other key outside
    the prefix stays visible under its full name, so that ``apply_rules`` reports it as unknown.
    """

    def __init__(self, source, prefix: str):
        self.source = source
        self.prefix = prefix
        self.files = list(getattr(source, "files", []))
        self._raw: dict[str, str] = {}
        self.ignored: list[str] = []
        outside: list[str] = []
        for raw in source.keys():
            if raw.startswith(prefix):
                key = raw[len(prefix) :]
                if _IGNORED_INSIDE.fullmatch(key):
                    self.ignored.append(raw)
                else:
                    self._raw[key] = raw
            elif _IGNORED_OUTSIDE.fullmatch(raw):
                self.ignored.append(raw)
            else:
                outside.append(raw)
        clash = sorted(k for k in outside if k in self._raw)
        if clash:
            raise ConversionError(f"mixed key layouts: {clash} appear both bare and under the prefix {prefix!r}")
        self._raw.update({k: k for k in outside})

    def keys(self) -> list[str]:
        return sorted(self._raw)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.source.shape(self._raw[key]))

    def __contains__(self, key: str) -> bool:
        return key in self._raw

    def get(self, key: str) -> np.ndarray:
        return self.source.get(self._raw[key])


def detect_prefix(source) -> str:
    """The layout prefix of a checkpoint: the first of ``PREFIXES`` under which ``embed_tokens.weight`` exists."""
    keys = set(source.keys())
    for prefix in PREFIXES:
        if prefix + "embed_tokens.weight" in keys:
            return prefix
    raise ConversionError(
        "not a Llama checkpoint: no embed_tokens.weight under any of the prefixes "
        f"{[p or '(none)' for p in PREFIXES]}; first keys: {sorted(keys)[:8]}"
    )


def decoder_view(tensors) -> DecoderView:
    """A DecoderView over a mapping name -> array, a ``common.SafetensorsSource`` or a view (returned as is)."""
    if isinstance(tensors, DecoderView):
        return tensors
    source = common.as_source(tensors)
    return DecoderView(source, detect_prefix(source))


def source_dir(src: str | os.PathLike) -> Path:
    """``src``, or its ``text_encoder/`` when ``src`` is a diffusers pipeline directory."""
    return common.component_dir(src, "text_encoder")


def open_source(src: str | os.PathLike) -> DecoderView:
    """A lazy DecoderView over a ``.safetensors`` file or a (sharded) checkpoint / pipeline directory."""
    files = common.find_source_files(source_dir(src))
    return decoder_view(common.SafetensorsSource(files))


def read_hf_config(src: str | os.PathLike) -> dict[str, Any]:
    """The transformers ``config.json`` next to the weights (llava's ``text_config`` when nested), or {}."""
    src = source_dir(src)
    path = src / "config.json" if src.is_dir() else src.parent / "config.json"
    hf = common.read_json(path)
    return dict(hf["text_config"]) if isinstance(hf.get("text_config"), dict) else hf


# ---------------------------------------------------------------------------------------------------------
# Architecture.


def _shape(view: DecoderView, key: str) -> tuple[int, ...]:
    return common.require_shape(view, key, "the Llama architecture")


def infer_config(tensors, hf: Mapping[str, Any] | None = None, *, head_dim: int = 128) -> LlamaConfig:
    """The LlamaConfig of a checkpoint: sizes from the shapes, the rest from ``hf`` (a config.json dict).

    Args:
      tensors: the checkpoint (mapping, SafetensorsSource or DecoderView), any accepted layout.
      hf: transformers config dict; missing entries take the Llama-3 / HunyuanVideo values.
      head_dim: head width when ``hf`` gives neither ``head_dim`` nor ``num_attention_heads``.

    Raises:
      ConversionError: missing tensors, widths that are no multiple of the head width, an ``hf`` that
        contradicts the shapes, or an unsupported feature (RoPE scaling type, biases, activation).
    """
    view = decoder_view(tensors)
    hf = dict(hf or {})
    vocab, width = _shape(view, "embed_tokens.weight")
    layers = common.layer_indices(view.keys(), "layers.{i}.input_layernorm.weight")
    if not layers:
        raise ConversionError("cannot infer the Llama architecture: no layers.{i}.input_layernorm.weight keys")
    q_out = _shape(view, "layers.0.self_attn.q_proj.weight")[0]
    kv_out = _shape(view, "layers.0.self_attn.k_proj.weight")[0]
    ffn = _shape(view, "layers.0.mlp.gate_proj.weight")[0]
    if hf.get("head_dim"):
        head_dim = int(hf["head_dim"])
    elif hf.get("num_attention_heads"):
        head_dim = int(hf.get("hidden_size", width)) // int(hf["num_attention_heads"])
    if q_out % head_dim or kv_out % head_dim:
        raise ConversionError(f"q width {q_out} / kv width {kv_out} are not multiples of head_dim={head_dim}")
    problems = []
    for name, got in (
        ("vocab_size", vocab),
        ("hidden_size", width),
        ("intermediate_size", ffn),
        ("num_hidden_layers", max(layers) + 1),
        ("num_attention_heads", q_out // head_dim),
        ("num_key_value_heads", kv_out // head_dim),
    ):
        if name in hf and hf[name] is not None and int(hf[name]) != got:
            problems.append(f"config.json {name}={hf[name]} but the weights have {got}")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} is not supported (only silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            problems.append(f"{flag}=true is not supported (Llama-3 has no biases)")
    try:
        rope = rope_from_hf(hf) if hf else {}
    except (ValueError, KeyError) as e:
        problems.append(f"RoPE: {e}")
        rope = {}
    if problems:
        raise ConversionError("unsupported or inconsistent Llama config:\n  " + "\n  ".join(problems))
    try:
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=width,
            num_layers=max(layers) + 1,
            num_heads=q_out // head_dim,
            num_kv_heads=kv_out // head_dim,
            head_dim=head_dim,
            intermediate_size=ffn,
            rms_eps=float(hf.get("rms_norm_eps", LlamaConfig.rms_eps)),
            **rope,
        )
    except ValueError as e:
        raise ConversionError(str(e)) from e


def target_shapes(cfg: LlamaConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Flat parameter path -> (shape, layered) of ``LlamaEncoder(cfg)``, without allocating it."""
    from models.text_encoders.llama import LlamaEncoder

    return common.module_target_shapes(LlamaEncoder, cfg, layered=("layers.",))


def param_count(cfg: LlamaConfig) -> int:
    """Parameters of ``LlamaEncoder(cfg)`` (through ``nnx.eval_shape``; nothing is allocated)."""
    from models.text_encoders.llama import LlamaEncoder

    return common.module_param_count(LlamaEncoder, cfg)


def convert_tensors(tensors, cfg: LlamaConfig | None = None, *, dtype=np.float32) -> dict[str, np.ndarray]:
    """Maps a Llama checkpoint onto the flat parameter paths of ``LlamaEncoder``, strictly.

    Args:
      tensors: name -> numpy array in any accepted layout, a ``common.SafetensorsSource`` or a ``DecoderView``.
      cfg: the architecture (default: ``infer_config(tensors)``).
      dtype: numpy dtype of the outputs.

    Returns:
      Flat path ('layers.q', ...) -> array; layer parameters carry a leading layer axis.

    Raises:
      ConversionError: listing unknown source keys, unassigned targets (or layers) and shape mismatches.
    """
    view = decoder_view(tensors)
    cfg = cfg if cfg is not None else infer_config(view)
    try:
        return common.apply_rules(view, RULES, TRANSFORMS, target_shapes(cfg), cfg, np.dtype(dtype))
    except ConversionError as e:
        if not view.prefix:
            raise
        raise ConversionError(f"{e}\n(decoder keys are shown without their layout prefix {view.prefix!r})") from e


def to_model(cfg: LlamaConfig, params: Mapping[str, np.ndarray], *, dtype=None, where: str = "parameters"):
    """A ``LlamaEncoder`` holding ``params`` (from ``convert_tensors``); no random initialisation runs.

    Args:
      cfg: the architecture.
      params: flat parameter path -> array; must cover the model exactly with matching shapes.
      dtype: parameter and compute dtype (default: that of the arrays).
      where: named in the error message.

    Raises:
      ValueError: listing missing, unexpected or mis-shaped parameters.
    """
    from models.text_encoders.llama import LlamaEncoder

    return common.module_from_params(
        lambda dt, rngs: LlamaEncoder(cfg, rngs=rngs, dtype=dt, param_dtype=dt),
        params,
        dtype=dtype,
        where=where,
        cast=True,
    )


# ---------------------------------------------------------------------------------------------------------
# Files: safetensors in, orbax checkpoint + manifest out (``python -m convert_weights llama``).


def convert(src, dst, *, dtype: str = "bf16", head_dim: int = 128, hash_sources: bool = True) -> dict:
    """Converts a Llama text encoder into an orbax checkpoint directory; returns the manifest.

    Args:
      src: a ``.safetensors`` file, a transformers checkpoint directory (``LlamaModel``, ``LlamaForCausalLM`` or
        llava) or a HunyuanVideo diffusers directory (its ``text_encoder/`` is used).
      dst: output directory (written atomically).
      dtype: 'bf16' (default), 'fp16' or 'fp32'.
      head_dim: head width when config.json does not give it (128 for Llama-3).
      hash_sources: record the sha256 of each source file in the manifest.

    Raises:
      ConversionError: unsupported config, or any unknown key, missing parameter or shape mismatch (all listed).
    """
    np_dtype = common.numpy_dtype(dtype)
    view = open_source(src)
    cfg = infer_config(view, read_hf_config(src), head_dim=head_dim)
    params = convert_tensors(view, cfg, dtype=np_dtype)
    return common.write_converted(
        dst,
        params,
        model=MODEL,
        variant=f"{cfg.num_layers}L-{cfg.hidden_size}",
        source_format=f"transformers:{view.prefix or 'LlamaModel'}",
        config=cfg,
        dtype=np_dtype,
        files=view.files,
        hash_sources=hash_sources,
        ignored_source_keys=sorted(view.ignored),
    )


def load(path: str | os.PathLike, *, dtype=None):
    """The ``LlamaEncoder`` stored by ``convert`` in ``path`` (built on nnx.eval_shape, no random init).

    Args:
      path: a directory written by ``convert`` / ``python -m convert_weights llama``.
      dtype: parameter and compute dtype (default: as stored).

    Raises:
      ValueError: the directory holds another model or its arrays do not match the config.
    """
    manifest = common.expect_manifest(path, MODEL, repr(MODEL))
    cfg = LlamaConfig.from_dict(manifest["config"])
    return to_model(cfg, common.read_checkpoint(path), dtype=dtype or manifest["dtype"], where=str(path))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the llama subcommand's options."""
    common.add_common_arguments(
        parser,
        src_help="HunyuanVideo diffusers dir, its text_encoder/, a llava / Llama checkpoint dir or .safetensors",
        default_dtype="bf16",
    )
    parser.add_argument(
        "--head-dim", type=int, default=128, help="head width when config.json lacks it (128 for Llama-3)"
    )


def run(args: argparse.Namespace) -> int:
    """Runs the conversion described by the parsed arguments; returns the exit status."""
    m = common.convert_from_args(convert, args, head_dim=args.head_dim)
    ignored = m["ignored_source_keys"]
    if ignored:
        print(f"note: skipped {len(ignored)} key(s) outside the text decoder (lm_head / vision tower / buffers)")
    print(f"wrote {args.dst}: Llama text encoder {m['variant']} ({common.size_text(m, 'B')})")
    return 0


DESCRIPTION = "Llama text encoder of HunyuanVideo (diffusers text_encoder, LlamaForCausalLM or llava safetensors)"
EXAMPLES = """examples:
  python -m convert_weights llama --src HunyuanVideo --dst ckpt/hunyuan-llama
  python -m convert_weights llama --src HunyuanVideo/text_encoder --dst ckpt/hunyuan-llama --dtype bf16
  python -m convert_weights llama --src llava-llama-3-8b-v1_1-transformers --dst ckpt/hunyuan-llama
load with convert_weights.llama.load(DST); encode with models.text_encoders.llama.hunyuan_prompt_embeds.
"""
