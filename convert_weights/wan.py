"""Wan2.1 transformer: diffusers ``WanTransformer3DModel`` and original Wan release weights -> models.wan.

Both source layouts are explicit key tables (``DIFFUSERS_RULES``, ``ORIGINAL_RULES``) whose transforms are named
in ``TRANSFORMS``. The architecture is read off the tensor shapes (except the head count, which no tensor
carries: every release uses head_dim 128). Conversion is strict: an unknown source key, an unassigned target
parameter or a shape mismatch raises ``ConversionError`` listing all of them.

Files: ``convert(src, dst)`` / ``python -m convert_weights wan`` write an orbax checkpoint that ``load`` reads.

Library use (pure, numpy in and out)::

    tensors = {name: np.ndarray, ...}                    # e.g. a diffusers state dict as numpy
    cfg = infer_config(tensors)                          # WanConfig from the shapes
    params = convert_tensors(tensors, cfg)               # flat NNX path -> array
    model = to_model(cfg, params, dtype=jnp.bfloat16)    # WanTransformer3D, built on nnx.eval_shape
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import numpy as np

from convert_weights import common
from convert_weights.common import ConversionError, Rule, rule
from models.wan.config import WanConfig

MODEL = "wan"
DIFFUSERS = "diffusers"
ORIGINAL = "original"

# ---------------------------------------------------------------------------------------------------------
# Named transforms: (source arrays, WanConfig) -> target arrays. Torch linears are [out, in].


def _patch_conv(w: np.ndarray, cfg: WanConfig) -> np.ndarray:
    """Conv3d weight [C, C_in, pt, ph, pw] -> kernel [pt*ph*pw*C_in, C] over (pt, ph, pw, c)-ordered patches."""
    return w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0])


def _stack_linears_w(ws, cfg: WanConfig) -> tuple[np.ndarray]:
    """k torch weights [C_out, C_in] (q, k, v or k, v) -> fused kernel [C_in, k, C_out]."""
    return (np.stack(ws, axis=0).transpose(2, 0, 1),)


def _squeeze_table(t: np.ndarray, cfg: WanConfig) -> np.ndarray:
    """Scale-shift table [1, k, C] -> [k, C]."""
    if t.ndim != 3 or t.shape[0] != 1:
        raise ValueError(f"expected a [1, k, C] scale-shift table, got {t.shape}")
    return t[0]


TRANSFORMS = {
    "identity": lambda xs, cfg: (xs[0],),
    "linear_T": lambda xs, cfg: (xs[0].T,),
    # fc2 [C, F] -> neuron-major [F, C] (the Chipmunk MLP layout); fc1 [F, C] is already neuron-major
    "fc2_T": lambda xs, cfg: (xs[0].T,),
    "patch_conv": lambda xs, cfg: (_patch_conv(xs[0], cfg),),
    "stack_linears_w": lambda xs, cfg: _stack_linears_w(xs, cfg),
    "stack_biases": lambda xs, cfg: (np.stack(xs, axis=0),),
    "squeeze_table": lambda xs, cfg: (_squeeze_table(xs[0], cfg),),
}


def _linear(src: str, dst: str) -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}.kernel", "linear_T"), rule(f"{src}.bias", f"{dst}.bias")]


def _ln(src: str, dst_scale: str, dst_bias: str) -> list[Rule]:
    return [rule(f"{src}.weight", dst_scale), rule(f"{src}.bias", dst_bias)]


def _fused(srcs: tuple[str, ...], dst: str) -> list[Rule]:
    return [
        rule(tuple(f"{s}.weight" for s in srcs), f"{dst}_w", "stack_linears_w"),
        rule(tuple(f"{s}.bias" for s in srcs), f"{dst}_b", "stack_biases"),
    ]


def _block_linear(src: str, dst: str) -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}_w", "linear_T"), rule(f"{src}.bias", f"{dst}_b")]


def _rules(names: Mapping[str, str]) -> tuple[Rule, ...]:
    """The key table of one source layout; ``names`` gives that layout's spelling of each part."""
    n = names
    b = "blocks.{i}."
    rules = [
        rule(f"{n['patch']}.weight", "patch_embedding.kernel", "patch_conv"),
        rule(f"{n['patch']}.bias", "patch_embedding.bias"),
        *_linear(n["time_1"], "time_embedder.linear_1"),
        *_linear(n["time_2"], "time_embedder.linear_2"),
        *_linear(n["time_proj"], "time_proj"),
        *_linear(n["text_1"], "text_embedder.linear_1"),
        *_linear(n["text_2"], "text_embedder.linear_2"),
        *_ln(n["img_norm1"], "image_embedder.norm1.scale", "image_embedder.norm1.bias"),
        *_linear(n["img_fc1"], "image_embedder.mlp.linear_1"),
        *_linear(n["img_fc2"], "image_embedder.mlp.linear_2"),
        *_ln(n["img_norm2"], "image_embedder.norm2.scale", "image_embedder.norm2.bias"),
        rule(n["head_table"], "scale_shift_table", "squeeze_table"),
        *_linear(n["proj_out"], "proj_out"),
        # blocks (leading layer axis on the targets)
        *_fused(tuple(b + n[f"sa_{x}"] for x in "qkv"), "blocks.sa_qkv"),
        rule(b + n["sa_norm_q"] + ".weight", "blocks.sa_norm_q"),
        rule(b + n["sa_norm_k"] + ".weight", "blocks.sa_norm_k"),
        *_block_linear(b + n["sa_o"], "blocks.sa_out"),
        *_block_linear(b + n["ca_q"], "blocks.ca_q"),
        *_fused((b + n["ca_k"], b + n["ca_v"]), "blocks.ca_kv"),
        rule(b + n["ca_norm_q"] + ".weight", "blocks.ca_norm_q"),
        rule(b + n["ca_norm_k"] + ".weight", "blocks.ca_norm_k"),
        *_block_linear(b + n["ca_o"], "blocks.ca_out"),
        *_fused((b + n["ca_k_img"], b + n["ca_v_img"]), "blocks.ca_img_kv"),
        rule(b + n["ca_norm_k_img"] + ".weight", "blocks.ca_norm_img_k"),
        *_ln(b + n["cross_norm"], "blocks.norm2_scale", "blocks.norm2_bias"),
        rule(b + n["ffn_1"] + ".weight", "blocks.ffn_w1"),
        rule(b + n["ffn_1"] + ".bias", "blocks.ffn_b1"),
        rule(b + n["ffn_2"] + ".weight", "blocks.ffn_w2", "fc2_T"),
        rule(b + n["ffn_2"] + ".bias", "blocks.ffn_b2"),
        rule(b + n["block_table"], "blocks.modulation", "squeeze_table"),
    ]
    return tuple(rules)


DIFFUSERS_NAMES = {
    "patch": "patch_embedding",
    "time_1": "condition_embedder.time_embedder.linear_1",
    "time_2": "condition_embedder.time_embedder.linear_2",
    "time_proj": "condition_embedder.time_proj",
    "text_1": "condition_embedder.text_embedder.linear_1",
    "text_2": "condition_embedder.text_embedder.linear_2",
    "img_norm1": "condition_embedder.image_embedder.norm1",
    "img_fc1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_fc2": "condition_embedder.image_embedder.ff.net.2",
    "img_norm2": "condition_embedder.image_embedder.norm2",
    "head_table": "scale_shift_table",
    "proj_out": "proj_out",
    "sa_q": "attn1.to_q",
    "sa_k": "attn1.to_k",
    "sa_v": "attn1.to_v",
    "sa_o": "attn1.to_out.0",
    "sa_norm_q": "attn1.norm_q",
    "sa_norm_k": "attn1.norm_k",
    "ca_q": "attn2.to_q",
    "ca_k": "attn2.to_k",
    "ca_v": "attn2.to_v",
    "ca_o": "attn2.to_out.0",
    "ca_norm_q": "attn2.norm_q",
    "ca_norm_k": "attn2.norm_k",
    "ca_k_img": "attn2.add_k_proj",
    "ca_v_img": "attn2.add_v_proj",
    "ca_norm_k_img": "attn2.norm_added_k",
    "cross_norm": "norm2",
    "ffn_1": "ffn.net.0.proj",
    "ffn_2": "ffn.net.2",
    "block_table": "scale_shift_table",
}

# The Wan2.1 release (github.com/Wan-Video/Wan2.1). Its cross-attention norm is called norm3.
ORIGINAL_NAMES = {
    "patch": "patch_embedding",
    "time_1": "time_embedding.0",
    "time_2": "time_embedding.2",
    "time_proj": "time_projection.1",
    "text_1": "text_embedding.0",
    "text_2": "text_embedding.2",
    "img_norm1": "img_emb.proj.0",
    "img_fc1": "img_emb.proj.1",
    "img_fc2": "img_emb.proj.3",
    "img_norm2": "img_emb.proj.4",
    "head_table": "head.modulation",
    "proj_out": "head.head",
    "sa_q": "self_attn.q",
    "sa_k": "self_attn.k",
    "sa_v": "self_attn.v",
    "sa_o": "self_attn.o",
    "sa_norm_q": "self_attn.norm_q",
    "sa_norm_k": "self_attn.norm_k",
    "ca_q": "cross_attn.q",
    "ca_k": "cross_attn.k",
    "ca_v": "cross_attn.v",
    "ca_o": "cross_attn.o",
    "ca_norm_q": "cross_attn.norm_q",
    "ca_norm_k": "cross_attn.norm_k",
    "ca_k_img": "cross_attn.k_img",
    "ca_v_img": "cross_attn.v_img",
    "ca_norm_k_img": "cross_attn.norm_k_img",
    "cross_norm": "norm3",
    "ffn_1": "ffn.0",
    "ffn_2": "ffn.2",
    "block_table": "modulation",
}

DIFFUSERS_RULES = _rules(DIFFUSERS_NAMES)
ORIGINAL_RULES = _rules(ORIGINAL_NAMES)
RULES = {DIFFUSERS: DIFFUSERS_RULES, ORIGINAL: ORIGINAL_RULES}
NAMES = {DIFFUSERS: DIFFUSERS_NAMES, ORIGINAL: ORIGINAL_NAMES}


def detect_format(tensors) -> str:
    """'diffusers' or 'original', from the key names of a mapping or a source."""
    keys = set(common.as_source(tensors).keys())
    if "condition_embedder.time_proj.weight" in keys:
        return DIFFUSERS
    if "time_projection.1.weight" in keys:
        return ORIGINAL
    raise ConversionError(
        "not a Wan2.1 transformer checkpoint: neither condition_embedder.time_proj.weight (diffusers) nor "
        f"time_projection.1.weight (original release) is present; first keys: {sorted(keys)[:8]}"
    )


def infer_config(tensors, *, head_dim: int = 128, **overrides) -> WanConfig:
    """The WanConfig of a checkpoint, read off its tensor shapes.

    Args:
      tensors: the flat checkpoint (diffusers or original names): a name -> array mapping, or a
        ``common.SafetensorsSource``.
      head_dim: attention head size (not stored in any tensor; 128 in every Wan2.1 release).
      **overrides: WanConfig fields not visible in the weights (eps, rope_max_seq_len, theta).

    Returns:
      The architecture config.
    """
    source = common.as_source(tensors)
    n = NAMES[detect_format(source)]
    dim, c_in, pt, ph, pw = common.require_shape(source, f"{n['patch']}.weight")
    if dim % head_dim:
        raise ConversionError(f"model width {dim} is not a multiple of {head_dim=}")
    layers = common.layer_indices(source.keys(), "blocks.{i}." + n["block_table"])
    if layers != list(range(len(layers))):
        raise ConversionError(f"block indices are not contiguous from 0: {layers}")
    out_features = common.require_shape(source, f"{n['proj_out']}.weight")[0]
    if out_features % (pt * ph * pw):
        raise ConversionError(f"proj_out has {out_features} outputs, not a multiple of the patch volume")
    img_key = f"{n['img_norm1']}.weight"
    fields = dict(
        patch_size=(pt, ph, pw),
        in_channels=c_in,
        out_channels=out_features // (pt * ph * pw),
        dim=dim,
        heads=dim // head_dim,
        ffn_dim=common.require_shape(source, "blocks.0." + n["ffn_1"] + ".weight")[0] if layers else 4 * dim,
        num_layers=len(layers),
        text_dim=common.require_shape(source, f"{n['text_1']}.weight")[1],
        freq_dim=common.require_shape(source, f"{n['time_1']}.weight")[1],
        cross_attn_norm=not layers or f"blocks.0.{n['cross_norm']}.weight" in source,
        image_dim=common.require_shape(source, img_key)[0] if img_key in source else None,
    )
    fields.update(overrides)
    return WanConfig(**fields)


def target_shapes(cfg: WanConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Flat parameter path -> (shape, layered) of ``WanTransformer3D(cfg)``, without allocating it."""
    from models.wan.transformer import WanTransformer3D

    return common.module_target_shapes(WanTransformer3D, cfg, layered=("blocks.",))


def convert_tensors(
    tensors, cfg: WanConfig | None = None, *, dtype=np.float32, head_dim: int = 128
) -> dict[str, np.ndarray]:
    """Maps a flat Wan checkpoint onto the flat parameter paths of ``WanTransformer3D``, strictly.

    Args:
      tensors: name -> numpy array with diffusers ``WanTransformer3DModel`` or original Wan release names (or a
        ``common.SafetensorsSource`` over such names).
      cfg: the architecture (default: ``infer_config(tensors, head_dim=head_dim)``).
      dtype: numpy dtype of the outputs.
      head_dim: used only when ``cfg`` is None.

    Returns:
      Flat NNX parameter path ('blocks.sa_qkv_w', ...) -> array; block parameters carry a leading layer axis.

    Raises:
      ConversionError: listing unknown source keys, unassigned targets (or layers) and shape mismatches.
    """
    source = common.as_source(tensors)
    fmt = detect_format(source)
    cfg = cfg if cfg is not None else infer_config(source, head_dim=head_dim)
    return common.apply_rules(source, RULES[fmt], TRANSFORMS, target_shapes(cfg), cfg, np.dtype(dtype))


def to_model(cfg: WanConfig, params: Mapping[str, np.ndarray], *, dtype=None):
    """A ``WanTransformer3D`` holding ``params`` (from ``convert_tensors``); no random initialisation runs.

    Args:
      cfg: the architecture.
      params: flat parameter path -> array; must cover the model exactly with matching shapes.
      dtype: parameter dtype (default: that of the arrays).

    Raises:
      ConversionError: missing, unexpected or mis-shaped parameters (all listed).
    """
    from models.wan.transformer import WanTransformer3D

    return common.module_from_params(
        lambda dt, rngs: WanTransformer3D(cfg, rngs=rngs), params, dtype=dtype, where="converted parameters", cast=True
    )


def param_count(cfg: WanConfig) -> int:
    """Parameters of ``WanTransformer3D(cfg)`` (through ``nnx.eval_shape``; nothing is allocated)."""
    from models.wan.transformer import WanTransformer3D

    return common.module_param_count(WanTransformer3D, cfg)


# ---------------------------------------------------------------------------------------------------------
# Files: safetensors in, orbax checkpoint + manifest out (``python -m convert_weights wan``).

# ComfyUI-style single files prefix the original keys with this.
_COMFY_PREFIX = "model.diffusion_model."


def open_source(src) -> common.SafetensorsSource:
    """A lazy source over a Wan checkpoint: a .safetensors file or a (diffusers, possibly sharded) directory."""
    return common.open_safetensors(common.find_source_files(src), strip_common=(_COMFY_PREFIX,))


def convert(src, dst, *, dtype: str = "bf16", head_dim: int = 128, hash_sources: bool = True) -> dict:
    """Converts a Wan2.1 transformer checkpoint into an orbax checkpoint directory; returns the manifest.

    Args:
      src: a ``.safetensors`` file (original release or ComfyUI) or a diffusers transformer directory.
      dst: output directory (written atomically).
      dtype: 'bf16' (default), 'fp16' or 'fp32'.
      head_dim: attention head size (128 for every release).
      hash_sources: record the sha256 of each source file in the manifest.
    """
    np_dtype = common.numpy_dtype(dtype)
    source = open_source(src)
    fmt = detect_format(source)
    cfg = infer_config(source, head_dim=head_dim)
    params = convert_tensors(source, cfg, dtype=np_dtype)
    return common.write_converted(
        dst,
        params,
        model=MODEL,
        variant="i2v" if cfg.is_i2v else "t2v",
        source_format=fmt,
        config=cfg,
        dtype=np_dtype,
        files=source.files,
        hash_sources=hash_sources,
    )


def load(path, *, dtype=None):
    """The ``WanTransformer3D`` stored by ``convert`` in ``path`` (built on nnx.eval_shape, no random init).

    Args:
      path: a directory written by ``convert`` / ``python -m convert_weights wan``.
      dtype: cast the parameters to this dtype (default: as stored).
    """
    manifest = common.expect_manifest(path, MODEL, "a Wan transformer")
    cfg = WanConfig.from_dict(manifest["config"])
    return to_model(cfg, common.read_checkpoint(path), dtype=dtype)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(
        parser, src_help="Wan .safetensors file or diffusers transformer directory", default_dtype="bf16"
    )
    parser.add_argument("--head-dim", type=int, default=128, help="attention head size (128 in all releases)")


def run(args: argparse.Namespace) -> int:
    m = common.convert_from_args(convert, args, head_dim=args.head_dim)
    print(f"wrote {args.dst}: Wan2.1 {m['variant']} from {m['source_format']} ({common.size_text(m, 'B')})")
    return 0


DESCRIPTION = "Wan2.1 transformer, T2V / I2V (diffusers directory or original release .safetensors)"
EXAMPLES = """examples:
  python -m convert_weights wan --src Wan2.1-T2V-1.3B-Diffusers/transformer --dst ckpt/wan-t2v-1.3b
  python -m convert_weights wan --src Wan2.1-T2V-14B/ --dst ckpt/wan-t2v-14b --dtype bf16
"""
