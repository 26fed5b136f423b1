"""Mochi 1 asymmetric DiT (diffusers ``MochiTransformer3DModel``) in Flax NNX with Chipmunk sparse attention.

Two streams of different widths: video tokens (C = heads * head_dim) and T5 text tokens (``text_width``). Each
block modulates both with RMS norms driven by the conditioning vector (timestep embedding + attention pooling of
the text), runs ONE joint attention over [video; text] (per-stream projections and per-head q/k RMS norms, learned
3-D RoPE on the video only, padded text keys masked), then a SwiGLU feed-forward per stream. The last block has no
text output (``context_pre_only``), so it is stored apart from the stacked, scanned blocks.

Chipmunk (SPEC §6): the joint attention is sparsified; the sequence is [video in voxel order; text]. Padded text
tokens are kept out of the sparse attention by cutting the text to a static ``text_len`` that every batch row must
fill exactly (the Chipmunk operators take no key mask; see ``MochiTransformer3D.__call__``). Dense layers and the
plain model accept any prefix padding mask. The SwiGLU feed-forward is never sparsified (the Chipmunk MLP is GELU).

Weight layouts: linear kernels [in, out]; video q/k/v fused [C, 3, C] and text q/k/v [Ct, 3, C] (no biases, as the
release); SwiGLU as ``*_gate_w`` (SiLU input), ``*_up_w`` (the multiplied half) [in, F] and ``*_down_w`` [F, out]
(diffusers' ``ff.net.0.proj`` holds [up; gate] in that order); patch embedding [p*p*C_in, C] over channels-last
patches flattened in (ph, pw, c) order, output projection [C, p*p*C_out] in the same order.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chipmunk_jax.attention import sparse_attention
from chipmunk_jax.cache import AttentionCache
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.indices import StaticMask, layer_rng
from chipmunk_jax.reorder import unvoxelize, voxelize
from chipmunk_jax.schedules import AttnKind, StepPlan, kind_runs
from models.mochi.config import MochiConfig
from models.video import init_video_cache, sparse_layer_count, video_static_mask
from models.wan.transformer import Linear, TwoLayerMLP, layer_norm, rms_norm, timestep_embedding

# MochiRoPE centres the h/w positions on a grid whose area is rescaled to 192 x 192 (resolution-independent scale).
_ROPE_TARGET_AREA = 192 * 192


def _normal(rngs: nnx.Rngs, shape, dtype, std: float) -> nnx.Param:
    return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype))


def _ones(shape, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype))


def _block_params(self, cfg: MochiConfig, lead: tuple[int, ...], last: bool, rngs: nnx.Rngs, dtype) -> None:
    c, ct, d, f, ft = cfg.dim, cfg.text_width, cfg.head_dim, cfg.ffn_dim, cfg.text_ffn_dim
    s_c, s_ct = 1.0 / math.sqrt(c), 1.0 / math.sqrt(ct)
    self.mod_w = _normal(rngs, (*lead, c, 4 * c), dtype, s_c)
    self.mod_b = _normal(rngs, (*lead, 4 * c), dtype, 0.02)
    if last:
        self.ctx_scale_w = _normal(rngs, (*lead, c, ct), dtype, s_c)
        self.ctx_scale_b = _normal(rngs, (*lead, ct), dtype, 0.02)
    else:
        self.ctx_mod_w = _normal(rngs, (*lead, c, 4 * ct), dtype, s_c)
        self.ctx_mod_b = _normal(rngs, (*lead, 4 * ct), dtype, 0.02)
    self.qkv_w = _normal(rngs, (*lead, c, 3, c), dtype, s_c)
    self.ctx_qkv_w = _normal(rngs, (*lead, ct, 3, c), dtype, s_ct)
    self.norm_q = _ones((*lead, d), dtype)
    self.norm_k = _ones((*lead, d), dtype)
    self.norm_ctx_q = _ones((*lead, d), dtype)
    self.norm_ctx_k = _ones((*lead, d), dtype)
    self.out_w = _normal(rngs, (*lead, c, c), dtype, s_c)
    self.out_b = _normal(rngs, (*lead, c), dtype, 0.02)
    self.ff_gate_w = _normal(rngs, (*lead, c, f), dtype, s_c)
    self.ff_up_w = _normal(rngs, (*lead, c, f), dtype, s_c)
    self.ff_down_w = _normal(rngs, (*lead, f, c), dtype, 1.0 / math.sqrt(f))
    if not last:
        self.ctx_out_w = _normal(rngs, (*lead, c, ct), dtype, s_c)
        self.ctx_out_b = _normal(rngs, (*lead, ct), dtype, 0.02)
        self.ctx_ff_gate_w = _normal(rngs, (*lead, ct, ft), dtype, s_ct)
        self.ctx_ff_up_w = _normal(rngs, (*lead, ct, ft), dtype, s_ct)
        self.ctx_ff_down_w = _normal(rngs, (*lead, ft, ct), dtype, 1.0 / math.sqrt(ft))


class MochiBlocks(nnx.Module):
    """Blocks 0 .. num_layers - 2 (text output kept), every parameter with a leading layer axis.

    Attributes (per layer): ``mod_*`` / ``ctx_mod_*`` the adaptive RMS-norm projections of the conditioning vector
    into (scale_msa, gate_msa, scale_mlp, gate_mlp) per stream; the joint attention ``qkv_w``, ``ctx_qkv_w``,
    per-head RMS scales ``norm_q``, ``norm_k``, ``norm_ctx_q``, ``norm_ctx_k``, output projections ``out_*`` and
    ``ctx_out_*``; SwiGLU feed-forwards ``ff_*`` and ``ctx_ff_*``.
    """

    def __init__(self, cfg: MochiConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        _block_params(self, cfg, (cfg.num_layers - 1,), False, rngs, dtype)


class MochiLastBlock(nnx.Module):
    """The last block: no text output; its text norm is scaled only (``ctx_scale_*``, diffusers
    MochiLayerNormContinuous). Same names as ``MochiBlocks`` otherwise, without the layer axis."""

    def __init__(self, cfg: MochiConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        _block_params(self, cfg, (), True, rngs, dtype)


class AttentionPool(nnx.Module):
    """Attention pooling of the T5 tokens: the masked mean token queries [mean; tokens] (diffusers
    MochiAttentionPool). ``to_kv`` output is ordered (k|v, head, head_dim)."""

    def __init__(self, d_in: int, d_out: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        self.heads = heads
        self.to_kv = Linear(d_in, 2 * d_in, rngs=rngs, dtype=dtype)
        self.to_q = Linear(d_in, d_in, rngs=rngs, dtype=dtype)
        self.to_out = Linear(d_in, d_out, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x [B, L, T], mask [B, L] bool -> [B, d_out]."""
        b, _, t = x.shape
        w = mask.astype(x.dtype)
        mean = (x * w[:, :, None]).sum(1) / jnp.maximum(w.sum(1), 1.0)[:, None]  # [B, T]
        xs = jnp.concatenate([mean[:, None, :], x], axis=1)  # [B, 1 + L, T]
        kv = self.to_kv(xs).reshape(b, -1, 2, self.heads, t // self.heads)  # [B, 1 + L, 2, Hp, Dp]
        q = self.to_q(mean).reshape(b, 1, self.heads, t // self.heads)  # [B, 1, Hp, Dp]
        keep = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)  # the mean token is always a key
        o = _masked_attention(q, kv[:, :, 0], kv[:, :, 1], keep)
        return self.to_out(o.reshape(b, t))


@flax.struct.dataclass
class MochiCache:
    """Everything a Mochi denoising step carries to the next.

    Attributes:
      attn: AttentionCache of the sparsified layers [first_n_dense_layers, num_layers) on a leading layer axis,
        over the joint sequence [video in voxel order; text_len text tokens] (batch includes the CFG branches),
        or None.
      hidden: [B, N, C] video hidden states before the output head, raster order (step caching), or None.
    """

    attn: AttentionCache | None = None
    hidden: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class ChipmunkRun:
    """Static Chipmunk settings of one forward pass (hashable: part of a jitted step's static arguments).

    Attributes:
      config: the Chipmunk config (only ``attn`` is used).
      plan: the step's kinds (``schedules.step_kinds(config, steps, MochiConfig.num_layers).steps[t]``).
      text_len: text tokens in the joint attention sequence; every batch row must have exactly this many valid
        (leading) text tokens.
      backend: operator backend ('auto', 'reference', 'xla', 'mosaic_gpu').
    """

    config: ChipmunkConfig
    plan: StepPlan
    text_len: int
    backend: str = "auto"


def post_patch_grid(cfg: MochiConfig, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The (t, h, w) token grid of latents of ``frames`` x ``height`` x ``width`` (h, w divisible by the patch)."""
    p = cfg.patch_size
    if height % p or width % p:
        raise ValueError(f"latent size {(height, width)} is not divisible by the patch {p}")
    return frames, height // p, width // p


def sparse_layers(cfg: MochiConfig, chipmunk: ChipmunkConfig | None) -> int:
    """Layers that keep a Chipmunk attention cache (0 when sparse attention is off)."""
    return sparse_layer_count(cfg.num_layers, chipmunk)


def init_mochi_cache(
    cfg: MochiConfig,
    chipmunk: ChipmunkConfig | None,
    *,
    batch: int,
    grid: tuple[int, int, int],
    text_len: int,
    dtype=jnp.bfloat16,
    step_caching: bool | None = None,
) -> MochiCache:
    """Allocates the (zero) cache of a generation.

    Args:
      cfg: the architecture.
      chipmunk: the Chipmunk config, or None (dense model).
      batch: batch of one model call, CFG branches included (2B with CFG: cond then uncond).
      grid: post-patch token grid (t, h, w) (``post_patch_grid``).
      text_len: text tokens of the joint sequence (``ChipmunkRun.text_len``).
      dtype: dtype of the attention output cache and of the step-caching hidden states.
      step_caching: keep the pre-head hidden states; defaults to ``chipmunk.step_caching.is_enabled``.
    """
    return init_video_cache(
        MochiCache,
        chipmunk,
        num_layers=cfg.num_layers,
        heads=cfg.heads,
        head_dim=cfg.head_dim,
        width=cfg.dim,
        batch=batch,
        grid=grid,
        text_len=text_len,
        dtype=dtype,
        step_caching=step_caching,
    )


def mochi_static_mask(
    cfg: MochiConfig, chipmunk: ChipmunkConfig, grid: tuple[int, int, int], text_len: int, rng: jax.Array | None
) -> StaticMask:
    """The static part of the compressed key mask over [video in voxel order; text_len text] (SPEC §1.3)."""
    return video_static_mask(cfg.heads, chipmunk, grid, text_len, rng)


def rope_positions(grid: tuple[int, int, int]) -> np.ndarray:
    """Positions [t*h*w, 3] float32 (frame index, centred rescaled row, centred rescaled column), raster order."""
    t, h, w = grid
    scale = math.sqrt(_ROPE_TARGET_AREA / (h * w))

    def centres(n: int) -> np.ndarray:
        edges = np.linspace(-n * scale / 2, n * scale / 2, n + 1, dtype=np.float64)
        return (edges[:-1] + edges[1:]) / 2

    pos = np.stack(np.meshgrid(np.arange(t, dtype=np.float64), centres(h), centres(w), indexing="ij"), axis=-1)
    return pos.reshape(-1, 3).astype(np.float32)


def rope_table(pos_frequencies: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [N, H, D/2] float32 from the learned frequencies [3, H, D/2] and positions [N, 3]."""
    ang = jnp.einsum("nd,dhf->nhf", positions.astype(jnp.float32), pos_frequencies.astype(jnp.float32))
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (x[2j], x[2j+1]) of x [B, N, H, D] by per-head angles cos/sin [N, H, D/2]."""
    b, n, h, d = x.shape
    xr = x.astype(jnp.float32).reshape(b, n, h, d // 2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    c, s = cos[None], sin[None]
    return jnp.stack([c * x0 - s * x1, s * x0 + c * x1], axis=-1).reshape(b, n, h, d).astype(x.dtype)


def _masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array) -> jax.Array:
    """Softmax attention of q [B, N, H, D] over k/v [B, M, H, D] restricted to key_valid [B, M] -> [B, N, H, D]."""
    # jax.nn.dot_product_attention mixes bf16 and f32 internally, which strict promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
        return jax.nn.dot_product_attention(q, k, v, mask=key_valid[:, None, None, :])


def _joint_dense_attention(q, k, v, n_valid_keys: jax.Array, implementation: str | None) -> jax.Array:
    """Attention of q [B, N, H, D] over the first n_valid_keys [B] of k/v [B, M, H, D] (valid text is a prefix)."""
    # Key lengths rather than a dense mask keep the cuDNN flash path available on GPU.
    with jax.numpy_dtype_promotion("standard"):
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=n_valid_keys, implementation=implementation)


def _f32_linear(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum("bi,io->bo", x, w.astype(jnp.float32)) + b.astype(jnp.float32)[None, :]


def _rms_modulate(x: jax.Array, factor: jax.Array, eps: float) -> jax.Array:
    """RMSNorm(x) * factor[:, None, :] in float32 (no learned scale); output in x.dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)
    return (y * factor[:, None, :]).astype(x.dtype)


def _swiglu(x: jax.Array, gate_w: jax.Array, up_w: jax.Array, down_w: jax.Array) -> jax.Array:
    h = jax.nn.silu(jnp.einsum("bnc,cf->bnf", x, gate_w)) * jnp.einsum("bnc,cf->bnf", x, up_w)
    return jnp.einsum("bnf,fc->bnc", h, down_w)


@dataclasses.dataclass(frozen=True)
class _Kinds:
    """Static per-run settings of the block function."""

    attn: AttnKind
    chipmunk: ChipmunkConfig | None
    backend: str
    attention_impl: str | None = None


def joint_attention(p: dict, x, ctx, text_valid, cos, sin, cache, kinds: _Kinds, rng, static_mask, cfg, last):
    """Joint attention over [video x [B, N, C]; text ctx [B, L, Ct]] -> (video out, text out or None, cache)."""
    b, n, _ = x.shape
    heads, d = cfg.heads, cfg.head_dim
    qkv = jnp.einsum("bnc,ctk->tbnk", x, p["qkv_w"]).reshape(3, b, n, heads, d)  # [3, B, N, H, D]
    q = apply_rope(rms_norm(qkv[0], p["norm_q"], cfg.qk_eps), cos, sin)
    k = apply_rope(rms_norm(qkv[1], p["norm_k"], cfg.qk_eps), cos, sin)
    cqkv = jnp.einsum("blc,ctk->tblk", ctx, p["ctx_qkv_w"]).reshape(3, b, -1, heads, d)  # [3, B, L, H, D]
    cq = rms_norm(cqkv[0], p["norm_ctx_q"], cfg.qk_eps)
    ck = rms_norm(cqkv[1], p["norm_ctx_k"], cfg.qk_eps)
    jq, jk, jv = (jnp.concatenate([a, c.astype(a.dtype)], axis=1) for a, c in ((q, cq), (k, ck), (qkv[2], cqkv[2])))
    if kinds.attn is AttnKind.DENSE:
        n_keys = n + text_valid.sum(axis=1, dtype=jnp.int32)
        o = _joint_dense_attention(jq, jk, jv, n_keys, kinds.attention_impl)  # [B, N + L, H, D]
    else:
        t = lambda a: jnp.swapaxes(a, 1, 2)  # [B, N, H, D] <-> [B, H, N, D], the Chipmunk operator layout
        o, cache = sparse_attention(
            t(jq),
            t(jk),
            t(jv),
            cache,
            kind=kinds.attn,
            config=kinds.chipmunk,
            backend=kinds.backend,
            rng=rng,
            static_mask=static_mask,
        )
        o = t(o)
    o = o.astype(x.dtype).reshape(b, o.shape[1], heads * d)
    out = jnp.einsum("bnk,kc->bnc", o[:, :n], p["out_w"]) + p["out_b"][None, None, :]
    if last:
        return out, None, cache
    # Padded text queries produce no attention output (diffusers pads them with zeros after the valid prefix).
    o_txt = jnp.where(text_valid[:, :, None], o[:, n:], jnp.zeros((), o.dtype))
    ctx_out = jnp.einsum("blk,kc->blc", o_txt.astype(ctx.dtype), p["ctx_out_w"]) + p["ctx_out_b"][None, None, :]
    return out, ctx_out, cache


def block(p: dict, x, ctx, text_valid, temb, cos, sin, cache, kinds: _Kinds, rng, static_mask, cfg, last: bool):
    """One MochiTransformerBlock on video x [B, N, C] and text ctx [B, L, Ct]; temb [B, C] float32."""
    eps = cfg.eps
    st = jax.nn.silu(temb)
    mod = _f32_linear(st, p["mod_w"], p["mod_b"])  # [B, 4C]: scale_msa, gate_msa, scale_mlp, gate_mlp
    scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(mod, 4, axis=-1)
    xn = _rms_modulate(x, 1.0 + scale_msa, eps)
    if last:
        ctxn = _rms_modulate(ctx, 1.0 + _f32_linear(st, p["ctx_scale_w"], p["ctx_scale_b"]), eps)
    else:
        cmod = _f32_linear(st, p["ctx_mod_w"], p["ctx_mod_b"])
        c_scale_msa, c_gate_msa, c_scale_mlp, c_gate_mlp = jnp.split(cmod, 4, axis=-1)
        ctxn = _rms_modulate(ctx, 1.0 + c_scale_msa, eps)
    a, ca, cache = joint_attention(p, xn, ctxn, text_valid, cos, sin, cache, kinds, rng, static_mask, cfg, last)
    x = x + _rms_modulate(a, jnp.tanh(gate_msa), eps).astype(x.dtype)
    m = _swiglu(_rms_modulate(x, 1.0 + scale_mlp, eps), p["ff_gate_w"], p["ff_up_w"], p["ff_down_w"])
    x = x + _rms_modulate(m, jnp.tanh(gate_mlp), eps).astype(x.dtype)
    if not last:
        ctx = ctx + _rms_modulate(ca, jnp.tanh(c_gate_msa), eps).astype(ctx.dtype)
        cm = _swiglu(
            _rms_modulate(ctx, 1.0 + c_scale_mlp, eps), p["ctx_ff_gate_w"], p["ctx_ff_up_w"], p["ctx_ff_down_w"]
        )
        ctx = ctx + _rms_modulate(cm, jnp.tanh(c_gate_mlp), eps).astype(ctx.dtype)
    return x, ctx, cache


def _slice(tree, a: int, b: int):
    return jax.tree.map(lambda x: x[a:b], tree)


def _put(tree, new, a: int):
    return jax.tree.map(lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), a, axis=0), tree, new)


def _params(module: nnx.Module) -> dict:
    return {k: v[...] for k, v in vars(module).items() if isinstance(v, nnx.Param)}


def _check_text_len(text_mask: jax.Array, text_len: int) -> None:
    """Every row must have exactly ``text_len`` valid leading tokens (checked when the mask is concrete)."""
    if text_len < 0 or text_len > text_mask.shape[1]:
        raise ValueError(f"text_len {text_len} is outside [0, {text_mask.shape[1]}]")
    if isinstance(text_mask, jax.core.Tracer):
        return
    m = np.asarray(text_mask, bool)
    if not (m[:, :text_len].all() and not m[:, text_len:].any()):
        raise ValueError(
            f"Chipmunk attention needs every batch row (CFG branches included) to have exactly text_len={text_len} "
            f"leading valid text tokens; the rows have {m.sum(1).tolist()} (pad or truncate the prompts to a "
            "common valid length, or run the text-mismatched branches without Chipmunk)"
        )


class MochiTransformer3D(nnx.Module):
    """The Mochi 1 transformer; call with video latents, timesteps, T5 embeddings and their padding mask.

    Parameter names follow the diffusers module tree where one module maps to one parameter; the per-block
    tensors are the stacked ``blocks`` (layers 0 .. L-2) and ``last_block``.
    """

    def __init__(self, cfg: MochiConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        self.cfg = cfg
        c = cfg.dim
        self.patch_embed = Linear(cfg.patch_volume * cfg.in_channels, c, rngs=rngs, dtype=dtype)
        self.timestep_embedder = TwoLayerMLP(cfg.time_embed_dim, c, c, rngs=rngs, dtype=dtype)
        self.pooler = AttentionPool(cfg.text_dim, c, cfg.text_pool_heads, rngs=rngs, dtype=dtype)
        self.caption_proj = Linear(cfg.text_dim, cfg.text_width, rngs=rngs, dtype=dtype)
        # Zero-initialised in diffusers (loaded from the checkpoint); random here so an untrained model has RoPE.
        self.pos_frequencies = _normal(rngs, (3, cfg.heads, cfg.head_dim // 2), jnp.float32, 0.1)
        self.blocks = MochiBlocks(cfg, rngs=rngs, dtype=dtype)
        self.last_block = MochiLastBlock(cfg, rngs=rngs, dtype=dtype)
        self.norm_out = Linear(c, 2 * c, rngs=rngs, dtype=dtype)  # AdaLN projection, output ordered [scale; shift]
        self.proj_out = Linear(c, cfg.patch_volume * cfg.out_channels, rngs=rngs, dtype=dtype)

    @property
    def dtype(self):
        return self.patch_embed.kernel[...].dtype

    def embed(self, timestep: jax.Array, text: jax.Array, text_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(conditioning temb [B, C] float32, text stream [B, L, Ct]) from timesteps [B] and T5 tokens."""
        lin1, lin2 = self.timestep_embedder.linear_1, self.timestep_embedder.linear_2
        t_in = timestep_embedding(timestep, self.cfg.time_embed_dim)
        temb = _f32_linear(
            jax.nn.silu(_f32_linear(t_in, lin1.kernel[...], lin1.bias[...])), lin2.kernel[...], lin2.bias[...]
        )
        pooled = self.pooler(text, text_mask).astype(jnp.float32)
        return temb + pooled, self.caption_proj(text)

    def head(self, hidden: jax.Array, temb: jax.Array) -> jax.Array:
        """AdaLN (LayerNorm, scale, shift) + projection on hidden [B, N, C] -> [B, N, p*p*C_out]."""
        mod = _f32_linear(jax.nn.silu(temb), self.norm_out.kernel[...], self.norm_out.bias[...])
        scale, shift = jnp.split(mod, 2, axis=-1)
        y = layer_norm(hidden.astype(jnp.float32), self.cfg.eps) * (1.0 + scale[:, None, :]) + shift[:, None, :]
        return self.proj_out(y.astype(hidden.dtype))

    def patchify(self, latents: jax.Array) -> tuple[jax.Array, tuple[int, int, int]]:
        """Latents [B, C, F, H, W] -> (patch tokens [B, N, p*p*C] raster (t, h, w), grid)."""
        if latents.ndim != 5:
            raise ValueError(f"latents must be 5-D video latents [B, C, F, H, W], got {latents.shape=}")
        b, c, f, h, w = latents.shape
        if c != self.cfg.in_channels:
            raise ValueError(f"latents have {c} channels, the model takes {self.cfg.in_channels}")
        grid = post_patch_grid(self.cfg, f, h, w)
        p, (_, gh, gw) = self.cfg.patch_size, grid
        x = jnp.moveaxis(latents, 1, -1).reshape(b, f, gh, p, gw, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, f * gh * gw, p * p * c), grid

    def unpatchify(self, y: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
        """Head output [B, N, p*p*C_out] raster -> [B, C_out, F, H, W]."""
        (f, gh, gw), p, c = grid, self.cfg.patch_size, self.cfg.out_channels
        y = y.reshape(y.shape[0], f, gh, gw, p, p, c).transpose(0, 6, 1, 2, 4, 3, 5)
        return y.reshape(y.shape[0], c, f, gh * p, gw * p)

    def final_layer(
        self, hidden: jax.Array, timestep: jax.Array, text: jax.Array, text_mask: jax.Array, grid: tuple[int, int, int]
    ) -> jax.Array:
        """Head + unpatchify on cached raster hidden states [B, N, C] (a step skipped by step caching, SPEC §4).

        The conditioning vector includes the pooled text, so the text and its mask are needed as well.
        """
        temb, _ = self.embed(timestep, text.astype(self.dtype), text_mask.astype(bool))
        return self.unpatchify(self.head(hidden, temb), grid)

    def __call__(
        self,
        latents: jax.Array,
        timestep: jax.Array,
        text: jax.Array,
        text_mask: jax.Array,
        cache: MochiCache | None = None,
        *,
        chipmunk: ChipmunkRun | None = None,
        rng: jax.Array | None = None,
        step: jax.Array | int = 0,
        static_mask: StaticMask | None = None,
        attention_impl: str | None = None,
    ) -> tuple[jax.Array, MochiCache]:
        """Runs the transformer: one model call, CFG branches batched on the batch axis (cond first).

        Args:
          latents: [B, C_in, F, H, W] video latents; H, W divisible by the patch size.
          timestep: [B] diffusion timesteps in [0, 1000] (as diffusers).
          text: [B, L, text_dim] T5 embeddings.
          text_mask: [B, L] bool, True on valid tokens; the valid tokens must be a prefix of each row (T5
            padding), as diffusers packs them to the front.
          cache: the MochiCache from ``init_mochi_cache`` (needed when ``chipmunk`` sparsifies attention).
          chipmunk: static Chipmunk settings, or None for the plain dense model. With Chipmunk attention on, the
            text stream is cut to ``chipmunk.text_len`` tokens and every row must have exactly that many valid
            tokens (a ValueError when the mask is concrete; under jit the caller must guarantee it).
          rng: generation key; each (step, layer) gets ``indices.layer_rng(rng, step, layer)``.
          step: the denoising step index (for the per-layer rng; may be traced).
          static_mask: ``mochi_static_mask`` for this grid and text_len, or None for no static part.
          attention_impl: ``implementation`` of jax.nn.dot_product_attention for the dense joint attention.

        Returns:
          (prediction [B, C_out, F, H, W], new cache).
        """
        cfg = self.cfg
        plan = chipmunk.plan if chipmunk is not None else None
        if plan is not None and (len(plan.attn) != cfg.num_layers or plan.skip):
            raise ValueError(f"plan has {len(plan.attn)} layers (skip={plan.skip}); the model has {cfg.num_layers}")
        kinds = list(plan.attn) if plan is not None else [AttnKind.DENSE] * cfg.num_layers
        cache = cache if cache is not None else MochiCache()
        offset = cfg.num_layers - sparse_layers(cfg, chipmunk.config if chipmunk is not None else None)
        for layer, kind in enumerate(kinds):
            if kind is not AttnKind.DENSE and layer < offset:
                raise ValueError(f"layer {layer} runs {kind} but only layers >= {offset} keep a Chipmunk cache")
            if kind is not AttnKind.DENSE and cache.attn is None:
                raise ValueError("a Chipmunk attention step needs the cache from init_mochi_cache")

        dt = self.dtype
        tokens, grid = self.patchify(latents.astype(dt))
        b, n = tokens.shape[0], tokens.shape[1]
        if timestep.shape != (b,) or text.shape[0] != b or text_mask.shape != text.shape[:2]:
            raise ValueError(f"batch mismatch: latents {b}, {timestep.shape=}, {text.shape=}, {text_mask.shape=}")
        text_mask = text_mask.astype(bool)
        voxel = chipmunk is not None and chipmunk.config.attn.is_enabled
        if voxel:
            _check_text_len(text_mask, chipmunk.text_len)
        temb, ctx = self.embed(timestep, text.astype(dt), text_mask)
        if voxel:
            ctx, text_mask = ctx[:, : chipmunk.text_len], text_mask[:, : chipmunk.text_len]
            want = (cfg.num_layers - offset, b, cfg.heads, n + chipmunk.text_len, cfg.head_dim)
            if any(k is not AttnKind.DENSE for k in kinds) and cache.attn.out.shape != want:
                raise ValueError(
                    f"the attention cache is {cache.attn.out.shape} [layers, B, H, N, D], this call needs {want} "
                    "(init_mochi_cache with this config, CFG batch, grid and text_len)"
                )
        x = self.patch_embed(tokens)  # [B, N, C]
        positions = jnp.asarray(rope_positions(grid))
        if voxel:
            # Dense attention ignores token order; voxel order makes 192-token groups local (SPEC §3.2).
            x, positions = voxelize(x, grid, axis=1), voxelize(positions, grid, axis=0)
        cos, sin = rope_table(self.pos_frequencies[...], positions)  # [N, H, D/2]

        def run_kinds(kind: AttnKind) -> _Kinds:
            return _Kinds(
                kind, chipmunk.config if chipmunk else None, chipmunk.backend if chipmunk else "auto", attention_impl
            )

        def lrng(layer):
            return None if rng is None else layer_rng(rng, step, layer)

        params = _params(self.blocks)
        attn_c = cache.attn
        for a, e in kind_runs(kinds[:-1]):
            run = run_kinds(kinds[a])
            sparse = kinds[a] is not AttnKind.DENSE
            xs = (
                _slice(params, a, e),
                jnp.arange(a, e, dtype=jnp.int32),
                _slice(attn_c, a - offset, e - offset) if sparse else None,
            )

            def body(carry, xs_l, run=run):
                h, c_txt = carry
                p, layer, c = xs_l
                h, c_txt, c = block(
                    p, h, c_txt, text_mask, temb, cos, sin, c, run, lrng(layer), static_mask, cfg, False
                )
                return (h, c_txt), c

            (x, ctx), new_c = jax.lax.scan(body, (x, ctx), xs)
            if sparse:
                attn_c = _put(attn_c, new_c, a - offset)
        last = cfg.num_layers - 1
        last_kind = kinds[last]
        c_last = None if last_kind is AttnKind.DENSE else _slice(attn_c, last - offset, last - offset + 1)
        c_last = None if c_last is None else jax.tree.map(lambda v: v[0], c_last)
        x, _, c_last = block(
            _params(self.last_block),
            x,
            ctx,
            text_mask,
            temb,
            cos,
            sin,
            c_last,
            run_kinds(last_kind),
            lrng(jnp.int32(last)),
            static_mask,
            cfg,
            True,
        )
        if c_last is not None:
            attn_c = _put(attn_c, jax.tree.map(lambda v: v[None], c_last), last - offset)

        if voxel:
            x = unvoxelize(x, grid, axis=1)
        new_cache = MochiCache(attn=attn_c, hidden=None if cache.hidden is None else x.astype(cache.hidden.dtype))
        return self.unpatchify(self.head(x, temb), grid), new_cache


@functools.partial(jax.jit, static_argnames=("graphdef", "chipmunk", "attention_impl"), donate_argnames=("cache",))
def forward(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    latents: jax.Array,
    timestep: jax.Array,
    text: jax.Array,
    text_mask: jax.Array,
    cache: MochiCache | None = None,
    *,
    chipmunk: ChipmunkRun | None = None,
    rng: jax.Array | None = None,
    step: jax.Array | int = 0,
    static_mask: tuple[jax.Array, jax.Array] | None = None,
    attention_impl: str | None = None,
) -> tuple[jax.Array, MochiCache]:
    """One jitted model call on ``nnx.split(model)`` (the cache is donated).

    Arguments are those of ``MochiTransformer3D.__call__`` except ``static_mask``, given as its arrays
    ``(mask [H, G, N] bool, sparse_group [H, G] bool)`` so that it is traced rather than baked in. The text
    mask is traced here, so the ``text_len`` check of ``__call__`` cannot run: check it before the loop.
    """
    model = nnx.merge(graphdef, state)
    sm = None if static_mask is None else StaticMask(mask=static_mask[0], sparse_group=static_mask[1])
    return model(
        latents,
        timestep,
        text,
        text_mask,
        cache,
        chipmunk=chipmunk,
        rng=rng,
        step=step,
        static_mask=sm,
        attention_impl=attention_impl,
    )
