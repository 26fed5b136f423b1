"""HunyuanVideo transformer (diffusers ``HunyuanVideoTransformer3DModel``) in Flax NNX with Chipmunk attention.

Structure: 3-D patch embedding; conditioning vector = timestep + embedded guidance + pooled CLIP embeddings;
a token refiner over the Llama text embeddings (self-attention restricted to the valid prompt tokens);
double-stream blocks (video and text streams with their own weights, one joint attention over
[video; text]); single-stream blocks on the joint sequence; output adaLN + projection + unpatchify. The 3-D
RoPE rotates the video tokens only. Padded prompt tokens are masked out as keys of every joint attention.

Modules hold only weights. The double and single blocks reuse Flux's stacked block modules (leading layer
axis, run with ``jax.lax.scan``); one Chipmunk layer index runs over the double blocks, then the single blocks.
Only the joint self-attention is sparsified (SPEC §6). With Chipmunk on, the video tokens and their RoPE
table are put in voxel order (SPEC §3.2) and the sparse operator sees [video (voxel order); valid text]:
``text_len`` valid prompt tokens, a static int equal for every sample of the batch. The padded prompt tokens
after them are not part of the sparse sequence: their queries run dense attention over the valid keys (as in
diffusers) and they are never keys, so they cannot change the video tokens.

Weight layouts (nothing is transposed per step): linear kernels [in, out]; q/k/v projections [C, 3, H, D];
attention output projections [H, D, C]; MLP weights neuron-major w1 [F, C], w2 [F, C] (w2 = fc2.weight^T);
patch embedding [C_in*pt*ph*pw, C] over patches flattened in (c, pt, ph, pw) order (the Conv3d weight
reshaped), output projection [C, C_out*pt*ph*pw] in the same order (diffusers' unpatchify order).
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
from chipmunk_jax.mlp import dense_mlp
from chipmunk_jax.reorder import unvoxelize, voxelize
from chipmunk_jax.schedules import AttnKind, kind_runs
from models.flux.model import (
    DoubleBlocks,
    SingleBlocks,
    _mod,
    _qkv,
    _slice,
    _stacked,
    apply_rope,
    modulate,
    position_ids,
    rope_table,
    timestep_embedding,
)
from models.hunyuan_video.config import HunyuanVideoConfig
from models.video import init_video_cache, sparse_layer_count, video_static_mask
from models.wan.transformer import ChipmunkRun, Linear, TwoLayerMLP, layer_norm

# LayerNorm epsilon of the refiner's affine norms (diffusers nn.LayerNorm(eps=1e-6)).
_REFINER_EPS = 1e-6

__all__ = [
    "ChipmunkRun",
    "HunyuanCache",
    "HunyuanVideoTransformer3D",
    "forward",
    "hunyuan_static_mask",
    "init_hunyuan_cache",
    "post_patch_grid",
    "sparse_layers",
    "valid_text_length",
    "video_rope",
]


class RefinerBlocks(nnx.Module):
    """The token refiner's blocks, every parameter with a leading layer axis L.

    Per layer: affine ``norm1``/``norm2``; self-attention q/k/v ``qkv_w`` [C, 3, H, D] and output ``proj_w``
    [H, D, C]; SiLU MLP ``w1``/``w2`` neuron-major [F, C]; ``ada_w`` [C, 2C] emitting the (attention, MLP) gates.
    """

    def __init__(self, cfg: HunyuanVideoConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        n, c, h, d, f = cfg.depth_refiner, cfg.hidden, cfg.heads, cfg.head_dim, cfg.refiner_mlp_hidden
        s_c, s_f = 1.0 / math.sqrt(c), 1.0 / math.sqrt(f)
        self.norm1_scale = nnx.Param(jnp.ones((n, c), dtype))
        self.norm1_bias = nnx.Param(jnp.zeros((n, c), dtype))
        self.qkv_w = _stacked(rngs, n, (c, 3, h, d), dtype, s_c)
        self.qkv_b = _stacked(rngs, n, (3, h, d), dtype, 0.02)
        self.proj_w = _stacked(rngs, n, (h, d, c), dtype, s_c)
        self.proj_b = _stacked(rngs, n, (c,), dtype, 0.02)
        self.norm2_scale = nnx.Param(jnp.ones((n, c), dtype))
        self.norm2_bias = nnx.Param(jnp.zeros((n, c), dtype))
        self.w1 = _stacked(rngs, n, (f, c), dtype, s_c)
        self.b1 = _stacked(rngs, n, (f,), dtype, 0.02)
        self.w2 = _stacked(rngs, n, (f, c), dtype, s_f)
        self.b2 = _stacked(rngs, n, (c,), dtype, 0.02)
        self.ada_w = _stacked(rngs, n, (c, 2 * c), dtype, s_c)
        self.ada_b = _stacked(rngs, n, (2 * c,), dtype, 0.02)


def _params(stack: nnx.Module) -> dict:
    return {k: v[...] for k, v in vars(stack).items() if isinstance(v, nnx.Param)}


def _attention(q, k, v, *, mask=None, kv_len=None, implementation=None) -> jax.Array:
    """Dense attention on [B, H, N, D] queries, [B, H, M, D] keys/values -> [B, H, N, D].

    ``mask`` [B, 1, N, M] bool (True = attend) or ``kv_len`` [B] int32 (keys [0, kv_len) valid) restrict the keys.
    """
    t = lambda a: jnp.swapaxes(a, 1, 2)  # the [B, N, H, D] layout of jax.nn.dot_product_attention
    # jax.nn.dot_product_attention mixes bf16 and f32 internally, which strict promotion rejects.
    with jax.numpy_dtype_promotion("standard"):
        o = jax.nn.dot_product_attention(
            t(q), t(k), t(v), mask=mask, key_value_seq_lengths=kv_len, implementation=implementation
        )
    return t(o)


def refiner_block(p: dict, x: jax.Array, temb: jax.Array, mask: jax.Array, implementation) -> jax.Array:
    """One refiner block on the projected text x [B, L, C]; temb [B, C]; mask [B, 1, L, L] bool."""
    xn = layer_norm(x, _REFINER_EPS, p["norm1_scale"], p["norm1_bias"])
    qkv = jnp.einsum("bnc,cthd->tbhnd", xn, p["qkv_w"]) + p["qkv_b"][:, None, :, None, :]  # [3, B, H, L, D]
    o = _attention(qkv[0], qkv[1], qkv[2], mask=mask, implementation=implementation).astype(x.dtype)
    a = jnp.einsum("bhnd,hdc->bnc", o, p["proj_w"]) + p["proj_b"][None, None, :]
    g_attn, g_mlp = _mod(temb, p["ada_w"], p["ada_b"], 2)
    x = x + a * g_attn[:, None, :]
    h = jax.nn.silu(
        jnp.einsum("bnc,fc->bnf", layer_norm(x, _REFINER_EPS, p["norm2_scale"], p["norm2_bias"]), p["w1"])
        + p["b1"][None, None, :]
    )
    m = jnp.einsum("bnf,fc->bnc", h, p["w2"]) + p["b2"][None, None, :]
    return x + m * g_mlp[:, None, :]


class TokenRefiner(nnx.Module):
    """diffusers ``HunyuanVideoTokenRefiner``: Llama embeddings [B, L, text_dim] -> refined text tokens [B, L, C]."""

    def __init__(self, cfg: HunyuanVideoConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        c = cfg.hidden
        self.time_embedder = TwoLayerMLP(256, c, c, rngs=rngs, dtype=dtype)
        self.text_embedder = TwoLayerMLP(cfg.text_dim, c, c, rngs=rngs, dtype=dtype)
        self.proj_in = Linear(cfg.text_dim, c, rngs=rngs, dtype=dtype)
        self.blocks = RefinerBlocks(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, text: jax.Array, mask: jax.Array, timestep: jax.Array, implementation=None) -> jax.Array:
        """Refines text [B, L, text_dim] with its mask [B, L] bool under timestep [B] (0..1000)."""
        dt = self.proj_in.kernel[...].dtype
        m = mask.astype(jnp.float32)[:, :, None]
        # Conditioning: mean of the valid prompt embeddings (not of the padding).
        pooled = ((text.astype(jnp.float32) * m).sum(1) / m.sum(1)).astype(dt)
        temb = self.time_embedder(timestep_embedding(timestep).astype(dt), jax.nn.silu)
        temb = temb + self.text_embedder(pooled, jax.nn.silu)
        x = self.proj_in(text.astype(dt))
        seq = text.shape[1]
        # Valid queries see the valid keys; key 0 is always visible so that padded query rows are never empty.
        attn_mask = (mask[:, None, :, None] & mask[:, None, None, :]) | (jnp.arange(seq) == 0)[None, None, None, :]

        def body(h, p):
            return refiner_block(p, h, temb, attn_mask, implementation), None

        x, _ = jax.lax.scan(body, x, _params(self.blocks))
        return x


@flax.struct.dataclass
class HunyuanCache:
    """Everything a HunyuanVideo denoising step carries to the next.

    Attributes:
      attn: AttentionCache of the sparsified layers [first_n_dense_layers, num_layers) (double blocks, then
        single blocks) on a leading layer axis, over [video (voxel order); valid text], or None.
      hidden: [B, N_vid, C] video hidden states before the output head, raster order (step caching), or None.
    """

    attn: AttentionCache | None = None
    hidden: jax.Array | None = None


def post_patch_grid(cfg: HunyuanVideoConfig, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The (t, h, w) token grid of latents with ``frames`` x ``height`` x ``width`` (divisible by the patch)."""
    pt, ph, pw = cfg.patch
    if frames % pt or height % ph or width % pw:
        raise ValueError(f"latent size {(frames, height, width)} is not divisible by the patch {cfg.patch}")
    return frames // pt, height // ph, width // pw


def sparse_layers(cfg: HunyuanVideoConfig, chipmunk: ChipmunkConfig | None) -> int:
    """Layers that keep a Chipmunk attention cache (0 when sparse attention is off)."""
    return sparse_layer_count(cfg.num_layers, chipmunk)


def init_hunyuan_cache(
    cfg: HunyuanVideoConfig,
    chipmunk: ChipmunkConfig | None,
    *,
    batch: int,
    grid: tuple[int, int, int],
    text_len: int,
    dtype=jnp.bfloat16,
    step_caching: bool | None = None,
) -> HunyuanCache:
    """Allocates the (zero) cache of a generation.

    Args:
      cfg: the architecture.
      chipmunk: the Chipmunk config, or None (dense model).
      batch: batch of one model call.
      grid: post-patch token grid (t, h, w) (``post_patch_grid``).
      text_len: valid (unpadded) prompt tokens, equal for every sample (``valid_text_length``).
      dtype: dtype of the attention output cache and of the step-caching hidden states.
      step_caching: keep the pre-head hidden states; defaults to ``chipmunk.step_caching.is_enabled``.
    """
    return init_video_cache(
        HunyuanCache,
        chipmunk,
        num_layers=cfg.num_layers,
        heads=cfg.heads,
        head_dim=cfg.head_dim,
        width=cfg.hidden,
        batch=batch,
        grid=grid,
        text_len=text_len,
        dtype=dtype,
        step_caching=step_caching,
    )


def hunyuan_static_mask(
    cfg: HunyuanVideoConfig, chipmunk: ChipmunkConfig, grid: tuple[int, int, int], text_len: int, rng: jax.Array | None
) -> StaticMask:
    """The static part of the compressed key mask (SPEC §1.3) over [video (voxel order); ``text_len`` valid text]."""
    return video_static_mask(cfg.heads, chipmunk, grid, text_len, rng)


def valid_text_length(text_mask) -> int:
    """The static valid prompt length of a concrete text mask [B, L], for Chipmunk runs and caches.

    Raises:
      ValueError: the samples have different valid lengths, or a sample's valid tokens are not a prefix.
    """
    m = np.asarray(text_mask).astype(bool)
    lens = m.sum(1)
    if m.ndim != 2 or (lens != lens[0]).any():
        raise ValueError(
            f"Chipmunk needs one valid prompt length for the whole batch, got {lens.tolist()} "
            "(pad the prompts to a common length, or run the samples separately)"
        )
    if not (m == (np.arange(m.shape[1])[None, :] < lens[:, None])).all():
        raise ValueError("the valid prompt tokens must come first (a prefix mask), as the pipelines produce")
    return int(lens[0])


def video_rope(cfg: HunyuanVideoConfig, grid: tuple[int, int, int]) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [t*h*w, head_dim / 2] float32 for raster video tokens: axes (t, h, w) split as rope_axes_dim."""
    t, h, w = grid
    hw = position_ids(0, h, w)[:, 1:]  # [h*w, 2] (row, col)
    ids = np.concatenate(
        [np.repeat(np.arange(t, dtype=np.float64), h * w)[:, None], np.tile(hw, (t, 1))], axis=1
    )  # [t*h*w, 3]
    return rope_table(ids, cfg.rope_axes_dim, cfg.rope_theta)


@dataclasses.dataclass(frozen=True)
class _Run:
    """Static settings of one scanned run of layers."""

    kind: AttnKind
    chipmunk: ChipmunkRun | None
    text_len: int | None
    implementation: str | None


def joint_attention(q, k, v, cache, run: _Run, rng, static_mask, n_vid: int, kv_len: jax.Array):
    """Joint attention on q, k, v [B, H, N_vid + L, D] over [video; text]; returns (out, cache).

    Dense kinds mask the keys past ``kv_len`` [B] (padded text). Chipmunk kinds sparsify the first
    n_vid + text_len tokens; padded text queries then attend densely to those valid keys.
    """
    if run.kind is AttnKind.DENSE:
        return _attention(q, k, v, kv_len=kv_len, implementation=run.implementation), cache
    n = n_vid + run.text_len
    c = run.chipmunk
    o, cache = sparse_attention(
        q[:, :, :n],
        k[:, :, :n],
        v[:, :, :n],
        cache,
        kind=run.kind,
        config=c.config,
        backend=c.backend,
        rng=rng,
        static_mask=static_mask,
    )
    if n < q.shape[2]:
        pad = _attention(q[:, :, n:], k[:, :, :n], v[:, :, :n], implementation=run.implementation)
        o = jnp.concatenate([o, pad.astype(o.dtype)], axis=2)
    return o, cache


def double_block(p: dict, img, txt, vec, cos, sin, cache, run: _Run, rng, static_mask, kv_len):
    """One double-stream block on video img [B, Ni, C] and text txt [B, L, C]; p holds one layer's arrays."""
    ni = img.shape[1]
    i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = _mod(vec, p["img_mod_w"], p["img_mod_b"], 6)
    t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = _mod(vec, p["txt_mod_w"], p["txt_mod_b"], 6)
    iq, ik, iv = _qkv(modulate(img, i_sh1, i_sc1), p["img_qkv_w"], p["img_qkv_b"], p["img_q_norm"], p["img_k_norm"])
    tq, tk, tv = _qkv(modulate(txt, t_sh1, t_sc1), p["txt_qkv_w"], p["txt_qkv_b"], p["txt_q_norm"], p["txt_k_norm"])
    q = apply_rope(jnp.concatenate([iq, tq], axis=2), cos, sin)  # [B, H, Ni + L, D], video first
    k = apply_rope(jnp.concatenate([ik, tk], axis=2), cos, sin)
    v = jnp.concatenate([iv, tv], axis=2)
    o, cache = joint_attention(q, k, v, cache, run, rng, static_mask, ni, kv_len)
    o = o.astype(img.dtype)
    i_o = jnp.einsum("bhnd,hdc->bnc", o[:, :, :ni], p["img_proj_w"]) + p["img_proj_b"][None, None, :]
    t_o = jnp.einsum("bhnd,hdc->bnc", o[:, :, ni:], p["txt_proj_w"]) + p["txt_proj_b"][None, None, :]
    img = img + i_g1[:, None, :] * i_o
    txt = txt + t_g1[:, None, :] * t_o
    i_m = dense_mlp(modulate(img, i_sh2, i_sc2), p["img_w1"], p["img_b1"], p["img_w2"], p["img_b2"])
    t_m = dense_mlp(modulate(txt, t_sh2, t_sc2), p["txt_w1"], p["txt_b1"], p["txt_w2"], p["txt_b2"])
    return img + i_g2[:, None, :] * i_m.astype(img.dtype), txt + t_g2[:, None, :] * t_m.astype(txt.dtype), cache


def single_block(p: dict, x, vec, cos, sin, cache, run: _Run, rng, static_mask, n_vid: int, kv_len):
    """One single-stream block on the joint sequence x [B, N_vid + L, C] (video first)."""
    sh, sc, g = _mod(vec, p["mod_w"], p["mod_b"], 3)
    xn = modulate(x, sh, sc)
    q, k, v = _qkv(xn, p["qkv_w"], p["qkv_b"], p["q_norm"], p["k_norm"])
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o, cache = joint_attention(q, k, v, cache, run, rng, static_mask, n_vid, kv_len)
    a = jnp.einsum("bhnd,hdc->bnc", o.astype(x.dtype), p["proj_w"])
    m = dense_mlp(xn, p["w1"], p["b1"], p["w2"], p["b2"]).astype(x.dtype)  # b2: proj_out's one bias
    return x + g[:, None, :] * (a + m), cache


def _put(tree, new, a: int):
    return jax.tree.map(lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), a, axis=0), tree, new)


class HunyuanVideoTransformer3D(nnx.Module):
    """The HunyuanVideo text-to-video transformer (diffusers ``HunyuanVideoTransformer3DModel``, no image
    conditioning).

    Call with video latents [B, C_in, F, H, W], timesteps [B] in [0, 1000], Llama text embeddings with their
    mask, the pooled CLIP embedding and the embedded guidance; see ``__call__``.
    """

    def __init__(self, cfg: HunyuanVideoConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        self.cfg = cfg
        c = cfg.hidden
        self.x_embedder = Linear(cfg.in_channels * cfg.patch_volume, c, rngs=rngs, dtype=dtype)
        self.time_embedder = TwoLayerMLP(256, c, c, rngs=rngs, dtype=dtype)
        self.guidance_embedder = TwoLayerMLP(256, c, c, rngs=rngs, dtype=dtype) if cfg.guidance_embeds else None
        self.text_embedder = TwoLayerMLP(cfg.pooled_dim, c, c, rngs=rngs, dtype=dtype)
        self.refiner = TokenRefiner(cfg, rngs=rngs, dtype=dtype)
        # The Flux stacks have exactly the double/single block parameters (cfg has FluxConfig's field names).
        self.double = DoubleBlocks(cfg, rngs=rngs, dtype=dtype)
        self.single = SingleBlocks(cfg, rngs=rngs, dtype=dtype)
        self.final_mod = Linear(c, 2 * c, rngs=rngs, dtype=dtype)  # emits [scale, shift] (diffusers order)
        self.final_linear = Linear(c, cfg.patch_volume * cfg.out_channels, rngs=rngs, dtype=dtype)

    @property
    def dtype(self):
        return self.x_embedder.kernel[...].dtype

    def embed_vec(self, timestep: jax.Array, pooled: jax.Array, guidance: jax.Array | None) -> jax.Array:
        """The conditioning vector [B, C] from timesteps [B] (0..1000), pooled CLIP [B, pooled_dim], guidance [B]."""
        dt = self.dtype
        vec = self.time_embedder(timestep_embedding(timestep).astype(dt), jax.nn.silu)
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this model embeds guidance; pass guidance [B] (guidance scale * 1000)")
            vec = vec + self.guidance_embedder(timestep_embedding(guidance).astype(dt), jax.nn.silu)
        return vec + self.text_embedder(pooled.astype(dt), jax.nn.silu)

    def head(self, hidden: jax.Array, vec: jax.Array) -> jax.Array:
        """Output adaLN + projection on video hidden states [B, N, C] -> [B, N, C_out*pt*ph*pw]."""
        scale, shift = jnp.split(self.final_mod(jax.nn.silu(vec)), 2, axis=-1)
        return self.final_linear(modulate(hidden, shift, scale))

    def patchify(self, latents: jax.Array) -> tuple[jax.Array, tuple[int, int, int]]:
        """Latents [B, C, F, H, W] -> (patch tokens [B, N, C*pt*ph*pw] in raster order, grid)."""
        if latents.ndim != 5:
            raise ValueError(f"latents must be 5-D video latents [B, C, F, H, W], got {latents.shape=}")
        b, c, f, h, w = latents.shape
        if c != self.cfg.in_channels:
            raise ValueError(f"latents have {c} channels, the model takes {self.cfg.in_channels}")
        grid = post_patch_grid(self.cfg, f, h, w)
        (gt, gh, gw), (pt, ph, pw) = grid, self.cfg.patch
        x = latents.reshape(b, c, gt, pt, gh, ph, gw, pw).transpose(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, gt * gh * gw, c * pt * ph * pw), grid

    def unpatchify(self, y: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
        """Head output [B, N, C_out*pt*ph*pw] (raster) -> [B, C_out, F, H, W]."""
        (gt, gh, gw), (pt, ph, pw) = grid, self.cfg.patch
        b, c = y.shape[0], self.cfg.out_channels
        y = y.reshape(b, gt, gh, gw, c, pt, ph, pw).transpose(0, 4, 1, 5, 2, 6, 3, 7)
        return y.reshape(b, c, gt * pt, gh * ph, gw * pw)

    def final_layer(
        self,
        hidden: jax.Array,
        timestep: jax.Array,
        pooled: jax.Array,
        guidance: jax.Array | None,
        grid: tuple[int, int, int],
    ) -> jax.Array:
        """Head + unpatchify on cached raster hidden states [B, N_vid, C] (a step skipped by step caching)."""
        return self.unpatchify(self.head(hidden, self.embed_vec(timestep, pooled, guidance)), grid)

    def __call__(
        self,
        latents: jax.Array,
        timestep: jax.Array,
        text: jax.Array,
        text_mask: jax.Array,
        pooled: jax.Array,
        guidance: jax.Array | None = None,
        cache: HunyuanCache | None = None,
        *,
        chipmunk: ChipmunkRun | None = None,
        text_len: int | None = None,
        rng: jax.Array | None = None,
        step: jax.Array | int = 0,
        static_mask: StaticMask | None = None,
        attention_impl: str | None = None,
    ) -> tuple[jax.Array, HunyuanCache]:
        """Runs the transformer (one model call).

        Args:
          latents: [B, C_in, F, H, W] video latents; F, H, W divisible by the patch.
          timestep: [B] diffusion timesteps in [0, 1000] (as diffusers; not sigmas).
          text: [B, L, text_dim] Llama embeddings (padded prompt).
          text_mask: [B, L] prompt mask (bool or int; valid tokens first, as the pipelines produce).
          pooled: [B, pooled_dim] pooled CLIP text embedding.
          guidance: [B] embedded guidance already scaled by 1000 (diffusers passes ``guidance_scale * 1000``).
          cache: the HunyuanCache from ``init_hunyuan_cache`` (needed when ``chipmunk`` sparsifies attention or
            when ``cache.hidden`` should record the pre-head hidden states).
          chipmunk: static Chipmunk settings of this step (``plan`` over ``cfg.num_layers`` layers: the double
            blocks, then the single blocks), or None for the plain dense model.
          text_len: the valid prompt length, one static int for the whole batch (``valid_text_length``); needed
            by Chipmunk steps. It must equal every row sum of ``text_mask``: checked when ``text_mask`` is
            concrete; under jit the caller guarantees it.
          rng: generation key; each (step, layer) gets ``indices.layer_rng(rng, step, layer)``.
          step: the denoising step index (for the per-layer rng; may be traced).
          static_mask: the static mask (``hunyuan_static_mask``) for this grid and text_len, or None.
          attention_impl: ``implementation`` of jax.nn.dot_product_attention for the dense attention.

        Returns:
          (prediction [B, C_out, F, H, W], new cache).
        """
        cfg = self.cfg
        plan = chipmunk.plan if chipmunk is not None else None
        if plan is not None and (len(plan.attn) != cfg.num_layers or plan.skip):
            raise ValueError(
                f"plan has {len(plan.attn)} layers (skip={plan.skip}); the model has {cfg.num_layers} "
                "(run skipped steps through final_layer)"
            )
        kinds = list(plan.attn) if plan is not None else [AttnKind.DENSE] * cfg.num_layers
        sparse_any = any(k is not AttnKind.DENSE for k in kinds)
        cache = cache if cache is not None else HunyuanCache()
        offset = cfg.num_layers - sparse_layers(cfg, chipmunk.config if chipmunk is not None else None)
        for layer, kind in enumerate(kinds):
            if kind is not AttnKind.DENSE and layer < offset:
                raise ValueError(f"layer {layer} runs {kind} but only layers >= {offset} keep a Chipmunk cache")
        if sparse_any and cache.attn is None:
            raise ValueError("a Chipmunk attention step needs the cache from init_hunyuan_cache")

        dt = self.dtype
        tokens, grid = self.patchify(latents.astype(dt))
        b, n_vid = tokens.shape[:2]
        seq = text.shape[1]
        if timestep.shape != (b,) or text.shape[0] != b or text_mask.shape != (b, seq) or pooled.shape[0] != b:
            raise ValueError(
                f"batch mismatch: {b=}, {timestep.shape=}, {text.shape=}, {text_mask.shape=}, {pooled.shape=}"
            )
        if sparse_any:
            if text_len is None or not 0 < text_len <= seq:
                raise ValueError(f"Chipmunk steps need text_len in [1, {seq}] (valid_text_length), got {text_len}")
            if not isinstance(text_mask, jax.core.Tracer) and valid_text_length(text_mask) != text_len:
                raise ValueError(f"text_len {text_len} differs from the mask's valid length")
            want = (cfg.num_layers - offset, b, cfg.heads, n_vid + text_len, cfg.head_dim)
            if cache.attn.out.shape != want:
                raise ValueError(
                    f"the attention cache is {cache.attn.out.shape} [layers, B, H, N, D], this call needs {want} "
                    "(init_hunyuan_cache with this config, batch, grid and text_len)"
                )

        mask = text_mask.astype(bool)
        kv_len = n_vid + mask.sum(1, dtype=jnp.int32)  # [B] valid keys of the joint sequence
        vec = self.embed_vec(timestep, pooled, guidance)
        txt = self.refiner(text, mask, timestep, attention_impl)  # [B, L, C]
        img = self.x_embedder(tokens)  # [B, N_vid, C]
        cos, sin = video_rope(cfg, grid)
        voxel = chipmunk is not None and chipmunk.config.attn.is_enabled
        if voxel:
            # Token order is irrelevant to dense attention; voxel order makes 192-token groups local (SPEC §3.2).
            img, cos, sin = voxelize(img, grid, axis=1), voxelize(cos, grid, axis=0), voxelize(sin, grid, axis=0)
        # Text rows rotate by angle 0 (exactly the identity): only the video tokens carry positions.
        cos = jnp.concatenate([cos, jnp.ones((seq, cos.shape[1]), cos.dtype)], axis=0)  # [N_vid + L, D/2]
        sin = jnp.concatenate([sin, jnp.zeros((seq, sin.shape[1]), sin.dtype)], axis=0)

        attn_c = cache.attn

        def scan_runs(stack, layer0: int, carry, block):
            nonlocal attn_c
            params = _params(stack)
            n_layers = jax.tree.leaves(params)[0].shape[0]
            ks = kinds[layer0 : layer0 + n_layers]
            for a, e in kind_runs(ks):
                sparse = ks[a] is not AttnKind.DENSE
                run = _Run(ks[a], chipmunk, text_len, attention_impl)
                c0 = layer0 + a - offset
                xs = (
                    _slice(params, a, e),
                    jnp.arange(layer0 + a, layer0 + e, dtype=jnp.int32),
                    _slice(attn_c, c0, c0 + e - a) if sparse else None,
                )

                def body(h, xs_l, run=run):
                    p, layer, c = xs_l
                    lrng = None if rng is None else layer_rng(rng, step, layer)
                    return block(p, h, c, run, lrng)

                carry, new_c = jax.lax.scan(body, carry, xs)
                if sparse:
                    attn_c = _put(attn_c, new_c, c0)
            return carry

        def dbl(p, carry, c, run, lrng):
            i, t = carry
            i, t, c = double_block(p, i, t, vec, cos, sin, c, run, lrng, static_mask, kv_len)
            return (i, t), c

        def sgl(p, x, c, run, lrng):
            return single_block(p, x, vec, cos, sin, c, run, lrng, static_mask, n_vid, kv_len)

        img, txt = scan_runs(self.double, 0, (img, txt), dbl)
        x = scan_runs(self.single, cfg.depth_double, jnp.concatenate([img, txt], axis=1), sgl)
        hidden = x[:, :n_vid]
        if voxel:
            hidden = unvoxelize(hidden, grid, axis=1)
        new_cache = HunyuanCache(
            attn=attn_c, hidden=None if cache.hidden is None else hidden.astype(cache.hidden.dtype)
        )
        return self.unpatchify(self.head(hidden, vec), grid), new_cache


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "chipmunk", "text_len", "attention_impl"),
    donate_argnames=("cache",),
)
def forward(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    latents: jax.Array,
    timestep: jax.Array,
    text: jax.Array,
    text_mask: jax.Array,
    pooled: jax.Array,
    guidance: jax.Array | None = None,
    cache: HunyuanCache | None = None,
    *,
    chipmunk: ChipmunkRun | None = None,
    text_len: int | None = None,
    rng: jax.Array | None = None,
    step: jax.Array | int = 0,
    static_mask: tuple[jax.Array, jax.Array] | None = None,
    attention_impl: str | None = None,
) -> tuple[jax.Array, HunyuanCache]:
    """One jitted model call on ``nnx.split(model)``: the jit boundary a sampler uses (the cache is donated).

    Compiles once per distinct (graphdef, chipmunk run, text_len, shapes); the step index, rng and the static
    mask arrays are traced. Arguments are those of ``HunyuanVideoTransformer3D.__call__`` except
    ``static_mask``, given as its arrays ``(mask [H, G, N] bool, sparse_group [H, G] bool)``. The text mask is
    traced, so ``text_len`` is not checked against it here: compute it with ``valid_text_length`` first.
    """
    model = nnx.merge(graphdef, state)
    sm = None if static_mask is None else StaticMask(mask=static_mask[0], sparse_group=static_mask[1])
    return model(
        latents,
        timestep,
        text,
        text_mask,
        pooled,
        guidance,
        cache,
        chipmunk=chipmunk,
        text_len=text_len,
        rng=rng,
        step=step,
        static_mask=sm,
        attention_impl=attention_impl,
    )
