"""FLUX.1 transformer in Flax NNX with the Chipmunk sparse attention / MLP caches (SPEC §6).

Modules hold only weights. The 19 double and 38 single blocks are stored stacked (leading layer axis) and run
with ``jax.lax.scan``; the per-layer Chipmunk caches are scanned alongside. One layer index runs over the
double blocks, then the single blocks. Layers of different static kinds (``first_n_dense_layers``) are
scanned as separate contiguous runs.

Weight layouts (chosen so that nothing is transposed per step):
  linear kernels [in, out]; q/k/v projections [C, 3, H, D] (q, k, v come out as [B, H, N, D]);
  attention output projections [H, D, C]; MLP weights neuron-major w1 [F, C], w2 [F, C] (w2 = fc2.weight^T).
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from chipmunk_jax import parallel
from chipmunk_jax.attention import sparse_attention
from chipmunk_jax.cache import AttentionCache, MLPCache, init_attention_cache, init_mlp_cache
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.indices import layer_rng
from chipmunk_jax.mlp import dense_mlp, sparse_mlp
from chipmunk_jax.schedules import AttnKind, MLPKind, StepPlan, kind_runs
from models.flux.config import FluxConfig

_EPS = 1e-6


def _param(rngs: nnx.Rngs, shape, dtype, std: float) -> nnx.Param:
    return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype))


def _stacked(rngs: nnx.Rngs, layers: int, shape, dtype, std: float) -> nnx.Param:
    return _param(rngs, (layers, *shape), dtype, std)


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel [in, out]."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        self.kernel = _param(rngs, (d_in, d_out), dtype, 1.0 / math.sqrt(d_in))
        self.bias = _param(rngs, (d_out,), dtype, 0.02)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, self.kernel[...])
        return y + self.bias[...].reshape((1,) * (y.ndim - 1) + (-1,))


class MLPEmbedder(nnx.Module):
    """out_layer(silu(in_layer(x))): timestep, guidance and pooled-text embeddings."""

    def __init__(self, d_in: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        self.in_layer = Linear(d_in, hidden, rngs=rngs, dtype=dtype)
        self.out_layer = Linear(hidden, hidden, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


class DoubleBlocks(nnx.Module):
    """All double-stream blocks, every parameter with a leading layer axis L."""

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        n, c, h, d, f = cfg.depth_double, cfg.hidden, cfg.heads, cfg.head_dim, cfg.mlp_hidden
        s_c, s_f = 1.0 / math.sqrt(c), 1.0 / math.sqrt(f)
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod_w", _stacked(rngs, n, (c, 6 * c), dtype, s_c))
            setattr(self, f"{side}_mod_b", _stacked(rngs, n, (6 * c,), dtype, 0.02))
            setattr(self, f"{side}_qkv_w", _stacked(rngs, n, (c, 3, h, d), dtype, s_c))
            setattr(self, f"{side}_qkv_b", _stacked(rngs, n, (3, h, d), dtype, 0.02))
            setattr(self, f"{side}_q_norm", nnx.Param(jnp.ones((n, d), dtype)))
            setattr(self, f"{side}_k_norm", nnx.Param(jnp.ones((n, d), dtype)))
            setattr(self, f"{side}_proj_w", _stacked(rngs, n, (h, d, c), dtype, s_c))
            setattr(self, f"{side}_proj_b", _stacked(rngs, n, (c,), dtype, 0.02))
            setattr(self, f"{side}_w1", _stacked(rngs, n, (f, c), dtype, s_c))
            setattr(self, f"{side}_b1", _stacked(rngs, n, (f,), dtype, 0.02))
            setattr(self, f"{side}_w2", _stacked(rngs, n, (f, c), dtype, s_f))
            setattr(self, f"{side}_b2", _stacked(rngs, n, (c,), dtype, 0.02))


class SingleBlocks(nnx.Module):
    """All single-stream blocks, stacked. linear1 is split into qkv + w1 (fc1), linear2 into proj + w2 (fc2)."""

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        n, c, h, d, f = cfg.depth_single, cfg.hidden, cfg.heads, cfg.head_dim, cfg.mlp_hidden
        s_c, s_f = 1.0 / math.sqrt(c), 1.0 / math.sqrt(f)
        self.mod_w = _stacked(rngs, n, (c, 3 * c), dtype, s_c)
        self.mod_b = _stacked(rngs, n, (3 * c,), dtype, 0.02)
        self.qkv_w = _stacked(rngs, n, (c, 3, h, d), dtype, s_c)
        self.qkv_b = _stacked(rngs, n, (3, h, d), dtype, 0.02)
        self.q_norm = nnx.Param(jnp.ones((n, d), dtype))
        self.k_norm = nnx.Param(jnp.ones((n, d), dtype))
        self.w1 = _stacked(rngs, n, (f, c), dtype, s_c)
        self.b1 = _stacked(rngs, n, (f,), dtype, 0.02)
        self.proj_w = _stacked(rngs, n, (h, d, c), dtype, s_c)
        self.w2 = _stacked(rngs, n, (f, c), dtype, s_f)
        # linear2's single bias: added once to the block output (the reference adds it twice, SPEC §9).
        self.b2 = _stacked(rngs, n, (c,), dtype, 0.02)


@flax.struct.dataclass
class FluxCache:
    """Everything a Flux denoising step carries from one step to the next.

    Attributes:
      double_attn: AttentionCache with leading axis depth_double over the joint sequence, or None.
      double_mlp: MLPCache with leading axis depth_double over the image tokens (image MLP), or None.
      single_attn: AttentionCache with leading axis depth_single over the joint sequence, or None.
      single_mlp: MLPCache with leading axis depth_single over the joint sequence, or None.
      hidden: [B, N_img, C] image hidden states before the final layer (step caching, SPEC §4), or None.
    """

    double_attn: AttentionCache | None = None
    double_mlp: MLPCache | None = None
    single_attn: AttentionCache | None = None
    single_mlp: MLPCache | None = None
    hidden: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class ChipmunkRun:
    """Static Chipmunk settings of one forward pass (hashable: part of a jitted step's static arguments).

    Attributes:
      config: the Chipmunk config.
      plan: the step's kinds (``schedules.step_kinds(...).steps[t]``) over ``FluxConfig.num_layers`` layers.
      backend: operator backend ('auto', 'reference', 'xla', 'mosaic_gpu').
    """

    config: ChipmunkConfig
    plan: StepPlan
    backend: str = "auto"


def init_flux_cache(
    cfg: FluxConfig,
    chipmunk: ChipmunkConfig | None,
    *,
    batch: int,
    txt_len: int,
    img_len: int,
    dtype=jnp.bfloat16,
    step_caching: bool | None = None,
) -> FluxCache:
    """Allocates the (zero) cache of a generation: sparse caches for enabled features, hidden for step caching."""
    n = txt_len + img_len
    kw = dict(dtype=dtype, batch=batch)
    attn_on = chipmunk is not None and chipmunk.attn.is_enabled
    mlp_on = chipmunk is not None and chipmunk.mlp.is_enabled
    if step_caching is None:
        step_caching = chipmunk is not None and chipmunk.step_caching.is_enabled

    def attn(layers):
        if not attn_on or layers == 0:
            return None
        return init_attention_cache(
            chipmunk.attn, heads=cfg.heads, seq_len=n, head_dim=cfg.head_dim, num_layers=layers, **kw
        )

    def mlp(layers, seq):
        if not mlp_on or layers == 0:
            return None
        return init_mlp_cache(
            chipmunk.mlp, seq_len=seq, width=cfg.hidden, hidden=cfg.mlp_hidden, num_layers=layers, **kw
        )

    return FluxCache(
        double_attn=attn(cfg.depth_double),
        double_mlp=mlp(cfg.depth_double, img_len),
        single_attn=attn(cfg.depth_single),
        single_mlp=mlp(cfg.depth_single, n),
        hidden=jnp.zeros((batch, img_len, cfg.hidden), dtype) if step_caching else None,
    )


# ---------------------------------------------------------------------------------------------------------
# Functional pieces (shared by the blocks and the tests).


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding [cos, sin] of t [B] (already scaled by 1000) -> [B, dim] float32."""
    half = dim // 2
    # Constant frequencies from numpy, float32 exponent as the PyTorch original, exp correctly rounded: XLA's
    # float32 exp can be an ulp off, which t * 1000 turns into visible output differences.
    expo = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = jnp.asarray(np.exp(expo.astype(np.float64)).astype(np.float32))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def position_ids(txt_len: int, h: int, w: int) -> np.ndarray:
    """Flux position ids [txt_len + h*w, 3]: zeros for text, (0, row, col) for raster image tokens."""
    img = np.zeros((h, w, 3), np.float64)
    img[..., 1] = np.arange(h)[:, None]
    img[..., 2] = np.arange(w)[None, :]
    return np.concatenate([np.zeros((txt_len, 3)), img.reshape(h * w, 3)], axis=0)


def rope_table(ids: np.ndarray, axes_dim: tuple[int, ...], theta: int) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [N, D/2] float32 for position ids [N, n_axes]; computed in float64 with numpy (static)."""
    angles = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        angles.append(ids[:, i : i + 1].astype(np.float64) * omega[None, :])
    a = np.concatenate(angles, axis=-1)
    return jnp.asarray(np.cos(a), jnp.float32), jnp.asarray(np.sin(a), jnp.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (x[2j], x[2j+1]) of x [B, H, N, D] by the angles of cos/sin [N, D/2]."""
    b, h, n, d = x.shape
    xr = x.astype(jnp.float32).reshape(b, h, n, d // 2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    c, s = cos[None, None, :, :], sin[None, None, :, :]
    out = jnp.stack([c * x0 - s * x1, s * x0 + c * x1], axis=-1)
    return out.reshape(b, h, n, d).astype(x.dtype)


def layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm without affine parameters (eps 1e-6), computed in float32."""
    xf = x.astype(jnp.float32)
    mu = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mu).mean(-1, keepdims=True)
    return ((xf - mu) * jax.lax.rsqrt(var + _EPS)).astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    """RMSNorm over the last axis (eps 1e-6) with a learned scale [D]."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + _EPS)
    return y.astype(x.dtype) * scale.astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """LN(x) * (1 + scale) + shift with per-sample [B, C] modulation on x [B, N, C]."""
    return layer_norm(x) * (1 + scale[:, None, :]) + shift[:, None, :]


def _qkv(x: jax.Array, w: jax.Array, b: jax.Array, qn: jax.Array, kn: jax.Array):
    qkv = jnp.einsum("bnc,cthd->tbhnd", x, w) + b[:, None, :, None, :]  # [3, B, H, N, D]
    return rms_norm(qkv[0], qn), rms_norm(qkv[1], kn), qkv[2]


def _mod(vec: jax.Array, w: jax.Array, b: jax.Array, n: int) -> list[jax.Array]:
    m = jnp.einsum("bc,co->bo", jax.nn.silu(vec), w) + b[None, :]
    return jnp.split(m, n, axis=-1)


@dataclasses.dataclass(frozen=True)
class _Kinds:
    """Static per-run settings of the block functions."""

    attn: AttnKind
    mlp: MLPKind
    chipmunk: ChipmunkConfig | None
    backend: str
    attention_impl: str | None
    mesh: Mesh | None = None


def _attention(q, k, v, cache, kinds: _Kinds, rng):
    def attend(q, k, v, cache, rng, static_mask):
        if kinds.attn is AttnKind.DENSE:
            o = jax.nn.dot_product_attention(
                jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), implementation=kinds.attention_impl
            )  # [B, N, H, D]
            return jnp.swapaxes(o, 1, 2), cache
        return sparse_attention(q, k, v, cache, kind=kinds.attn, config=kinds.chipmunk, backend=kinds.backend, rng=rng)

    if kinds.mesh is None:
        return attend(q, k, v, cache, rng, None)
    return parallel.ulysses_attention(attend, q, k, v, cache, mesh=kinds.mesh, rng=rng)


def _mlp(x, w1, b1, w2, b2, cache, kinds: _Kinds, rng):
    if kinds.mlp is MLPKind.DENSE:
        return dense_mlp(x, w1, b1, w2, b2).astype(x.dtype), cache
    return sparse_mlp(x, w1, b1, w2, b2, cache, kind=kinds.mlp, config=kinds.chipmunk, backend=kinds.backend, rng=rng)


def double_block(p: dict, img, txt, vec, cos, sin, attn_cache, mlp_cache, kinds: _Kinds, rng):
    """One double-stream block on img [B, Ni, C], txt [B, Nt, C]; p holds one layer's arrays."""
    nt = txt.shape[1]
    i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = _mod(vec, p["img_mod_w"], p["img_mod_b"], 6)
    t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = _mod(vec, p["txt_mod_w"], p["txt_mod_b"], 6)
    iq, ik, iv = _qkv(modulate(img, i_sh1, i_sc1), p["img_qkv_w"], p["img_qkv_b"], p["img_q_norm"], p["img_k_norm"])
    tq, tk, tv = _qkv(modulate(txt, t_sh1, t_sc1), p["txt_qkv_w"], p["txt_qkv_b"], p["txt_q_norm"], p["txt_k_norm"])
    q = apply_rope(jnp.concatenate([tq, iq], axis=2), cos, sin)  # [B, H, Nt + Ni, D]
    k = apply_rope(jnp.concatenate([tk, ik], axis=2), cos, sin)
    v = jnp.concatenate([tv, iv], axis=2)
    a_rng, m_rng = (None, None) if rng is None else (jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1))
    o, attn_cache = _attention(q, k, v, attn_cache, kinds, a_rng)
    o = o.astype(img.dtype)
    t_o = jnp.einsum("bhnd,hdc->bnc", o[:, :, :nt], p["txt_proj_w"]) + p["txt_proj_b"][None, None, :]
    i_o = jnp.einsum("bhnd,hdc->bnc", o[:, :, nt:], p["img_proj_w"]) + p["img_proj_b"][None, None, :]
    img = img + i_g1[:, None, :] * i_o
    txt = txt + t_g1[:, None, :] * t_o
    i_m, mlp_cache = _mlp(
        modulate(img, i_sh2, i_sc2), p["img_w1"], p["img_b1"], p["img_w2"], p["img_b2"], mlp_cache, kinds, m_rng
    )
    img = img + i_g2[:, None, :] * i_m
    t_m = dense_mlp(modulate(txt, t_sh2, t_sc2), p["txt_w1"], p["txt_b1"], p["txt_w2"], p["txt_b2"])
    txt = txt + t_g2[:, None, :] * t_m.astype(txt.dtype)
    return img, txt, attn_cache, mlp_cache


def single_block(p: dict, x, vec, cos, sin, attn_cache, mlp_cache, kinds: _Kinds, rng):
    """One single-stream block on the joint sequence x [B, Nt + Ni, C]."""
    sh, sc, g = _mod(vec, p["mod_w"], p["mod_b"], 3)
    xn = modulate(x, sh, sc)
    q, k, v = _qkv(xn, p["qkv_w"], p["qkv_b"], p["q_norm"], p["k_norm"])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a_rng, m_rng = (None, None) if rng is None else (jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1))
    o, attn_cache = _attention(q, k, v, attn_cache, kinds, a_rng)
    a = jnp.einsum("bhnd,hdc->bnc", o.astype(x.dtype), p["proj_w"])
    m, mlp_cache = _mlp(xn, p["w1"], p["b1"], p["w2"], p["b2"], mlp_cache, kinds, m_rng)
    return x + g[:, None, :] * (a + m.astype(x.dtype)), attn_cache, mlp_cache


def _slice(tree, a: int, b: int):
    return jax.tree.map(lambda x: x[a:b], tree)


def _put(tree, new, a: int):
    if tree is None:
        return None
    return jax.tree.map(lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), a, axis=0), tree, new)


def _needs(kind_attn: AttnKind, kind_mlp: MLPKind) -> tuple[bool, bool]:
    return kind_attn is not AttnKind.DENSE, kind_mlp is not MLPKind.DENSE


class Flux(nnx.Module):
    """The FLUX.1 transformer (dev with guidance embedding, schnell without).

    Call with packed image tokens img [B, Ni, in_channels], T5 tokens txt [B, Nt, context_dim], pooled CLIP
    y [B, vec_dim], timesteps t [B] in [0, 1] (sigma; scaled by 1000 inside, as diffusers), guidance [B]
    (dev) and the RoPE table (cos, sin) of the joint [txt; img] sequence from ``rope_table``.
    """

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        self.cfg = cfg
        c = cfg.hidden
        self.img_in = Linear(cfg.in_channels, c, rngs=rngs, dtype=dtype)
        self.txt_in = Linear(cfg.context_dim, c, rngs=rngs, dtype=dtype)
        self.time_in = MLPEmbedder(256, c, rngs=rngs, dtype=dtype)
        self.vector_in = MLPEmbedder(cfg.vec_dim, c, rngs=rngs, dtype=dtype)
        self.guidance_in = MLPEmbedder(256, c, rngs=rngs, dtype=dtype) if cfg.guidance_embed else None
        self.double = DoubleBlocks(cfg, rngs=rngs, dtype=dtype)
        self.single = SingleBlocks(cfg, rngs=rngs, dtype=dtype)
        # Final adaLN modulation emits [scale, shift] (diffusers order; BFL checkpoints are swapped on conversion).
        self.final_mod = Linear(c, 2 * c, rngs=rngs, dtype=dtype)
        self.final_linear = Linear(c, cfg.out_channels, rngs=rngs, dtype=dtype)

    @property
    def dtype(self):
        return self.img_in.kernel[...].dtype

    def embed_vec(self, y: jax.Array, t: jax.Array, guidance: jax.Array | None) -> jax.Array:
        """The conditioning vector [B, C] from pooled text, timestep (sigma) and guidance."""
        dt = self.dtype
        vec = self.time_in(timestep_embedding(t.astype(jnp.float32) * 1000.0).astype(dt))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this Flux model has a guidance embedding (dev); pass guidance [B]")
            vec = vec + self.guidance_in(timestep_embedding(guidance.astype(jnp.float32) * 1000.0).astype(dt))
        return vec + self.vector_in(y.astype(dt))

    def final_layer(self, hidden: jax.Array, vec: jax.Array) -> jax.Array:
        """The final adaLN + linear on image hidden states [B, Ni, C] -> [B, Ni, out_channels]."""
        scale, shift = jnp.split(self.final_mod(jax.nn.silu(vec)), 2, axis=-1)
        return self.final_linear(modulate(hidden, shift, scale))

    def __call__(
        self,
        img: jax.Array,
        txt: jax.Array,
        y: jax.Array,
        t: jax.Array,
        guidance: jax.Array | None,
        rope: tuple[jax.Array, jax.Array],
        cache: FluxCache | None = None,
        *,
        chipmunk: ChipmunkRun | None = None,
        rng: jax.Array | None = None,
        step: jax.Array | int = 0,
        attention_impl: str | None = None,
        mesh: Mesh | None = None,
    ) -> tuple[jax.Array, FluxCache | None]:
        """Runs the transformer.

        Args:
          img: [B, Ni, in_channels] packed latent tokens (any token order matching ``rope``).
          txt: [B, Nt, context_dim] T5 embeddings.
          y: [B, vec_dim] pooled CLIP embedding.
          t: [B] sigma in [0, 1].
          guidance: [B] embedded guidance scale (dev), or None (schnell).
          rope: (cos, sin) [Nt + Ni, head_dim / 2] for the joint sequence.
          cache: the FluxCache from ``init_flux_cache`` (needed when ``chipmunk`` sparsifies anything or when
            ``cache.hidden`` should record the pre-final-layer hidden states).
          chipmunk: static Chipmunk settings of this step, or None for the plain dense model.
          rng: generation key; each (step, layer) gets ``indices.layer_rng(rng, step, layer)``.
          step: the denoising step index (for the per-layer rng).
          attention_impl: ``implementation`` of jax.nn.dot_product_attention for dense attention.
          mesh: a ``parallel.make_mesh`` mesh: batch split over 'cfg', tokens over 'sp' with Ulysses attention
            (heads and Nt + Ni divisible by sp). The cache should be placed with ``parallel.place_cache``.
            Cache fields chosen by ``chipmunk.config.offloading`` are moved between host and device per layer.

        Returns:
          (prediction [B, Ni, out_channels], new cache or None).
        """
        cfg = self.cfg
        b, ni, _ = img.shape
        nt = txt.shape[1]
        cos, sin = rope
        if cos.shape != (nt + ni, cfg.head_dim // 2):
            raise ValueError(f"rope table {cos.shape} does not match {nt}+{ni} tokens, head_dim {cfg.head_dim}")
        if mesh is not None:
            parallel.check_attention_shapes(mesh, b, cfg.heads, nt + ni)
        offload = parallel.offloaded_fields(chipmunk.config.offloading) if chipmunk is not None else frozenset()
        tokens = lambda tree: jax.tree.map(lambda a: parallel.constrain_tokens(a, mesh), tree)
        dt = self.dtype
        vec = self.embed_vec(y, t, guidance)
        img = tokens(self.img_in(img.astype(dt)))
        txt = tokens(self.txt_in(txt.astype(dt)))

        plan = chipmunk.plan if chipmunk is not None else None
        if plan is not None and (len(plan.attn) != cfg.num_layers or plan.skip):
            raise ValueError(f"plan has {len(plan.attn)} layers (skip={plan.skip}); the model has {cfg.num_layers}")
        cache = cache if cache is not None else FluxCache()

        def kinds_of(layer0: int, n: int) -> list[tuple[AttnKind, MLPKind]]:
            if plan is None:
                return [(AttnKind.DENSE, MLPKind.DENSE)] * n
            return [(plan.attn[layer0 + i], plan.mlp[layer0 + i]) for i in range(n)]

        def make_kinds(ka, km):
            return _Kinds(
                ka,
                km,
                chipmunk.config if chipmunk else None,
                chipmunk.backend if chipmunk else "auto",
                attention_impl,
                mesh,
            )

        def scan_runs(stack, n_layers, layer0, carry, attn_c, mlp_c, block):
            params = {k: v[...] for k, v in vars(stack).items() if isinstance(v, nnx.Param)}
            for a, e in kind_runs(kinds_of(layer0, n_layers)):
                ka, km = kinds_of(layer0, n_layers)[a]
                need_a, need_m = _needs(ka, km)
                if need_a and attn_c is None or need_m and mlp_c is None:
                    raise ValueError("a sparse step needs the Chipmunk cache from init_flux_cache")
                kinds = make_kinds(ka, km)
                xs = (
                    _slice(params, a, e),
                    jnp.arange(layer0 + a, layer0 + e, dtype=jnp.int32),
                    _slice(attn_c, a, e) if need_a else None,
                    _slice(mlp_c, a, e) if need_m else None,
                )

                def body(carry, x, kinds=kinds):
                    p, layer, ac, mc = x
                    lrng = None if rng is None else layer_rng(rng, step, layer)
                    ac, mc = parallel.fetch(ac, offload), parallel.fetch(mc, offload)
                    carry, ac, mc = block(p, carry, ac, mc, kinds, lrng)
                    return tokens(carry), (parallel.stash(ac, offload), parallel.stash(mc, offload))

                carry, (ac, mc) = jax.lax.scan(body, carry, xs)
                if need_a:
                    attn_c = _put(attn_c, ac, a)
                if need_m:
                    mlp_c = _put(mlp_c, mc, a)
            return carry, attn_c, mlp_c

        def dbl(p, carry, ac, mc, kinds, lrng):
            i, tx = carry
            i, tx, ac, mc = double_block(p, i, tx, vec, cos, sin, ac, mc, kinds, lrng)
            return (i, tx), ac, mc

        def sgl(p, x, ac, mc, kinds, lrng):
            return single_block(p, x, vec, cos, sin, ac, mc, kinds, lrng)

        (img, txt), d_attn, d_mlp = scan_runs(
            self.double, cfg.depth_double, 0, (img, txt), cache.double_attn, cache.double_mlp, dbl
        )
        x = tokens(jnp.concatenate([txt, img], axis=1))
        x, s_attn, s_mlp = scan_runs(
            self.single, cfg.depth_single, cfg.depth_double, x, cache.single_attn, cache.single_mlp, sgl
        )
        hidden = x[:, nt:]
        new_cache = FluxCache(
            double_attn=d_attn,
            double_mlp=d_mlp,
            single_attn=s_attn,
            single_mlp=s_mlp,
            hidden=None if cache.hidden is None else hidden.astype(cache.hidden.dtype),
        )
        new_cache = parallel.constrain_cache(new_cache, mesh=mesh, offload=offload)
        return tokens(self.final_layer(hidden, vec)), new_cache
