"""Mochi 1 transformer: diffusers ``MochiTransformer3DModel`` and genmo's original release -> models.mochi.

Two explicit key tables (``DIFFUSERS_RULES``, ``ORIGINAL_RULES``) with the named transforms of ``TRANSFORMS``,
run by the strict engine of ``convert_weights.common``. The architecture is read off the tensor shapes (the
attention-pooling head count, 8 in every release, is the only size no tensor carries). An unknown source key, an
unassigned target parameter or a shape mismatch raises ``ConversionError`` listing all of them.

The two layouts differ in more than names; the converter handles these, and the tests exercise each:

- fused q/k/v: the release stores ``attn.qkv_x`` [3C, C] and ``attn.qkv_y`` [3C, Ct] (rows q, k, v), diffusers
  separate ``to_q`` / ``to_k`` / ``to_v`` and ``add_{q,k,v}_proj``; ours is one [C_in, 3, C] kernel per stream.
- SwiGLU halves: the release's ``mlp_x.w1`` holds [gate; up] (the first half goes through SiLU), diffusers'
  ``ff.net.0.proj`` holds [up; gate]; ours keeps ``ff_gate_w`` and ``ff_up_w`` apart.
- output modulation: the release's ``final_layer.mod`` produces [shift; scale], diffusers' ``norm_out.linear``
  (and ours, ``norm_out``) [scale; shift].
- the last block (no text output) is stored apart from the stacked blocks (``last_block``); its text
  modulation is ``norm1_context.linear_1`` / ``mod_y`` with Ct outputs instead of 4 Ct.

``pos_frequencies`` (the learned RoPE frequencies) is kept in float32 whatever ``--dtype`` says: the model
computes RoPE angles of positions up to ~100 with it, where bf16 would shift them by whole radians.

Files: ``convert(src, dst)`` / ``python -m convert_weights mochi`` write an orbax checkpoint that
``models.mochi.load.load_transformer`` reads.

Library use (pure, numpy in and out)::

    cfg = infer_config(tensors)                 # MochiConfig from the shapes (diffusers or original names)
    params = convert_tensors(tensors, cfg)      # flat NNX path -> array
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping

import numpy as np

from convert_weights import common
from convert_weights.common import ConversionError, Rule, rule
from models.mochi.config import MOCHI_1_PREVIEW, MochiConfig

MODEL = "mochi"
DIFFUSERS = "diffusers"
ORIGINAL = "original"

# The last block is renamed to "<blocks prefix>last." before the tables run, so that the stacked ``{i}`` rules
# (whose targets have num_layers - 1 entries) do not claim it; error messages name its real index again.
_LAST = "last"
# Parameters stored in float32 whatever the checkpoint dtype (see the module docstring).
FLOAT32_PARAMS = ("pos_frequencies",)

# ---------------------------------------------------------------------------------------------------------
# Named transforms: (source arrays, MochiConfig) -> target arrays. Torch linears are [out, in].


def _patch_conv(w: np.ndarray, cfg: MochiConfig) -> np.ndarray:
    """Conv2d weight [C, C_in, p, p] -> kernel [p*p*C_in, C] over channels-last patches in (ph, pw, c) order."""
    return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def _stack_qkv(ws, cfg: MochiConfig) -> tuple[np.ndarray]:
    """Separate q, k, v weights [C, C_in] -> fused kernel [C_in, 3, C]."""
    return (np.stack(ws, axis=0).transpose(2, 0, 1),)


def _split_qkv(w: np.ndarray, cfg: MochiConfig) -> np.ndarray:
    """Fused weight [3C, C_in] (rows q, k, v) -> kernel [C_in, 3, C]."""
    if w.ndim != 2 or w.shape[0] % 3:
        raise ValueError(f"expected a fused [3C, C_in] q/k/v weight, got {w.shape}")
    return w.reshape(3, w.shape[0] // 3, w.shape[1]).transpose(2, 0, 1)


def _halves(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if w.ndim != 2 or w.shape[0] % 2:
        raise ValueError(f"expected a [2F, C] SwiGLU input weight, got {w.shape}")
    a, b = np.split(w, 2, axis=0)
    return a.T, b.T


def _swiglu_up_gate(w: np.ndarray, cfg: MochiConfig) -> tuple[np.ndarray, np.ndarray]:
    """diffusers ``ff.net.0.proj`` [2F, C] = [up; gate] -> (gate kernel [C, F], up kernel [C, F])."""
    up, gate = _halves(w)
    return gate, up


def _swiglu_gate_up(w: np.ndarray, cfg: MochiConfig) -> tuple[np.ndarray, np.ndarray]:
    """Release ``mlp_*.w1`` [2F, C] = [gate; up] -> (gate kernel [C, F], up kernel [C, F])."""
    gate, up = _halves(w)
    return gate, up


def _shift_scale_to_scale_shift(a: np.ndarray, cfg: MochiConfig) -> np.ndarray:
    """Release ``final_layer.mod`` rows [shift; scale] -> [scale; shift] (still torch [out, ...] layout)."""
    if a.shape[0] % 2:
        raise ValueError(f"expected an even number of modulation outputs, got {a.shape}")
    shift, scale = np.split(a, 2, axis=0)
    return np.concatenate([scale, shift], axis=0)


TRANSFORMS = {
    "identity": lambda xs, cfg: (xs[0],),
    "linear_T": lambda xs, cfg: (xs[0].T,),
    "patch_conv": lambda xs, cfg: (_patch_conv(xs[0], cfg),),
    "stack_qkv": _stack_qkv,
    "split_qkv": lambda xs, cfg: (_split_qkv(xs[0], cfg),),
    "swiglu_up_gate": lambda xs, cfg: _swiglu_up_gate(xs[0], cfg),
    "swiglu_gate_up": lambda xs, cfg: _swiglu_gate_up(xs[0], cfg),
    "final_mod_w": lambda xs, cfg: (_shift_scale_to_scale_shift(xs[0], cfg).T,),
    "final_mod_b": lambda xs, cfg: (_shift_scale_to_scale_shift(xs[0], cfg),),
}


def _linear(src: str, dst: str) -> list[Rule]:
    """A torch Linear with bias -> an NNX ``Linear`` (kernel, bias)."""
    return [rule(f"{src}.weight", f"{dst}.kernel", "linear_T"), rule(f"{src}.bias", f"{dst}.bias")]


def _wb(src: str, dst: str) -> list[Rule]:
    """A torch Linear with bias -> block parameters ``{dst}_w`` [in, out], ``{dst}_b``."""
    return [rule(f"{src}.weight", f"{dst}_w", "linear_T"), rule(f"{src}.bias", f"{dst}_b")]


def _diffusers_block(b: str, dst: str, last: bool) -> list[Rule]:
    """Rules of one diffusers ``MochiTransformerBlock`` (source prefix ``b``) -> block params ``dst``."""
    rules = [
        *_wb(b + "norm1.linear", dst + "mod"),
        rule(tuple(f"{b}attn1.to_{x}.weight" for x in "qkv"), dst + "qkv_w", "stack_qkv"),
        rule(tuple(f"{b}attn1.add_{x}_proj.weight" for x in "qkv"), dst + "ctx_qkv_w", "stack_qkv"),
        rule(b + "attn1.norm_q.weight", dst + "norm_q"),
        rule(b + "attn1.norm_k.weight", dst + "norm_k"),
        rule(b + "attn1.norm_added_q.weight", dst + "norm_ctx_q"),
        rule(b + "attn1.norm_added_k.weight", dst + "norm_ctx_k"),
        *_wb(b + "attn1.to_out.0", dst + "out"),
        rule(b + "ff.net.0.proj.weight", (dst + "ff_gate_w", dst + "ff_up_w"), "swiglu_up_gate"),
        rule(b + "ff.net.2.weight", dst + "ff_down_w", "linear_T"),
    ]
    if last:
        return [*rules, *_wb(b + "norm1_context.linear_1", dst + "ctx_scale")]
    return [
        *rules,
        *_wb(b + "norm1_context.linear", dst + "ctx_mod"),
        *_wb(b + "attn1.to_add_out", dst + "ctx_out"),
        rule(b + "ff_context.net.0.proj.weight", (dst + "ctx_ff_gate_w", dst + "ctx_ff_up_w"), "swiglu_up_gate"),
        rule(b + "ff_context.net.2.weight", dst + "ctx_ff_down_w", "linear_T"),
    ]


def _original_block(b: str, dst: str, last: bool) -> list[Rule]:
    """Rules of one genmo ``AsymmetricJointBlock`` (source prefix ``b``) -> block params ``dst``."""
    rules = [
        *_wb(b + "mod_x", dst + "mod"),
        rule(b + "attn.qkv_x.weight", dst + "qkv_w", "split_qkv"),
        rule(b + "attn.qkv_y.weight", dst + "ctx_qkv_w", "split_qkv"),
        rule(b + "attn.q_norm_x.weight", dst + "norm_q"),
        rule(b + "attn.k_norm_x.weight", dst + "norm_k"),
        rule(b + "attn.q_norm_y.weight", dst + "norm_ctx_q"),
        rule(b + "attn.k_norm_y.weight", dst + "norm_ctx_k"),
        *_wb(b + "attn.proj_x", dst + "out"),
        rule(b + "mlp_x.w1.weight", (dst + "ff_gate_w", dst + "ff_up_w"), "swiglu_gate_up"),
        rule(b + "mlp_x.w2.weight", dst + "ff_down_w", "linear_T"),
    ]
    if last:
        return [*rules, *_wb(b + "mod_y", dst + "ctx_scale")]
    return [
        *rules,
        *_wb(b + "mod_y", dst + "ctx_mod"),
        *_wb(b + "attn.proj_y", dst + "ctx_out"),
        rule(b + "mlp_y.w1.weight", (dst + "ctx_ff_gate_w", dst + "ctx_ff_up_w"), "swiglu_gate_up"),
        rule(b + "mlp_y.w2.weight", dst + "ctx_ff_down_w", "linear_T"),
    ]


DIFFUSERS_RULES: tuple[Rule, ...] = (
    rule("patch_embed.proj.weight", "patch_embed.kernel", "patch_conv"),
    rule("patch_embed.proj.bias", "patch_embed.bias"),
    *_linear("time_embed.timestep_embedder.linear_1", "timestep_embedder.linear_1"),
    *_linear("time_embed.timestep_embedder.linear_2", "timestep_embedder.linear_2"),
    *_linear("time_embed.pooler.to_kv", "pooler.to_kv"),
    *_linear("time_embed.pooler.to_q", "pooler.to_q"),
    *_linear("time_embed.pooler.to_out", "pooler.to_out"),
    *_linear("time_embed.caption_proj", "caption_proj"),
    rule("pos_frequencies", "pos_frequencies"),
    *_linear("norm_out.linear", "norm_out"),
    *_linear("proj_out", "proj_out"),
    *_diffusers_block("transformer_blocks.{i}.", "blocks.", last=False),
    *_diffusers_block(f"transformer_blocks.{_LAST}.", "last_block.", last=True),
)

ORIGINAL_RULES: tuple[Rule, ...] = (
    rule("x_embedder.proj.weight", "patch_embed.kernel", "patch_conv"),
    rule("x_embedder.proj.bias", "patch_embed.bias"),
    *_linear("t_embedder.mlp.0", "timestep_embedder.linear_1"),
    *_linear("t_embedder.mlp.2", "timestep_embedder.linear_2"),
    *_linear("t5_y_embedder.to_kv", "pooler.to_kv"),
    *_linear("t5_y_embedder.to_q", "pooler.to_q"),
    *_linear("t5_y_embedder.to_out", "pooler.to_out"),
    *_linear("t5_yproj", "caption_proj"),
    rule("pos_frequencies", "pos_frequencies"),
    rule("final_layer.mod.weight", "norm_out.kernel", "final_mod_w"),
    rule("final_layer.mod.bias", "norm_out.bias", "final_mod_b"),
    *_linear("final_layer.linear", "proj_out"),
    *_original_block("blocks.{i}.", "blocks.", last=False),
    *_original_block(f"blocks.{_LAST}.", "last_block.", last=True),
)

RULES = {DIFFUSERS: DIFFUSERS_RULES, ORIGINAL: ORIGINAL_RULES}

# Per layout: the prefix of block i, and a key every block has (counts the blocks).
_BLOCK_PREFIX = {DIFFUSERS: "transformer_blocks.", ORIGINAL: "blocks."}
_BLOCK_MARKER = {DIFFUSERS: "norm1.linear.weight", ORIGINAL: "mod_x.weight"}
# Per layout: the keys the sizes are read from.
_SIZE_KEYS = {
    DIFFUSERS: dict(
        patch="patch_embed.proj.weight",
        proj_out="proj_out.weight",
        caption="time_embed.caption_proj.weight",
        time_1="time_embed.timestep_embedder.linear_1.weight",
    ),
    ORIGINAL: dict(
        patch="x_embedder.proj.weight",
        proj_out="final_layer.linear.weight",
        caption="t5_yproj.weight",
        time_1="t_embedder.mlp.0.weight",
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Sources.


class _RenamedSource:
    """A source seen under other key names (``view name -> source name``); everything else passes through."""

    def __init__(self, source, renames: Mapping[str, str]):
        self._src = source
        self._to_src = dict(renames)
        self._keys = sorted({k for k in source.keys() if k not in set(renames.values())} | set(renames))
        self.files = getattr(source, "files", [])

    def keys(self) -> list[str]:
        return self._keys

    def _name(self, key: str) -> str:
        return self._to_src.get(key, key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._src.shape(self._name(key)))

    def __contains__(self, key: str) -> bool:
        return key in self._to_src or (key in self._src and key not in self._to_src.values())

    def get(self, key: str) -> np.ndarray:
        return self._src.get(self._name(key))


def detect_format(tensors) -> str:
    """'diffusers' or 'original', from the key names of a mapping or a source."""
    keys = set(common.as_source(tensors).keys())
    if "time_embed.caption_proj.weight" in keys:
        return DIFFUSERS
    if "t5_yproj.weight" in keys:
        return ORIGINAL
    raise ConversionError(
        "not a Mochi 1 transformer checkpoint: neither time_embed.caption_proj.weight (diffusers) nor "
        f"t5_yproj.weight (genmo's original dit.safetensors) is present; first keys: {sorted(keys)[:8]}"
    )


def _num_layers(source, fmt: str) -> int:
    prefix, marker = _BLOCK_PREFIX[fmt], _BLOCK_MARKER[fmt]
    layers = common.layer_indices(source.keys(), prefix + "{i}." + marker)
    if not layers:
        raise ConversionError(f"no transformer blocks found (no {prefix}<i>.{marker})")
    if layers != list(range(len(layers))):
        raise ConversionError(f"block indices are not contiguous from 0: {layers}")
    return len(layers)


def infer_config(tensors, *, text_pool_heads: int = 8, **overrides) -> MochiConfig:
    """The MochiConfig of a checkpoint, read off its tensor shapes.

    Args:
      tensors: the flat checkpoint (diffusers or original names): a name -> array mapping or a source.
      text_pool_heads: heads of the text attention pooling (stored in no tensor; 8 in every release).
      **overrides: MochiConfig fields not visible in the weights (``eps``, ``qk_eps``).

    Returns:
      The architecture config.
    """
    source = common.as_source(tensors)
    fmt = detect_format(source)
    k = _SIZE_KEYS[fmt]
    dim, c_in, p, p2 = common.require_shape(source, k["patch"])
    if p != p2:
        raise ConversionError(f"{k['patch']}: non-square patch {(p, p2)}")
    three, heads, half = common.require_shape(source, "pos_frequencies")
    if three != 3 or heads * 2 * half != dim:
        raise ConversionError(
            f"pos_frequencies {(three, heads, half)} does not fit a model of width {dim} (want [3, H, D/2], H*D = C)"
        )
    out_features = common.require_shape(source, k["proj_out"])[0]
    if out_features % (p * p):
        raise ConversionError(f"{k['proj_out']} has {out_features} outputs, not a multiple of the patch area {p * p}")
    text_width, text_dim = common.require_shape(source, k["caption"])
    fields = dict(
        patch_size=p,
        in_channels=c_in,
        out_channels=out_features // (p * p),
        heads=heads,
        head_dim=2 * half,
        num_layers=_num_layers(source, fmt),
        text_width=text_width,
        text_dim=text_dim,
        time_embed_dim=common.require_shape(source, k["time_1"])[1],
        text_pool_heads=text_pool_heads,
    )
    fields.update(overrides)
    try:
        return MochiConfig(**fields)
    except ValueError as e:
        raise ConversionError(f"the shapes give an invalid Mochi config: {e}") from None


def target_shapes(cfg: MochiConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Flat parameter path -> (shape, layered) of ``MochiTransformer3D(cfg)``, without allocating it."""
    from models.mochi.transformer import MochiTransformer3D

    return common.module_target_shapes(MochiTransformer3D, cfg, layered=("blocks.",))


def convert_tensors(
    tensors, cfg: MochiConfig | None = None, *, dtype=np.float32, text_pool_heads: int = 8
) -> dict[str, np.ndarray]:
    """Maps a flat Mochi checkpoint onto the flat parameter paths of ``MochiTransformer3D``, strictly.

    Args:
      tensors: name -> numpy array with diffusers ``MochiTransformer3DModel`` or genmo release names (or a
        ``common.SafetensorsSource`` over such names).
      cfg: the architecture (default: ``infer_config(tensors, text_pool_heads=...)``).
      dtype: numpy dtype of the outputs (``pos_frequencies`` stays float32).
      text_pool_heads: used only when ``cfg`` is None.

    Returns:
      Flat NNX parameter path ('blocks.qkv_w', 'last_block.mod_w', ...) -> array; ``blocks.*`` carry a leading
      layer axis of ``num_layers - 1``.

    Raises:
      ConversionError: listing unknown source keys, unassigned targets (or layers) and shape mismatches.
    """
    source = common.as_source(tensors)
    fmt = detect_format(source)
    cfg = cfg if cfg is not None else infer_config(source, text_pool_heads=text_pool_heads)
    prefix = _BLOCK_PREFIX[fmt]
    real_last = f"{prefix}{cfg.num_layers - 1}."
    view_last = f"{prefix}{_LAST}."
    renames = {view_last + k[len(real_last) :]: k for k in source.keys() if k.startswith(real_last)}
    view = _RenamedSource(source, renames)
    try:
        params = common.apply_rules(view, RULES[fmt], TRANSFORMS, target_shapes(cfg), cfg, np.dtype(dtype))
    except ConversionError as e:
        raise ConversionError(re.sub(re.escape(view_last), real_last, str(e))) from None
    for name in FLOAT32_PARAMS:
        params[name] = np.asarray(view.get(name), np.float32)
    return params


# ---------------------------------------------------------------------------------------------------------
# Files: safetensors in, orbax checkpoint + manifest out (``python -m convert_weights mochi``).

# ComfyUI-style single files prefix the original keys with this.
_COMFY_PREFIX = "model.diffusion_model."
ORIGINAL_FILE = "dit.safetensors"


def source_files(src) -> list:
    """The safetensors files of the transformer in ``src``.

    ``src`` may be a .safetensors file, a diffusers ``transformer/`` directory (sharded with an index, or one
    file), a diffusers pipeline directory (its ``transformer/`` is used) or genmo's release directory (its
    ``dit.safetensors`` is used: the VAE files next to it are not part of the transformer).
    """
    from pathlib import Path

    path = Path(src)
    if path.is_dir() and not (path / "transformer").is_dir() and (path / ORIGINAL_FILE).is_file():
        return [path / ORIGINAL_FILE]
    if path.is_dir() and (path / "transformer").is_dir():
        path = path / "transformer"
    return common.find_source_files(path)


def open_source(src) -> common.SafetensorsSource:
    """A lazy source over a Mochi transformer checkpoint (see ``source_files``)."""
    return common.open_safetensors(source_files(src), strip_common=(_COMFY_PREFIX,))


def convert(src, dst, *, dtype: str = "bf16", text_pool_heads: int = 8, hash_sources: bool = True) -> dict:
    """Converts a Mochi 1 transformer checkpoint into an orbax checkpoint directory; returns the manifest.

    Args:
      src: see ``source_files``.
      dst: output directory (written atomically; an existing one is replaced only once the new one is complete).
      dtype: 'bf16' (default), 'fp16' or 'fp32' (``pos_frequencies`` stays float32).
      text_pool_heads: heads of the text attention pooling (8 in every release; no tensor carries it).
      hash_sources: record the sha256 of each source file in the manifest.
    """
    np_dtype = common.numpy_dtype(dtype)
    source = open_source(src)
    fmt = detect_format(source)
    cfg = infer_config(source, text_pool_heads=text_pool_heads)
    params = convert_tensors(source, cfg, dtype=np_dtype)
    return common.write_converted(
        dst,
        params,
        model=MODEL,
        variant="mochi-1-preview" if cfg == MOCHI_1_PREVIEW else "custom",
        source_format=fmt,
        config=cfg,
        dtype=np_dtype,
        files=source.files,
        hash_sources=hash_sources,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(
        parser,
        src_help="diffusers transformer directory (or the pipeline directory holding it), genmo's dit.safetensors "
        "or its release directory, or a ComfyUI single file",
        default_dtype="bf16",
    )
    parser.add_argument(
        "--text-pool-heads", type=int, default=8, help="heads of the text attention pooling (8 in the release)"
    )


def run(args: argparse.Namespace) -> int:
    m = common.convert_from_args(convert, args, text_pool_heads=args.text_pool_heads)
    c = m["config"]
    print(
        f"wrote {args.dst}: Mochi 1 transformer ({m['variant']}, {c['num_layers']} layers, {c['heads']} heads x "
        f"{c['head_dim']}) from {m['source_format']} ({common.size_text(m, 'B')}); "
        "load it with models.mochi.load.load_transformer"
    )
    return 0


DESCRIPTION = "Mochi 1 transformer (diffusers transformer directory or genmo's original dit.safetensors)"
EXAMPLES = """examples:
  python -m convert_weights mochi --src mochi-1-preview/transformer --dst ckpt/mochi-1-preview
  python -m convert_weights mochi --src mochi-1-preview/dit.safetensors --dst ckpt/mochi-1-preview --dtype bf16
  python -m convert_weights mochi --src mochi-1-preview --dst ckpt/mochi-fp32 --dtype fp32 --no-hash

The architecture (layers, heads, widths) is read from the tensor shapes; pos_frequencies stays float32.
"""
