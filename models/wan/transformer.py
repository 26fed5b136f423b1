"""Wan2.1 transformer (diffusers ``WanTransformer3DModel``) in Flax NNX with Chipmunk sparse self-attention.

Modules hold only weights. The blocks are stored stacked (leading layer axis) and run with ``jax.lax.scan``;
the per-layer Chipmunk AttentionCache is scanned alongside. Only the self-attention is sparsified (SPEC §6);
cross-attention and the FFN are dense. With Chipmunk on, the video tokens and their RoPE table are put in
voxel order (SPEC §3.2) before the blocks and restored before the output head; text never enters the
self-attention sequence, so the static mask has no text columns.

Weight layouts (nothing is transposed per step):
  linear kernels [in, out]; self-attention q/k/v fused [C, 3, C] (RMS q/k norms act on the full inner dim
  before the head split); cross-attention k/v fused [C, 2, C]; FFN neuron-major w1 [F, C], w2 [F, C]
  (w2 = fc2.weight^T, the Chipmunk MLP layout); patch embedding [pt*ph*pw*C_in, C] over channels-last patches
  flattened in (pt, ph, pw, c) order; output projection [C, pt*ph*pw*C_out] in the same order.
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
from jax.sharding import Mesh

from chipmunk_jax import parallel
from chipmunk_jax.attention import sparse_attention
from chipmunk_jax.cache import AttentionCache
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.indices import StaticMask, layer_rng
from chipmunk_jax.mlp import dense_mlp
from chipmunk_jax.reorder import unvoxelize, voxelize
from chipmunk_jax.schedules import AttnKind, StepPlan, kind_runs
from models.video import init_video_cache, sparse_layer_count, video_static_mask
from models.wan.config import WanConfig

# The image embedder's LayerNorms use torch's default epsilon (diffusers FP32LayerNorm default).
_IMAGE_NORM_EPS = 1e-5


def _normal(rngs: nnx.Rngs, shape, dtype, std: float) -> nnx.Param:
    return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype))


def _ones(shape, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype))


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel [in, out]."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        self.kernel = _normal(rngs, (d_in, d_out), dtype, 1.0 / math.sqrt(d_in))
        self.bias = _normal(rngs, (d_out,), dtype, 0.02)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x.astype(self.kernel.dtype), self.kernel[...])
        return y + self.bias[...].reshape((1,) * (y.ndim - 1) + (-1,))


class LayerNorm(nnx.Module):
    """Affine LayerNorm (computed in float32, output in the input dtype)."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.bfloat16):
        self.eps = eps
        self.scale = _ones((dim,), dtype)
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.eps, self.scale[...], self.bias[...])


class TwoLayerMLP(nnx.Module):
    """linear_2(act(linear_1(x))): the time embedder (SiLU) and the text embedder (tanh-GELU)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        self.linear_1 = Linear(d_in, d_hidden, rngs=rngs, dtype=dtype)
        self.linear_2 = Linear(d_hidden, d_out, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, act) -> jax.Array:
        return self.linear_2(act(self.linear_1(x)))


class ImageEmbedding(nnx.Module):
    """I2V: CLIP image tokens -> LayerNorm -> Linear -> GELU (exact) -> Linear -> LayerNorm."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        self.norm1 = LayerNorm(d_in, _IMAGE_NORM_EPS, dtype=dtype)
        self.mlp = TwoLayerMLP(d_in, d_in, d_out, rngs=rngs, dtype=dtype)
        self.norm2 = LayerNorm(d_out, _IMAGE_NORM_EPS, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm2(self.mlp(self.norm1(x), lambda h: jax.nn.gelu(h, approximate=False)))


class WanBlocks(nnx.Module):
    """All transformer blocks, every parameter with a leading layer axis L.

    Attributes (per layer): self-attention ``sa_*``, cross-attention ``ca_*`` (``ca_img_*`` for I2V image
    tokens), ``norm2_*`` (cross-attention LayerNorm), FFN ``ffn_*``, and ``modulation`` [6, C], the learned
    table added to the timestep projection (shift, scale, gate of the self-attention, then of the FFN).
    """

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        n, c, f = cfg.num_layers, cfg.dim, cfg.ffn_dim
        s_c, s_f = 1.0 / math.sqrt(c), 1.0 / math.sqrt(f)
        self.sa_qkv_w = _normal(rngs, (n, c, 3, c), dtype, s_c)
        self.sa_qkv_b = _normal(rngs, (n, 3, c), dtype, 0.02)
        self.sa_norm_q = _ones((n, c), dtype)
        self.sa_norm_k = _ones((n, c), dtype)
        self.sa_out_w = _normal(rngs, (n, c, c), dtype, s_c)
        self.sa_out_b = _normal(rngs, (n, c), dtype, 0.02)
        self.ca_q_w = _normal(rngs, (n, c, c), dtype, s_c)
        self.ca_q_b = _normal(rngs, (n, c), dtype, 0.02)
        self.ca_kv_w = _normal(rngs, (n, c, 2, c), dtype, s_c)
        self.ca_kv_b = _normal(rngs, (n, 2, c), dtype, 0.02)
        self.ca_norm_q = _ones((n, c), dtype)
        self.ca_norm_k = _ones((n, c), dtype)
        self.ca_out_w = _normal(rngs, (n, c, c), dtype, s_c)
        self.ca_out_b = _normal(rngs, (n, c), dtype, 0.02)
        if cfg.is_i2v:
            self.ca_img_kv_w = _normal(rngs, (n, c, 2, c), dtype, s_c)
            self.ca_img_kv_b = _normal(rngs, (n, 2, c), dtype, 0.02)
            self.ca_norm_img_k = _ones((n, c), dtype)
        if cfg.cross_attn_norm:
            self.norm2_scale = _ones((n, c), dtype)
            self.norm2_bias = nnx.Param(jnp.zeros((n, c), dtype))
        self.ffn_w1 = _normal(rngs, (n, f, c), dtype, s_c)
        self.ffn_b1 = _normal(rngs, (n, f), dtype, 0.02)
        self.ffn_w2 = _normal(rngs, (n, f, c), dtype, s_f)
        self.ffn_b2 = _normal(rngs, (n, c), dtype, 0.02)
        self.modulation = _normal(rngs, (n, 6, c), dtype, s_c)


@flax.struct.dataclass
class WanCache:
    """Everything a Wan denoising step carries to the next.

    Attributes:
      attn: AttentionCache of the sparsified layers [first_n_dense_layers, num_layers) with that many entries
        on a leading layer axis, over the video tokens in voxel order (batch includes the CFG branches), or None.
      hidden: [B, N, C] hidden states before the output head, raster token order (step caching), or None.
    """

    attn: AttentionCache | None = None
    hidden: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class ChipmunkRun:
    """Static Chipmunk settings of one forward pass (hashable: part of a jitted step's static arguments).

    Attributes:
      config: the Chipmunk config (only ``attn`` is used: Wan sparsifies self-attention only).
      plan: the step's kinds (``schedules.step_kinds(config, steps, WanConfig.num_layers).steps[t]``).
      backend: operator backend ('auto', 'reference', 'xla', 'mosaic_gpu').
    """

    config: ChipmunkConfig
    plan: StepPlan
    backend: str = "auto"


def post_patch_grid(cfg: WanConfig, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The (t, h, w) token grid of latents with ``frames`` x ``height`` x ``width`` (divisible by the patch)."""
    pt, ph, pw = cfg.patch_size
    if frames % pt or height % ph or width % pw:
        raise ValueError(f"latent size {(frames, height, width)} is not divisible by the patch {cfg.patch_size}")
    grid = (frames // pt, height // ph, width // pw)
    if max(grid) > cfg.rope_max_seq_len:
        raise ValueError(f"token grid {grid} exceeds the RoPE table length {cfg.rope_max_seq_len}")
    return grid


def sparse_layers(cfg: WanConfig, chipmunk: ChipmunkConfig | None) -> int:
    """Layers that keep a Chipmunk attention cache (0 when sparse attention is off)."""
    return sparse_layer_count(cfg.num_layers, chipmunk)


def init_wan_cache(
    cfg: WanConfig,
    chipmunk: ChipmunkConfig | None,
    *,
    batch: int,
    grid: tuple[int, int, int],
    dtype=jnp.bfloat16,
    step_caching: bool | None = None,
) -> WanCache:
    """Allocates the (zero) cache of a generation.

    Args:
      cfg: the architecture.
      chipmunk: the Chipmunk config, or None (dense model).
      batch: batch of one model call, CFG branches included (2B with CFG: cond then uncond).
      grid: post-patch token grid (t, h, w) (``post_patch_grid``).
      dtype: dtype of the attention output cache and of the step-caching hidden states.
      step_caching: keep the pre-head hidden states; defaults to ``chipmunk.step_caching.is_enabled``.
    """
    return init_video_cache(
        WanCache,
        chipmunk,
        num_layers=cfg.num_layers,
        heads=cfg.heads,
        head_dim=cfg.head_dim,
        width=cfg.dim,
        batch=batch,
        grid=grid,
        dtype=dtype,
        step_caching=step_caching,
    )


def wan_static_mask(
    cfg: WanConfig, chipmunk: ChipmunkConfig, grid: tuple[int, int, int], rng: jax.Array | None
) -> StaticMask:
    """The static part of the compressed key mask for this video grid and head count (SPEC §1.3).

    Text is not in the self-attention sequence, so the mask has no text columns (text_len = 0).
    """
    return video_static_mask(cfg.heads, chipmunk, grid, 0, rng)


# ---------------------------------------------------------------------------------------------------------
# Functional pieces.


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding [cos, sin] of t [B] (0..1000) -> [B, dim] float32 (diffusers flip_sin_to_cos)."""
    half = dim // 2
    # Frequencies as float32 exponents through a correctly rounded exp: XLA's float32 exp can be an ulp off,
    # which t ~ 1000 magnifies into visible differences from PyTorch.
    expo = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = jnp.asarray(np.exp(expo.astype(np.float64)).astype(np.float32))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_table(cfg: WanConfig, grid: tuple[int, int, int]) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [t*h*w, head_dim / 2] float32 for raster-ordered tokens of ``grid``.

    Pair j of the head dim rotates by pos_axis * theta^(-2k/d_axis) where the pairs are split over the
    (t, h, w) axes as ``cfg.rope_dims``; computed in float64 like diffusers' WanRotaryPosEmbed.
    """
    angles = []
    for axis, (size, d) in enumerate(zip(grid, cfg.rope_dims, strict=True)):
        omega = 1.0 / cfg.theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
        a = np.arange(size, dtype=np.float64)[:, None] * omega[None, :]  # [size, d/2]
        shape = [1, 1, 1, d // 2]
        shape[axis] = size
        angles.append(np.broadcast_to(a.reshape(shape), (*grid, d // 2)))
    a = np.concatenate(angles, axis=-1).reshape(math.prod(grid), cfg.head_dim // 2)
    return jnp.asarray(np.cos(a), jnp.float32), jnp.asarray(np.sin(a), jnp.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (x[2j], x[2j+1]) of x [B, N, H, D] by the angles of cos/sin [N, D/2]."""
    b, n, h, d = x.shape
    xr = x.astype(jnp.float32).reshape(b, n, h, d // 2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.stack([c * x0 - s * x1, s * x0 + c * x1], axis=-1).reshape(b, n, h, d).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float, scale: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
    """LayerNorm over the last axis in float32 (optionally affine); output in x.dtype."""
    xf = x.astype(jnp.float32)
    mu = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mu).mean(-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        bshape = (1,) * (x.ndim - 1) + (-1,)
        y = y * scale.astype(jnp.float32).reshape(bshape) + bias.astype(jnp.float32).reshape(bshape)
    return y.astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis with a learned scale, in float32; output in x.dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))).astype(x.dtype)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """LN(x) * (1 + scale) + shift in float32 with [B, C] float32 modulation; output in x.dtype."""
    y = layer_norm(x.astype(jnp.float32), eps) * (1.0 + scale[:, None, :]) + shift[:, None, :]
    return y.astype(x.dtype)


def _gated(x: jax.Array, y: jax.Array, gate: jax.Array) -> jax.Array:
    return (x.astype(jnp.float32) + y.astype(jnp.float32) * gate[:, None, :]).astype(x.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None) -> jax.Array:
    """Dense attention on [B, N, H, D] queries and [B, M, H, D] keys/values -> [B, N, H, D]."""
    # jax.nn.dot_product_attention mixes bf16 and f32 internally, which strict promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


@dataclasses.dataclass(frozen=True)
class _Kinds:
    """Static per-run settings of the block function."""

    attn: AttnKind
    chipmunk: ChipmunkConfig | None
    backend: str
    attention_impl: str | None
    mesh: Mesh | None = None


def _heads(x: jax.Array, h: int) -> jax.Array:
    b, n, c = x.shape
    return x.reshape(b, n, h, c // h)


def self_attention(p: dict, x, cos, sin, cache, kinds: _Kinds, rng, static_mask, heads: int, eps: float):
    """Self-attention of one block on x [B, N, C] (tokens in the order of cos/sin); returns (out, cache)."""
    qkv = jnp.einsum("bnc,ctk->tbnk", x, p["sa_qkv_w"]) + p["sa_qkv_b"][:, None, None, :]  # [3, B, N, C]
    q = apply_rope(_heads(rms_norm(qkv[0], p["sa_norm_q"], eps), heads), cos, sin)  # [B, N, H, D]
    k = apply_rope(_heads(rms_norm(qkv[1], p["sa_norm_k"], eps), heads), cos, sin)
    v = _heads(qkv[2], heads)
    t = lambda a: jnp.swapaxes(a, 1, 2)  # [B, N, H, D] <-> [B, H, N, D], the Chipmunk operator layout

    def attend(q, k, v, cache, rng, static_mask):  # on [B, H, N, D]
        if kinds.attn is AttnKind.DENSE:
            return t(dot_product_attention(t(q), t(k), t(v), kinds.attention_impl)), cache
        return sparse_attention(
            q,
            k,
            v,
            cache,
            kind=kinds.attn,
            config=kinds.chipmunk,
            backend=kinds.backend,
            rng=rng,
            static_mask=static_mask,
        )

    if kinds.mesh is not None:
        o, cache = parallel.ulysses_attention(
            attend, t(q), t(k), t(v), cache, mesh=kinds.mesh, rng=rng, static_mask=static_mask
        )
        o = t(o)
    elif kinds.attn is AttnKind.DENSE:
        o = dot_product_attention(q, k, v, kinds.attention_impl)
    else:
        o, cache = attend(t(q), t(k), t(v), cache, rng, static_mask)
        o = t(o)
    b, n, h, d = o.shape
    o = o.astype(x.dtype).reshape(b, n, h * d)
    return jnp.einsum("bnk,kc->bnc", o, p["sa_out_w"]) + p["sa_out_b"][None, None, :], cache


def cross_attention(p: dict, x, ctx, img_ctx, heads: int, eps: float, attention_impl):
    """Dense cross-attention of x [B, N, C] to text tokens ctx [B, L, C] (+ I2V image tokens [B, Li, C])."""
    q = _heads(
        rms_norm(jnp.einsum("bnc,ck->bnk", x, p["ca_q_w"]) + p["ca_q_b"][None, None, :], p["ca_norm_q"], eps), heads
    )
    kv = jnp.einsum("blc,ctk->tblk", ctx, p["ca_kv_w"]) + p["ca_kv_b"][:, None, None, :]  # [2, B, L, C]
    k = _heads(rms_norm(kv[0], p["ca_norm_k"], eps), heads)
    o = dot_product_attention(q, k, _heads(kv[1], heads), attention_impl)
    if img_ctx is not None:
        ikv = jnp.einsum("blc,ctk->tblk", img_ctx, p["ca_img_kv_w"]) + p["ca_img_kv_b"][:, None, None, :]
        ik = _heads(rms_norm(ikv[0], p["ca_norm_img_k"], eps), heads)
        o = o + dot_product_attention(q, ik, _heads(ikv[1], heads), attention_impl)
    b, n, h, d = o.shape
    o = o.astype(x.dtype).reshape(b, n, h * d)
    return jnp.einsum("bnk,kc->bnc", o, p["ca_out_w"]) + p["ca_out_b"][None, None, :]


def block(p: dict, x, ctx, img_ctx, tproj, cos, sin, cache, kinds: _Kinds, rng, static_mask, cfg: WanConfig):
    """One WanTransformerBlock on x [B, N, C]; tproj [B, 6, C] float32 is the timestep projection."""
    mod = p["modulation"].astype(jnp.float32)[None] + tproj  # [B, 6, C]
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, i] for i in range(6))
    a, cache = self_attention(
        p, _modulate(x, shift1, scale1, cfg.eps), cos, sin, cache, kinds, rng, static_mask, cfg.heads, cfg.eps
    )
    x = _gated(x, a, gate1)
    if cfg.cross_attn_norm:
        xn = layer_norm(x, cfg.eps, p["norm2_scale"], p["norm2_bias"])
    else:
        xn = x
    x = x + cross_attention(p, xn, ctx, img_ctx, cfg.heads, cfg.eps, kinds.attention_impl).astype(x.dtype)
    m = dense_mlp(_modulate(x, shift2, scale2, cfg.eps), p["ffn_w1"], p["ffn_b1"], p["ffn_w2"], p["ffn_b2"])
    return _gated(x, m, gate2), cache


def _slice(tree, a: int, b: int):
    return jax.tree.map(lambda x: x[a:b], tree)


def _put(tree, new, a: int):
    return jax.tree.map(lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), a, axis=0), tree, new)


class WanTransformer3D(nnx.Module):
    """The Wan2.1 transformer (T2V; I2V when ``cfg.image_dim`` is set).

    Call with video latents, timesteps, UMT5 text embeddings (and CLIP image tokens for I2V); see ``__call__``.
    Parameter names follow the diffusers module tree where there is one (``convert_weights.wan`` maps them).
    """

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        self.cfg = cfg
        c = cfg.dim
        self.patch_embedding = Linear(cfg.patch_volume * cfg.in_channels, c, rngs=rngs, dtype=dtype)
        self.time_embedder = TwoLayerMLP(cfg.freq_dim, c, c, rngs=rngs, dtype=dtype)
        self.time_proj = Linear(c, 6 * c, rngs=rngs, dtype=dtype)
        self.text_embedder = TwoLayerMLP(cfg.text_dim, c, c, rngs=rngs, dtype=dtype)
        self.image_embedder = ImageEmbedding(cfg.image_dim, c, rngs=rngs, dtype=dtype) if cfg.is_i2v else None
        self.blocks = WanBlocks(cfg, rngs=rngs, dtype=dtype)
        self.scale_shift_table = _normal(rngs, (2, c), dtype, 1.0 / math.sqrt(c))  # output head [shift; scale]
        self.proj_out = Linear(c, cfg.patch_volume * cfg.out_channels, rngs=rngs, dtype=dtype)

    @property
    def dtype(self):
        return self.patch_embedding.kernel[...].dtype

    def embed_time(self, timestep: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(temb [B, C], timestep projection [B, 6, C]), both float32, from timesteps [B] in [0, 1000]."""
        temb_in = timestep_embedding(timestep, self.cfg.freq_dim)
        f32 = lambda lin, x: (
            jnp.einsum("bi,io->bo", x, lin.kernel[...].astype(jnp.float32)) + lin.bias[...].astype(jnp.float32)[None, :]
        )
        # The conditioning path stays in float32 (diffusers keeps the time embedder and tables in fp32).
        temb = f32(self.time_embedder.linear_2, jax.nn.silu(f32(self.time_embedder.linear_1, temb_in)))
        tproj = f32(self.time_proj, jax.nn.silu(temb))
        return temb, tproj.reshape(-1, 6, self.cfg.dim)

    def head(self, hidden: jax.Array, temb: jax.Array) -> jax.Array:
        """Output norm + scale-shift + projection on hidden [B, N, C] -> [B, N, pt*ph*pw*C_out]."""
        mod = self.scale_shift_table[...].astype(jnp.float32)[None] + temb[:, None, :]  # [B, 2, C]
        return self.proj_out(_modulate(hidden, mod[:, 0], mod[:, 1], self.cfg.eps))

    def patchify(self, latents: jax.Array, channels_last: bool) -> tuple[jax.Array, tuple[int, int, int]]:
        """Latents [B, C, F, H, W] (or [B, F, H, W, C]) -> (patch tokens [B, N, pt*ph*pw*C] raster, grid)."""
        if latents.ndim != 5:
            raise ValueError(f"latents must be 5-D video latents, got {latents.shape=}")
        x = latents if channels_last else jnp.moveaxis(latents, 1, -1)  # [B, F, H, W, C]
        b, f, h, w, c = x.shape
        if c != self.cfg.in_channels:
            raise ValueError(f"latents have {c} channels, the model takes {self.cfg.in_channels}")
        grid = post_patch_grid(self.cfg, f, h, w)
        (gt, gh, gw), (pt, ph, pw) = grid, self.cfg.patch_size
        x = x.reshape(b, gt, pt, gh, ph, gw, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(b, gt * gh * gw, pt * ph * pw * c), grid

    def unpatchify(self, y: jax.Array, grid: tuple[int, int, int], channels_last: bool) -> jax.Array:
        """Head output [B, N, pt*ph*pw*C_out] raster -> [B, C_out, F, H, W] (or channels-last)."""
        (gt, gh, gw), (pt, ph, pw) = grid, self.cfg.patch_size
        b, c = y.shape[0], self.cfg.out_channels
        y = y.reshape(b, gt, gh, gw, pt, ph, pw, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        y = y.reshape(b, gt * pt, gh * ph, gw * pw, c)
        return y if channels_last else jnp.moveaxis(y, -1, 1)

    def final_layer(
        self, hidden: jax.Array, timestep: jax.Array, grid: tuple[int, int, int], *, channels_last: bool = False
    ) -> jax.Array:
        """Head + unpatchify on cached raster hidden states [B, N, C] (a step skipped by step caching, SPEC §4)."""
        temb, _ = self.embed_time(timestep)
        return self.unpatchify(self.head(hidden, temb), grid, channels_last)

    def __call__(
        self,
        latents: jax.Array,
        timestep: jax.Array,
        text: jax.Array,
        cache: WanCache | None = None,
        *,
        image: jax.Array | None = None,
        chipmunk: ChipmunkRun | None = None,
        rng: jax.Array | None = None,
        step: jax.Array | int = 0,
        static_mask: StaticMask | None = None,
        channels_last: bool = False,
        attention_impl: str | None = None,
        mesh: Mesh | None = None,
    ) -> tuple[jax.Array, WanCache]:
        """Runs the transformer: one model call, CFG branches batched on the batch axis.

        Args:
          latents: [B, C_in, F, H, W] video latents (diffusers layout), or [B, F, H, W, C_in] with
            ``channels_last``; F, H, W divisible by the patch size.
          timestep: [B] diffusion timesteps in [0, 1000] (as diffusers; not sigmas).
          text: [B, L, text_dim] UMT5 embeddings (padded to 512 tokens in the released pipelines).
          cache: the WanCache from ``init_wan_cache`` (needed when ``chipmunk`` sparsifies attention or when
            ``cache.hidden`` should record the pre-head hidden states).
          image: [B, L_img, image_dim] CLIP image tokens (I2V models only; 257 in the releases).
          chipmunk: static Chipmunk settings of this step, or None for the plain dense model.
          rng: generation key; each (step, layer) gets ``indices.layer_rng(rng, step, layer)``.
          step: the denoising step index (for the per-layer rng; may be traced).
          static_mask: the static mask (``wan_static_mask``) for this grid, or None for no static part.
            Under jit pass a StaticMask built from traced arrays rather than closing over a large numpy one.
          channels_last: layout of ``latents`` and of the output.
          attention_impl: ``implementation`` of jax.nn.dot_product_attention for the dense attention.
          mesh: a ``parallel.make_mesh`` mesh: batch (CFG branches) split over 'cfg', video tokens over 'sp'
            with Ulysses self-attention (heads and t*h*w divisible by sp); place the cache with
            ``parallel.place_cache``. Cache fields chosen by ``chipmunk.config.offloading`` move between host
            and device per layer.

        Returns:
          (prediction in the layout of ``latents`` with C_out channels, new cache).
        """
        cfg = self.cfg
        if (image is not None) != cfg.is_i2v:
            raise ValueError("pass image tokens exactly when the model is I2V (cfg.image_dim is set)")
        plan = chipmunk.plan if chipmunk is not None else None
        if plan is not None and (len(plan.attn) != cfg.num_layers or plan.skip):
            raise ValueError(
                f"plan has {len(plan.attn)} layers (skip={plan.skip}); the model has {cfg.num_layers} "
                "(run skipped steps through final_layer)"
            )
        kinds = list(plan.attn) if plan is not None else [AttnKind.DENSE] * cfg.num_layers
        cache = cache if cache is not None else WanCache()
        offset = cfg.num_layers - sparse_layers(cfg, chipmunk.config if chipmunk is not None else None)
        for layer, kind in enumerate(kinds):
            if kind is not AttnKind.DENSE and layer < offset:
                raise ValueError(f"layer {layer} runs {kind} but only layers >= {offset} keep a Chipmunk cache")
            if kind is not AttnKind.DENSE and cache.attn is None:
                raise ValueError("a Chipmunk attention step needs the cache from init_wan_cache")

        dt = self.dtype
        tokens, grid = self.patchify(latents.astype(dt), channels_last)
        b = tokens.shape[0]
        if timestep.shape != (b,) or text.shape[0] != b:
            raise ValueError(f"batch mismatch: latents {b}, {timestep.shape=}, {text.shape=}")
        want = (cfg.num_layers - offset, b, cfg.heads, math.prod(grid), cfg.head_dim)
        if any(k is not AttnKind.DENSE for k in kinds) and cache.attn.out.shape != want:
            raise ValueError(
                f"the attention cache is {cache.attn.out.shape} [layers, B, H, N, D], this call needs {want} "
                "(init_wan_cache with this config, CFG batch and grid)"
            )
        if mesh is not None:
            parallel.check_attention_shapes(mesh, b, cfg.heads, math.prod(grid))
        offload = parallel.offloaded_fields(chipmunk.config.offloading) if chipmunk is not None else frozenset()
        x = self.patch_embedding(tokens)  # [B, N, C]
        temb, tproj = self.embed_time(timestep)
        ctx = self.text_embedder(text.astype(dt), lambda h: jax.nn.gelu(h, approximate=True))  # [B, L, C]
        img_ctx = None if image is None else self.image_embedder(image.astype(dt))  # [B, L_img, C]
        cos, sin = rope_table(cfg, grid)
        voxel = chipmunk is not None and chipmunk.config.attn.is_enabled
        if voxel:
            # Token order is irrelevant to dense attention; voxel order makes 192-token groups local (SPEC §3.2).
            x, cos, sin = voxelize(x, grid, axis=1), voxelize(cos, grid, axis=0), voxelize(sin, grid, axis=0)
        x = parallel.constrain_tokens(x, mesh)

        params = {k: v[...] for k, v in vars(self.blocks).items() if isinstance(v, nnx.Param)}
        attn_c = cache.attn
        for a, e in kind_runs(kinds):
            kind = kinds[a]
            sparse = kind is not AttnKind.DENSE
            run = _Kinds(
                kind,
                chipmunk.config if chipmunk else None,
                chipmunk.backend if chipmunk else "auto",
                attention_impl,
                mesh,
            )
            xs = (
                _slice(params, a, e),
                jnp.arange(a, e, dtype=jnp.int32),
                _slice(attn_c, a - offset, e - offset) if sparse else None,
            )

            def body(h, xs_l, run=run):
                p, layer, c = xs_l
                lrng = None if rng is None else layer_rng(rng, step, layer)
                c = parallel.fetch(c, offload)
                h, c = block(p, h, ctx, img_ctx, tproj, cos, sin, c, run, lrng, static_mask, cfg)
                return parallel.constrain_tokens(h, mesh), parallel.stash(c, offload)

            x, new_c = jax.lax.scan(body, x, xs)
            if sparse:
                attn_c = _put(attn_c, new_c, a - offset)

        if voxel:
            x = unvoxelize(x, grid, axis=1)
        new_cache = WanCache(attn=attn_c, hidden=None if cache.hidden is None else x.astype(cache.hidden.dtype))
        new_cache = parallel.constrain_cache(new_cache, mesh=mesh, offload=offload)
        return self.unpatchify(self.head(x, temb), grid, channels_last), new_cache


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "chipmunk", "channels_last", "attention_impl", "mesh"),
    donate_argnames=("cache",),
)
def forward(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    latents: jax.Array,
    timestep: jax.Array,
    text: jax.Array,
    cache: WanCache | None = None,
    *,
    image: jax.Array | None = None,
    chipmunk: ChipmunkRun | None = None,
    rng: jax.Array | None = None,
    step: jax.Array | int = 0,
    static_mask: tuple[jax.Array, jax.Array] | None = None,
    channels_last: bool = False,
    attention_impl: str | None = None,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, WanCache]:
    """One jitted model call on ``nnx.split(model)``: the jit boundary a sampler uses (the cache is donated).

    Compiles once per distinct (graphdef, chipmunk run, shapes); the step index, rng and the static mask
    arrays are traced. Arguments are those of ``WanTransformer3D.__call__`` except ``static_mask``, given
    as its arrays ``(mask [H, G, N] bool, sparse_group [H, G] bool)`` so that it is not baked into the program.
    With ``mesh``, put the inputs and cache on it first (``parallel.place_cache``; parameters replicated).
    """
    model = nnx.merge(graphdef, state)
    sm = None if static_mask is None else StaticMask(mask=static_mask[0], sparse_group=static_mask[1])
    return model(
        latents,
        timestep,
        text,
        cache,
        image=image,
        chipmunk=chipmunk,
        rng=rng,
        step=step,
        static_mask=sm,
        channels_last=channels_last,
        attention_impl=attention_impl,
        mesh=mesh,
    )
