"""HunyuanVideo transformer: diffusers ``HunyuanVideoTransformer3DModel`` and original Tencent release weights ->
``models.hunyuan_video``.

Both source layouts are explicit key tables (``DIFFUSERS_RULES``, ``ORIGINAL_RULES``) run by
``common.apply_rules``; the transforms are Flux's (``convert_weights.flux.TRANSFORMS``: the double and
single blocks are Flux's stacked block modules) plus the 3-D patch embedding. The two layouts differ in:

- q/k/v: the original fuses them (``img_attn_qkv`` [3C, C], the refiner's ``self_attn_qkv``, the single blocks'
  ``linear1`` = [q; k; v; mlp_in]); diffusers splits them (``to_q``/``to_k``/``to_v``, ``proj_mlp``).
- the final adaLN: the original ``final_layer.adaLN_modulation.1`` emits [shift, scale], diffusers'
  ``norm_out.linear`` (and this model) [scale, shift]: the halves are swapped.

The architecture is read off the tensor shapes. The 3-D RoPE split and base are in no tensor: they come from a
diffusers ``config.json`` next to the weights, else from ``--rope-axes-dim`` / ``--rope-theta``, else the
release's (16, 56, 56) and 256 when head_dim is 128. Conversion is strict: an unknown source key, an unassigned
target parameter or a shape mismatch raises ``ConversionError`` listing all of them.

The original release ships ``mp_rank_00_model_states.pt`` (a torch pickle, which is not read here): save its
``module`` state dict as safetensors first (ComfyUI's single files, keys prefixed with
``model.diffusion_model.``, are read as they are).

Library use (numpy in and out)::

    tensors = {name: np.ndarray, ...}                 # a diffusers or original state dict as numpy
    cfg = infer_config(tensors)                       # HunyuanVideoConfig from the shapes
    params = convert_tensors(tensors, cfg)            # flat NNX path -> array
    model = to_model(cfg, params, dtype=jnp.float32)  # HunyuanVideoTransformer3D, built on nnx.eval_shape
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from convert_weights import common
from convert_weights import flux as flux_convert
from convert_weights.common import ConversionError, Rule, rule
from models.hunyuan_video.config import HunyuanVideoConfig

MODEL = "hunyuan_video"
DIFFUSERS = "diffusers"
ORIGINAL = "original"

# RoPE of the released model (head_dim 128); not stored in any tensor.
RELEASE_ROPE_AXES_DIM = (16, 56, 56)
RELEASE_ROPE_THETA = 256.0

# ---------------------------------------------------------------------------------------------------------
# Named transforms: (source arrays, HunyuanVideoConfig) -> target arrays. Torch linears are [out, in].


def _patch_conv(w: np.ndarray, cfg: HunyuanVideoConfig) -> np.ndarray:
    """Conv3d weight [C, C_in, pt, ph, pw] -> kernel [C_in*pt*ph*pw, C] over (c, pt, ph, pw)-ordered patches."""
    if w.ndim != 5:
        raise ValueError(f"expected a Conv3d weight [C, C_in, pt, ph, pw], got {w.shape}")
    return w.reshape(w.shape[0], -1).T


# Flux's transforms read cfg.hidden / heads / head_dim, which HunyuanVideoConfig has under the same names.
TRANSFORMS = {**flux_convert.TRANSFORMS, "patch_conv": lambda xs, cfg: (_patch_conv(xs[0], cfg),)}


def _lin(src: str, dst: str) -> list[Rule]:
    """A torch Linear onto a ``Linear`` module (kernel [in, out], bias)."""
    return [rule(f"{src}.weight", f"{dst}.kernel", "linear_T"), rule(f"{src}.bias", f"{dst}.bias")]


def _stacked_lin(src: str, dst_w: str, dst_b: str) -> list[Rule]:
    """A torch Linear onto a stacked kernel [in, out] and bias (one layer of a stack)."""
    return [rule(f"{src}.weight", dst_w, "linear_T"), rule(f"{src}.bias", dst_b)]


def _refiner_rules(blk: str, n: Mapping[str, str | tuple[str, ...]]) -> list[Rule]:
    """The token-refiner block table; ``n`` names the block's parts in one layout."""
    r = "refiner.blocks."
    qkv = n["qkv"]
    if isinstance(qkv, tuple):  # diffusers: three projections
        qkv_rules = [
            rule(tuple(f"{blk}.{p}.weight" for p in qkv), r + "qkv_w", "qkv_separate_w"),
            rule(tuple(f"{blk}.{p}.bias" for p in qkv), r + "qkv_b", "qkv_separate_b"),
        ]
    else:  # original: one fused projection
        qkv_rules = [
            rule(f"{blk}.{qkv}.weight", r + "qkv_w", "qkv_fused_w"),
            rule(f"{blk}.{qkv}.bias", r + "qkv_b", "qkv_fused_b"),
        ]
    return [
        rule(f"{blk}.norm1.weight", r + "norm1_scale"),
        rule(f"{blk}.norm1.bias", r + "norm1_bias"),
        rule(f"{blk}.norm2.weight", r + "norm2_scale"),
        rule(f"{blk}.norm2.bias", r + "norm2_bias"),
        *qkv_rules,
        rule(f"{blk}.{n['proj']}.weight", r + "proj_w", "heads_out"),
        rule(f"{blk}.{n['proj']}.bias", r + "proj_b"),
        rule(f"{blk}.{n['fc1']}.weight", r + "w1"),
        rule(f"{blk}.{n['fc1']}.bias", r + "b1"),
        rule(f"{blk}.{n['fc2']}.weight", r + "w2", "fc2_T"),
        rule(f"{blk}.{n['fc2']}.bias", r + "b2"),
        *_stacked_lin(f"{blk}.{n['ada']}", r + "ada_w", r + "ada_b"),
    ]


def _diffusers_rules() -> tuple[Rule, ...]:
    tte, ctx = "time_text_embed", "context_embedder"
    rules = [
        rule("x_embedder.proj.weight", "x_embedder.kernel", "patch_conv"),
        rule("x_embedder.proj.bias", "x_embedder.bias"),
    ]
    for src, dst in (
        (f"{tte}.timestep_embedder", "time_embedder"),
        (f"{tte}.guidance_embedder", "guidance_embedder"),
        (f"{tte}.text_embedder", "text_embedder"),
        (f"{ctx}.{tte}.timestep_embedder", "refiner.time_embedder"),
        (f"{ctx}.{tte}.text_embedder", "refiner.text_embedder"),
    ):
        rules += [*_lin(f"{src}.linear_1", f"{dst}.linear_1"), *_lin(f"{src}.linear_2", f"{dst}.linear_2")]
    rules += _lin(f"{ctx}.proj_in", "refiner.proj_in")
    names = dict(qkv=("attn.to_q", "attn.to_k", "attn.to_v"), proj="attn.to_out.0", fc1="ff.net.0.proj")
    names.update(fc2="ff.net.2", ada="norm_out.linear")
    rules += _refiner_rules(f"{ctx}.token_refiner.refiner_blocks.{{i}}", names)
    # The double/single blocks have exactly diffusers' Flux block names (transformer_blocks.{i}.attn.to_q, ...,
    # single_transformer_blocks.{i}.proj_mlp, ...) and the same target stacks: Flux's table, blocks only.
    rules += [r for r in flux_convert.DIFFUSERS_RULES if r.targets[0].startswith(("double.", "single."))]
    # diffusers' AdaLayerNormContinuous emits [scale, shift], as the model: no swap.
    rules += [*_lin("norm_out.linear", "final_mod"), *_lin("proj_out", "final_linear")]
    return tuple(rules)


def _original_rules() -> tuple[Rule, ...]:
    """The Tencent release's names (hyvideo ``HYVideoDiffusionTransformer``)."""
    rules = [
        rule("img_in.proj.weight", "x_embedder.kernel", "patch_conv"),
        rule("img_in.proj.bias", "x_embedder.bias"),
    ]
    for src, dst in (
        ("time_in.mlp", "time_embedder"),
        ("guidance_in.mlp", "guidance_embedder"),
        ("txt_in.t_embedder.mlp", "refiner.time_embedder"),
    ):  # TimestepEmbedder: Sequential(Linear, SiLU, Linear)
        rules += [*_lin(f"{src}.0", f"{dst}.linear_1"), *_lin(f"{src}.2", f"{dst}.linear_2")]
    rules += [
        *_lin("vector_in.in_layer", "text_embedder.linear_1"),
        *_lin("vector_in.out_layer", "text_embedder.linear_2"),
        *_lin("txt_in.c_embedder.linear_1", "refiner.text_embedder.linear_1"),
        *_lin("txt_in.c_embedder.linear_2", "refiner.text_embedder.linear_2"),
        *_lin("txt_in.input_embedder", "refiner.proj_in"),
    ]
    names = dict(qkv="self_attn_qkv", proj="self_attn_proj", fc1="mlp.fc1", fc2="mlp.fc2", ada="adaLN_modulation.1")
    rules += _refiner_rules("txt_in.individual_token_refiner.blocks.{i}", names)
    for side in ("img", "txt"):
        blk, dst = f"double_blocks.{{i}}.{side}", f"double.{side}"
        rules += [
            *_stacked_lin(f"{blk}_mod.linear", f"{dst}_mod_w", f"{dst}_mod_b"),
            rule(f"{blk}_attn_qkv.weight", f"{dst}_qkv_w", "qkv_fused_w"),
            rule(f"{blk}_attn_qkv.bias", f"{dst}_qkv_b", "qkv_fused_b"),
            rule(f"{blk}_attn_q_norm.weight", f"{dst}_q_norm"),
            rule(f"{blk}_attn_k_norm.weight", f"{dst}_k_norm"),
            rule(f"{blk}_attn_proj.weight", f"{dst}_proj_w", "heads_out"),
            rule(f"{blk}_attn_proj.bias", f"{dst}_proj_b"),
            rule(f"{blk}_mlp.fc1.weight", f"{dst}_w1"),
            rule(f"{blk}_mlp.fc1.bias", f"{dst}_b1"),
            rule(f"{blk}_mlp.fc2.weight", f"{dst}_w2", "fc2_T"),
            rule(f"{blk}_mlp.fc2.bias", f"{dst}_b2"),
        ]
    s = "single_blocks.{i}"
    rules += [
        # linear1 [3C + F, C] = [q; k; v; mlp_in]; linear2 [C, C + F] = [attention out | mlp out], one bias.
        rule(f"{s}.linear1.weight", ("single.qkv_w", "single.w1"), "split_linear1_w"),
        rule(f"{s}.linear1.bias", ("single.qkv_b", "single.b1"), "split_linear1_b"),
        rule(f"{s}.linear2.weight", ("single.proj_w", "single.w2"), "split_linear2_w"),
        rule(f"{s}.linear2.bias", "single.b2"),
        rule(f"{s}.q_norm.weight", "single.q_norm"),
        rule(f"{s}.k_norm.weight", "single.k_norm"),
        *_stacked_lin(f"{s}.modulation.linear", "single.mod_w", "single.mod_b"),
        *_lin("final_layer.linear", "final_linear"),
        # The release's final adaLN emits [shift, scale]; the model (as diffusers) takes [scale, shift].
        rule("final_layer.adaLN_modulation.1.weight", "final_mod.kernel", "swap_shift_scale_w"),
        rule("final_layer.adaLN_modulation.1.bias", "final_mod.bias", "swap_shift_scale_b"),
    ]
    return tuple(rules)


DIFFUSERS_RULES = _diffusers_rules()
ORIGINAL_RULES = _original_rules()
RULES = {DIFFUSERS: DIFFUSERS_RULES, ORIGINAL: ORIGINAL_RULES}

# Keys whose presence identifies a layout, and the keys whose shapes define the architecture.
PROBES = {
    DIFFUSERS: dict(
        marker="x_embedder.proj.weight",
        out="proj_out.weight",
        text="context_embedder.proj_in.weight",
        pooled="time_text_embed.text_embedder.linear_1.weight",
        guidance="time_text_embed.guidance_embedder.linear_1.weight",
        double="transformer_blocks.{i}.attn.norm_q.weight",
        single="single_transformer_blocks.{i}.attn.norm_q.weight",
        refiner="context_embedder.token_refiner.refiner_blocks.{i}.norm1.weight",
        mlp_double="transformer_blocks.{i}.ff.net.0.proj.weight",  # [F, C]
        mlp_single="single_transformer_blocks.{i}.proj_mlp.weight",  # [F, C]
    ),
    ORIGINAL: dict(
        marker="img_in.proj.weight",
        out="final_layer.linear.weight",
        text="txt_in.input_embedder.weight",
        pooled="vector_in.in_layer.weight",
        guidance="guidance_in.mlp.0.weight",
        double="double_blocks.{i}.img_attn_q_norm.weight",
        single="single_blocks.{i}.q_norm.weight",
        refiner="txt_in.individual_token_refiner.blocks.{i}.norm1.weight",
        mlp_double="double_blocks.{i}.img_mlp.fc1.weight",  # [F, C]
        mlp_single="single_blocks.{i}.linear1.weight",  # [3C + F, C]
    ),
}
# Prefixes that wrap a whole state dict: ComfyUI single files, and a saved DeepSpeed ``module``.
_PREFIXES = ("model.diffusion_model.", "module.")


def detect_format(tensors) -> str:
    """'diffusers' or 'original', from the key names of a mapping or a source."""
    source = common.as_source(tensors)
    for fmt, probe in PROBES.items():
        if probe["marker"] in source:
            return fmt
    raise ConversionError(
        "not a HunyuanVideo transformer checkpoint: neither x_embedder.proj.weight (diffusers) nor "
        f"img_in.proj.weight (original release) is present; first keys: {source.keys()[:8]}"
    )


def _contiguous(layers: list[int], what: str) -> int:
    if layers != list(range(len(layers))):
        raise ConversionError(f"{what} indices are not contiguous from 0: {layers}")
    return len(layers)


def infer_config(
    tensors,
    *,
    rope_axes_dim: tuple[int, int, int] | None = None,
    rope_theta: float | None = None,
    diffusers_config: Mapping | None = None,
) -> HunyuanVideoConfig:
    """The HunyuanVideoConfig of a checkpoint, read off its tensor shapes.

    Args:
      tensors: the flat checkpoint (diffusers or original names): a name -> array mapping, or a
        ``common.SafetensorsSource``.
      rope_axes_dim: the (t, h, w) split of head_dim for the 3-D RoPE (no tensor holds it). Default: the
        diffusers config's ``rope_axes_dim``, else the release's (16, 56, 56) when head_dim is 128.
      rope_theta: RoPE base; default: the diffusers config's, else 256.
      diffusers_config: a diffusers ``config.json`` dict, used for the RoPE fields and to refuse the
        image-to-video variants (``image_condition_type``).

    Raises:
      ConversionError: missing probe keys, non-contiguous blocks, inconsistent shapes, or a RoPE split that
        cannot be known (head_dim != 128 without ``rope_axes_dim`` or a config.json).
    """
    source = common.as_source(tensors)
    fmt = detect_format(source)
    p, keys = PROBES[fmt], source.keys()
    dc = dict(diffusers_config or {})
    if dc.get("image_condition_type") is not None:
        raise ConversionError(
            f"image_condition_type={dc['image_condition_type']!r}: the image-to-video variants are not supported "
            "by models.hunyuan_video (text-to-video only)"
        )
    c, c_in, pt, ph, pw = common.require_shape(source, p["marker"])
    if ph != pw:
        raise ConversionError(f"non-square spatial patch ({ph}, {pw}) in {p['marker']}")
    nd = _contiguous(common.layer_indices(keys, p["double"]), "double block")
    ns = _contiguous(common.layer_indices(keys, p["single"]), "single block")
    nr = _contiguous(common.layer_indices(keys, p["refiner"]), "refiner block")
    if nd:
        head_dim = common.require_shape(source, p["double"].format(i=0))[0]
        f = common.require_shape(source, p["mlp_double"].format(i=0))[0]
    elif ns:
        head_dim = common.require_shape(source, p["single"].format(i=0))[0]
        f = common.require_shape(source, p["mlp_single"].format(i=0))[0] - (3 * c if fmt == ORIGINAL else 0)
    else:
        raise ConversionError("the checkpoint has no double or single transformer blocks")
    if c % head_dim:
        raise ConversionError(f"model width {c} is not a multiple of the q/k norm size (head_dim) {head_dim}")
    mlp_ratio = f / c
    if int(c * mlp_ratio) != f:
        raise ConversionError(f"MLP width {f} is not representable as int({c} * mlp_ratio)")
    out_features = common.require_shape(source, p["out"])[0]
    if out_features % (pt * ph * pw):
        raise ConversionError(f"{p['out']} has {out_features} outputs, not a multiple of the patch volume")
    if rope_axes_dim is None:
        rope_axes_dim = dc.get("rope_axes_dim")
    if rope_axes_dim is None:
        if head_dim != 128:
            raise ConversionError(
                f"head_dim {head_dim} != 128 and no config.json: pass the RoPE split (--rope-axes-dim t,h,w summing "
                f"to {head_dim})"
            )
        rope_axes_dim = RELEASE_ROPE_AXES_DIM
    if rope_theta is None:
        rope_theta = float(dc.get("rope_theta", RELEASE_ROPE_THETA))
    try:
        return HunyuanVideoConfig(
            in_channels=c_in,
            out_channels=out_features // (pt * ph * pw),
            heads=c // head_dim,
            head_dim=head_dim,
            depth_double=nd,
            depth_single=ns,
            depth_refiner=nr,
            mlp_ratio=mlp_ratio,
            patch_size=ph,
            patch_size_t=pt,
            guidance_embeds=p["guidance"] in source,
            text_dim=common.require_shape(source, p["text"])[1],
            pooled_dim=common.require_shape(source, p["pooled"])[1],
            rope_theta=float(rope_theta),
            rope_axes_dim=tuple(int(a) for a in rope_axes_dim),
        )
    except ValueError as e:
        raise ConversionError(f"inconsistent architecture: {e}") from e


def config_to_dict(cfg: HunyuanVideoConfig) -> dict:
    """The JSON-able dict of a config (what the manifest stores)."""
    return common.DictConfig(cfg).to_dict()


def config_from_dict(d: Mapping) -> HunyuanVideoConfig:
    """The config stored by ``config_to_dict`` (unknown fields are an error)."""
    names = {f.name for f in dataclasses.fields(HunyuanVideoConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown HunyuanVideoConfig fields {unknown}: written by a newer converter?")
    return HunyuanVideoConfig(**d)


def target_shapes(cfg: HunyuanVideoConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Flat parameter path -> (shape, layered) of ``HunyuanVideoTransformer3D(cfg)``, without allocating it."""
    from models.hunyuan_video.transformer import HunyuanVideoTransformer3D

    return common.module_target_shapes(
        HunyuanVideoTransformer3D, cfg, layered=("double.", "single.", "refiner.blocks.")
    )


def param_count(cfg: HunyuanVideoConfig) -> int:
    """Parameters of ``HunyuanVideoTransformer3D(cfg)`` (through ``nnx.eval_shape``; nothing is allocated)."""
    from models.hunyuan_video.transformer import HunyuanVideoTransformer3D

    return common.module_param_count(HunyuanVideoTransformer3D, cfg)


def convert_tensors(tensors, cfg: HunyuanVideoConfig | None = None, *, dtype=np.float32, **infer) -> dict:
    """Maps a flat HunyuanVideo checkpoint onto the flat parameter paths of the model, strictly.

    Args:
      tensors: name -> numpy array with diffusers or original release names (or a ``common.SafetensorsSource``).
      cfg: the architecture (default: ``infer_config(tensors, **infer)``).
      dtype: numpy dtype of the outputs.
      **infer: ``infer_config`` options (rope_axes_dim, rope_theta, diffusers_config) when ``cfg`` is None.

    Returns:
      Flat NNX parameter path ('double.img_qkv_w', ...) -> array; block parameters carry a leading layer axis.

    Raises:
      ConversionError: listing unknown source keys, unassigned targets (or layers) and shape mismatches.
    """
    source = common.as_source(tensors)
    fmt = detect_format(source)
    cfg = cfg if cfg is not None else infer_config(source, **infer)
    return common.apply_rules(source, RULES[fmt], TRANSFORMS, target_shapes(cfg), cfg, np.dtype(dtype))


def to_model(cfg: HunyuanVideoConfig, params: Mapping[str, np.ndarray], *, dtype=None):
    """A ``HunyuanVideoTransformer3D`` holding ``params`` (from ``convert_tensors``); no random initialisation runs.

    Args:
      cfg: the architecture.
      params: flat parameter path -> array; must cover the model exactly with matching shapes.
      dtype: parameter dtype (default: that of the arrays).

    Raises:
      ValueError: missing, unexpected or mis-shaped parameters (all listed).
    """
    from models.hunyuan_video.transformer import HunyuanVideoTransformer3D

    return common.module_from_params(
        lambda dt, rngs: HunyuanVideoTransformer3D(cfg, rngs=rngs, dtype=dt),
        params,
        dtype=dtype,
        where="converted parameters",
        cast=True,
    )


# ---------------------------------------------------------------------------------------------------------
# Files: safetensors in, orbax checkpoint + manifest out (``python -m convert_weights hunyuan-video``).


def open_source(src) -> tuple[common.SafetensorsSource, str]:
    """A lazy source over a checkpoint (a .safetensors file, or a diffusers directory, sharded or not) and its
    layout ('diffusers' or 'original'); a prefix shared by every key (ComfyUI, DeepSpeed) is stripped."""
    source = common.open_safetensors(common.find_source_files(src), strip_common=_PREFIXES)
    return source, detect_format(source)


def convert(
    src,
    dst,
    *,
    dtype: str = "bf16",
    rope_axes_dim: tuple[int, int, int] | None = None,
    rope_theta: float | None = None,
    hash_sources: bool = True,
) -> dict:
    """Converts a HunyuanVideo transformer checkpoint into an orbax checkpoint directory; returns the manifest.

    Args:
      src: a diffusers ``transformer/`` directory (or the pipeline directory holding it; sharded with an index
        or not), or one ``.safetensors`` file with diffusers or original release names.
      dst: output directory (written atomically; an existing one is replaced only at the end).
      dtype: 'bf16' (default), 'fp16' or 'fp32'.
      rope_axes_dim: RoPE head-dim split; default from config.json, else (16, 56, 56) for head_dim 128.
      rope_theta: RoPE base; default from config.json, else 256.
      hash_sources: record the sha256 of each source file in the manifest.
    """
    np_dtype = common.numpy_dtype(dtype)
    source, fmt = open_source(src)
    src_dir = Path(src) if Path(src).is_dir() else None
    cfg = infer_config(
        source,
        rope_axes_dim=rope_axes_dim,
        rope_theta=rope_theta,
        diffusers_config=common.read_diffusers_config(src_dir),
    )
    params = convert_tensors(source, cfg, dtype=np_dtype)
    return common.write_converted(
        dst,
        params,
        model=MODEL,
        variant="t2v" if cfg.guidance_embeds else "t2v-no-guidance-embedding",
        source_format=fmt,
        config=common.DictConfig(cfg),
        dtype=np_dtype,
        files=source.files,
        hash_sources=hash_sources,
    )


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(a) for a in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 16,56,56, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the hunyuan-video subcommand's options."""
    common.add_common_arguments(
        parser,
        src_help="diffusers transformer directory (or pipeline directory), or a .safetensors file with diffusers "
        "or original release key names",
        default_dtype="bf16",
    )
    parser.add_argument(
        "--rope-axes-dim",
        type=_ints,
        default=None,
        metavar="T,H,W",
        help="3-D RoPE split of head_dim (default: config.json, else 16,56,56 as the release)",
    )
    parser.add_argument(
        "--rope-theta", type=float, default=None, help="RoPE base (default: config.json, else 256 as the release)"
    )


def run(args: argparse.Namespace) -> int:
    """Runs the conversion described by the parsed arguments; returns the exit status."""
    if args.rope_axes_dim is not None and len(args.rope_axes_dim) != 3:
        raise ConversionError(f"--rope-axes-dim needs 3 sizes (t,h,w), got {args.rope_axes_dim}")
    m = common.convert_from_args(convert, args, rope_axes_dim=args.rope_axes_dim, rope_theta=args.rope_theta)
    c = m["config"]
    print(
        f"wrote {args.dst}: HunyuanVideo {m['variant']} from {m['source_format']} "
        f"({c['depth_double']} double + {c['depth_single']} single blocks, width {c['heads'] * c['head_dim']}; "
        f"{common.size_text(m, 'B')})"
    )
    return 0


DESCRIPTION = "HunyuanVideo text-to-video transformer (diffusers directory, or release/ComfyUI .safetensors)"
EXAMPLES = """The release's mp_rank_00_model_states.pt is a torch pickle and is not read: save its "module" state
dict with safetensors.torch.save_file first. Load the result with models.hunyuan_video.load.load_transformer.

examples:
  python -m convert_weights hunyuan-video --src HunyuanVideo/transformer --dst ckpt/hunyuan-video
  python -m convert_weights hunyuan-video --src hunyuan_video_t2v_720p_bf16.safetensors --dst ckpt/hunyuan-video
  python -m convert_weights hunyuan-video --src tiny.safetensors --dst ckpt/tiny --dtype fp32 --rope-axes-dim 4,6,6
"""
