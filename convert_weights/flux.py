"""FLUX.1 transformer: original BFL checkpoints and diffusers directories -> orbax checkpoint for models.flux.

Both source layouts are described by explicit key tables (``BFL_RULES``, ``DIFFUSERS_RULES``) whose transforms
are named in ``TRANSFORMS``. The architecture is read off the tensor shapes; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from convert_weights import common
from convert_weights.common import ConversionError, Rule, rule

MODEL = "flux"

# ---------------------------------------------------------------------------------------------------------
# Named transforms: (source arrays, FluxConfig) -> target arrays. Torch linears are [out, in].


def _heads(cfg) -> tuple[int, int, int]:
    return cfg.hidden, cfg.heads, cfg.head_dim


def _qkv_w(w: np.ndarray, cfg) -> np.ndarray:
    """[3C, C] fused torch q/k/v weight -> [C, 3, H, D]."""
    c, h, d = _heads(cfg)
    return w.reshape(3, h, d, w.shape[-1]).transpose(3, 0, 1, 2)


def _qkv_b(b: np.ndarray, cfg) -> np.ndarray:
    c, h, d = _heads(cfg)
    return b.reshape(3, h, d)


def _heads_out(w: np.ndarray, cfg) -> np.ndarray:
    """[C_out, H*D] torch output projection -> [H, D, C_out]."""
    c, h, d = _heads(cfg)
    return w.T.reshape(h, d, w.shape[0])


def _split_linear1_w(w: np.ndarray, cfg):
    c = cfg.hidden
    return _qkv_w(w[: 3 * c], cfg), w[3 * c :]


def _split_linear1_b(b: np.ndarray, cfg):
    c = cfg.hidden
    return _qkv_b(b[: 3 * c], cfg), b[3 * c :]


def _split_linear2_w(w: np.ndarray, cfg):
    """[C, C + F] single-block linear2 -> attention projection [H, D, C] and neuron-major fc2 [F, C]."""
    c = cfg.hidden
    return _heads_out(w[:, :c], cfg), w[:, c:].T


def _swap_halves(x: np.ndarray) -> np.ndarray:
    a, b = np.split(x, 2, axis=0)
    return np.concatenate([b, a], axis=0)


TRANSFORMS = {
    "identity": lambda xs, cfg: (xs[0],),
    # torch [out, in] -> kernel [in, out]
    "linear_T": lambda xs, cfg: (xs[0].T,),
    # fc2 [C, F] -> neuron-major [F, C] (the Chipmunk MLP layout)
    "fc2_T": lambda xs, cfg: (xs[0].T,),
    "qkv_fused_w": lambda xs, cfg: (_qkv_w(xs[0], cfg),),
    "qkv_fused_b": lambda xs, cfg: (_qkv_b(xs[0], cfg),),
    "qkv_separate_w": lambda xs, cfg: (_qkv_w(np.concatenate(xs, axis=0), cfg),),
    "qkv_separate_b": lambda xs, cfg: (_qkv_b(np.concatenate(xs, axis=0), cfg),),
    "heads_out": lambda xs, cfg: (_heads_out(xs[0], cfg),),
    # single-block linear1 [3C + F, C] = [q; k; v; fc1] (D, D, D, 4D with F = 4C)
    "split_linear1_w": lambda xs, cfg: _split_linear1_w(xs[0], cfg),
    "split_linear1_b": lambda xs, cfg: _split_linear1_b(xs[0], cfg),
    "split_linear2_w": lambda xs, cfg: _split_linear2_w(xs[0], cfg),
    # BFL final adaLN emits [shift, scale]; the model (as diffusers) expects [scale, shift]
    "swap_shift_scale_w": lambda xs, cfg: (_swap_halves(xs[0]).T,),
    "swap_shift_scale_b": lambda xs, cfg: (_swap_halves(xs[0]),),
}


def _lin(src: str, dst: str) -> list[Rule]:
    """A torch Linear onto a ``models.flux.model.Linear``."""
    return [rule(f"{src}.weight", f"{dst}.kernel", "linear_T"), rule(f"{src}.bias", f"{dst}.bias")]


def _bfl_rules() -> tuple[Rule, ...]:
    rules = [*_lin("img_in", "img_in"), *_lin("txt_in", "txt_in")]
    for emb in ("time_in", "vector_in", "guidance_in"):
        rules += [*_lin(f"{emb}.in_layer", f"{emb}.in_layer"), *_lin(f"{emb}.out_layer", f"{emb}.out_layer")]
    for side in ("img", "txt"):
        blk, dst = f"double_blocks.{{i}}.{side}", f"double.{side}"
        rules += [
            rule(f"{blk}_mod.lin.weight", f"{dst}_mod_w", "linear_T"),
            rule(f"{blk}_mod.lin.bias", f"{dst}_mod_b"),
            rule(f"{blk}_attn.qkv.weight", f"{dst}_qkv_w", "qkv_fused_w"),
            rule(f"{blk}_attn.qkv.bias", f"{dst}_qkv_b", "qkv_fused_b"),
            rule(f"{blk}_attn.norm.query_norm.scale", f"{dst}_q_norm"),
            rule(f"{blk}_attn.norm.key_norm.scale", f"{dst}_k_norm"),
            rule(f"{blk}_attn.proj.weight", f"{dst}_proj_w", "heads_out"),
            rule(f"{blk}_attn.proj.bias", f"{dst}_proj_b"),
            rule(f"{blk}_mlp.0.weight", f"{dst}_w1"),
            rule(f"{blk}_mlp.0.bias", f"{dst}_b1"),
            rule(f"{blk}_mlp.2.weight", f"{dst}_w2", "fc2_T"),
            rule(f"{blk}_mlp.2.bias", f"{dst}_b2"),
        ]
    s = "single_blocks.{i}"
    rules += [
        rule(f"{s}.linear1.weight", ("single.qkv_w", "single.w1"), "split_linear1_w"),
        rule(f"{s}.linear1.bias", ("single.qkv_b", "single.b1"), "split_linear1_b"),
        rule(f"{s}.linear2.weight", ("single.proj_w", "single.w2"), "split_linear2_w"),
        rule(f"{s}.linear2.bias", "single.b2"),
        rule(f"{s}.norm.query_norm.scale", "single.q_norm"),
        rule(f"{s}.norm.key_norm.scale", "single.k_norm"),
        rule(f"{s}.modulation.lin.weight", "single.mod_w", "linear_T"),
        rule(f"{s}.modulation.lin.bias", "single.mod_b"),
        *_lin("final_layer.linear", "final_linear"),
        rule("final_layer.adaLN_modulation.1.weight", "final_mod.kernel", "swap_shift_scale_w"),
        rule("final_layer.adaLN_modulation.1.bias", "final_mod.bias", "swap_shift_scale_b"),
    ]
    return tuple(rules)


def _diffusers_rules() -> tuple[Rule, ...]:
    tte = "time_text_embed"
    rules = [*_lin("x_embedder", "img_in"), *_lin("context_embedder", "txt_in")]
    for src, dst in (
        ("timestep_embedder", "time_in"),
        ("guidance_embedder", "guidance_in"),
        ("text_embedder", "vector_in"),
    ):
        rules += [*_lin(f"{tte}.{src}.linear_1", f"{dst}.in_layer"), *_lin(f"{tte}.{src}.linear_2", f"{dst}.out_layer")]
    b = "transformer_blocks.{i}"
    names = {
        "img": dict(mod="norm1", qkv=("to_q", "to_k", "to_v"), qn="norm_q", kn="norm_k", out="to_out.0", ff="ff"),
        "txt": dict(
            mod="norm1_context",
            qkv=("add_q_proj", "add_k_proj", "add_v_proj"),
            qn="norm_added_q",
            kn="norm_added_k",
            out="to_add_out",
            ff="ff_context",
        ),
    }
    for side, n in names.items():
        dst = f"double.{side}"
        rules += [
            rule(f"{b}.{n['mod']}.linear.weight", f"{dst}_mod_w", "linear_T"),
            rule(f"{b}.{n['mod']}.linear.bias", f"{dst}_mod_b"),
            rule(tuple(f"{b}.attn.{p}.weight" for p in n["qkv"]), f"{dst}_qkv_w", "qkv_separate_w"),
            rule(tuple(f"{b}.attn.{p}.bias" for p in n["qkv"]), f"{dst}_qkv_b", "qkv_separate_b"),
            rule(f"{b}.attn.{n['qn']}.weight", f"{dst}_q_norm"),
            rule(f"{b}.attn.{n['kn']}.weight", f"{dst}_k_norm"),
            rule(f"{b}.attn.{n['out']}.weight", f"{dst}_proj_w", "heads_out"),
            rule(f"{b}.attn.{n['out']}.bias", f"{dst}_proj_b"),
            rule(f"{b}.{n['ff']}.net.0.proj.weight", f"{dst}_w1"),
            rule(f"{b}.{n['ff']}.net.0.proj.bias", f"{dst}_b1"),
            rule(f"{b}.{n['ff']}.net.2.weight", f"{dst}_w2", "fc2_T"),
            rule(f"{b}.{n['ff']}.net.2.bias", f"{dst}_b2"),
        ]
    s = "single_transformer_blocks.{i}"
    rules += [
        rule(tuple(f"{s}.attn.{p}.weight" for p in ("to_q", "to_k", "to_v")), "single.qkv_w", "qkv_separate_w"),
        rule(tuple(f"{s}.attn.{p}.bias" for p in ("to_q", "to_k", "to_v")), "single.qkv_b", "qkv_separate_b"),
        rule(f"{s}.proj_mlp.weight", "single.w1"),
        rule(f"{s}.proj_mlp.bias", "single.b1"),
        rule(f"{s}.proj_out.weight", ("single.proj_w", "single.w2"), "split_linear2_w"),
        rule(f"{s}.proj_out.bias", "single.b2"),
        rule(f"{s}.attn.norm_q.weight", "single.q_norm"),
        rule(f"{s}.attn.norm_k.weight", "single.k_norm"),
        rule(f"{s}.norm.linear.weight", "single.mod_w", "linear_T"),
        rule(f"{s}.norm.linear.bias", "single.mod_b"),
        # diffusers' AdaLayerNormContinuous already emits [scale, shift]: no swap.
        *_lin("norm_out.linear", "final_mod"),
        *_lin("proj_out", "final_linear"),
    ]
    return tuple(rules)


BFL_RULES = _bfl_rules()
DIFFUSERS_RULES = _diffusers_rules()

# Keys whose presence identifies a layout, and the keys whose shapes define the architecture.
_PROBES = {
    "bfl": dict(
        marker="img_in.weight",
        img_in="img_in.weight",
        txt_in="txt_in.weight",
        vec_in="vector_in.in_layer.weight",
        out="final_layer.linear.weight",
        guidance="guidance_in.in_layer.weight",
        double="double_blocks.{i}.img_attn.norm.query_norm.scale",
        single="single_blocks.{i}.norm.query_norm.scale",
        mlp_double="double_blocks.{i}.img_mlp.0.weight",
        mlp_single="single_blocks.{i}.linear2.weight",
    ),
    "diffusers": dict(
        marker="x_embedder.weight",
        img_in="x_embedder.weight",
        txt_in="context_embedder.weight",
        vec_in="time_text_embed.text_embedder.linear_1.weight",
        out="proj_out.weight",
        guidance="time_text_embed.guidance_embedder.linear_1.weight",
        double="transformer_blocks.{i}.attn.norm_q.weight",
        single="single_transformer_blocks.{i}.attn.norm_q.weight",
        mlp_double="transformer_blocks.{i}.ff.net.0.proj.weight",
        mlp_single="single_transformer_blocks.{i}.proj_out.weight",
    ),
}
RULES = {"bfl": BFL_RULES, "diffusers": DIFFUSERS_RULES}
# ComfyUI-style single files prefix the BFL keys with this.
_BFL_PREFIX = "model.diffusion_model."


def open_source(src) -> tuple[common.SafetensorsSource, str]:
    """Opens a checkpoint and detects its layout: 'bfl' or 'diffusers'."""
    source = common.open_safetensors(common.find_source_files(src), strip_common=(_BFL_PREFIX,))
    for fmt, probe in _PROBES.items():
        if probe["marker"] in source:
            return source, fmt
    raise ConversionError(
        f"{src}: not a FLUX.1 transformer checkpoint (found neither 'img_in.weight' (BFL) nor 'x_embedder.weight' "
        f"(diffusers)); first keys: {source.keys()[:8]}"
    )


def infer_config(source: common.SafetensorsSource, fmt: str, axes_dim=None, src_dir: Path | None = None):
    """The FluxConfig implied by the tensor shapes of a checkpoint."""
    from models.flux.config import FluxConfig

    p = _PROBES[fmt]
    keys = source.keys()
    c, in_ch = source.shape(p["img_in"])
    ctx = source.shape(p["txt_in"])[1]
    vec = source.shape(p["vec_in"])[1]
    out_ch = source.shape(p["out"])[0]
    nd = len(common.layer_indices(keys, p["double"]))
    ns = len(common.layer_indices(keys, p["single"]))
    if nd:
        head_dim = source.shape(p["double"].format(i=0))[0]
        f = source.shape(p["mlp_double"].format(i=0))[0]
    elif ns:
        head_dim = source.shape(p["single"].format(i=0))[0]
        f = source.shape(p["mlp_single"].format(i=0))[1] - c
    else:
        raise ConversionError("the checkpoint has no transformer blocks")
    if axes_dim is None and fmt == "diffusers":
        axes_dim = common.read_diffusers_config(src_dir).get("axes_dims_rope")
    if axes_dim is None:
        if head_dim != 128:
            raise ConversionError(f"head_dim {head_dim} != 128: pass --axes-dim (RoPE split, e.g. 4,6,6)")
        axes_dim = (16, 56, 56)
    return FluxConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        hidden=c,
        heads=c // head_dim,
        mlp_hidden=f,
        depth_double=nd,
        depth_single=ns,
        context_dim=ctx,
        vec_dim=vec,
        axes_dim=tuple(axes_dim),
        guidance_embed=p["guidance"] in source,
    )


def target_shapes(cfg) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Flat parameter path -> (shape, layered) of ``models.flux.Flux(cfg)``, without allocating it."""
    from models.flux.model import Flux

    return common.module_target_shapes(Flux, cfg, layered=("double.", "single."))


def convert(src, dst, *, dtype: str = "bf16", axes_dim=None, hash_sources: bool = True) -> dict:
    """Converts a FLUX.1 checkpoint; returns the manifest.

    Args:
      src: a BFL ``.safetensors`` file, or a diffusers transformer directory (sharded, with ``*.index.json``).
      dst: output directory (written atomically).
      dtype: 'bf16' (default), 'fp16' or 'fp32'.
      axes_dim: RoPE axes split; read from diffusers' config.json, else (16, 56, 56) for head_dim 128.
      hash_sources: record the sha256 of each source file in the manifest.
    """
    np_dtype = common.numpy_dtype(dtype)
    source, fmt = open_source(src)
    cfg = infer_config(source, fmt, axes_dim, Path(src) if Path(src).is_dir() else None)
    params = common.apply_rules(source, RULES[fmt], TRANSFORMS, target_shapes(cfg), cfg, np_dtype)
    return common.write_converted(
        dst,
        params,
        model=MODEL,
        variant="dev" if cfg.guidance_embed else "schnell",
        source_format=fmt,
        config=cfg,
        dtype=np_dtype,
        files=source.files,
        hash_sources=hash_sources,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the flux subcommand's options."""
    common.add_common_arguments(
        parser, src_help="BFL .safetensors file or diffusers transformer directory", default_dtype="bf16"
    )
    parser.add_argument(
        "--axes-dim",
        default=None,
        help="RoPE axes split, comma separated (default: diffusers config.json, else 16,56,56)",
    )


def run(args: argparse.Namespace) -> int:
    """Runs the conversion described by the parsed arguments; returns the exit status."""
    axes = tuple(int(a) for a in args.axes_dim.split(",")) if args.axes_dim else None
    m = common.convert_from_args(convert, args, axes_dim=axes)
    print(f"wrote {args.dst}: FLUX.1-{m['variant']} from {m['source_format']} ({common.size_text(m, 'B')})")
    return 0


DESCRIPTION = "FLUX.1 dev/schnell transformer (BFL single file or diffusers directory)"
EXAMPLES = """examples:
  python -m convert_weights flux --src flux1-dev.safetensors --dst ckpt/flux-dev
  python -m convert_weights flux --src FLUX.1-schnell/transformer --dst ckpt/flux-schnell --dtype fp32
"""
