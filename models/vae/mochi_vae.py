"""The Mochi 1 video VAE (diffusers ``AutoencoderKLMochi``) in Flax NNX, channels-last.

A causal 3-D convolutional autoencoder: 8x spatial and 6x temporal compression into 12 latent channels. Both
halves are built from residual blocks ``x + conv(silu(gn(conv(silu(gn(x))))))`` whose 3x3x3 convolutions pad
*by replication*: the time axis is padded in front with copies of the first frame (causal), height and width
on both sides with copies of the border pixels. Group norms (32 groups, eps 1e-5) normalise each frame on its
own, so diffusers' "chunked" group norm (frames split into chunks of 8) is just a per-frame group norm.

* Decoder (latents [B, F, h, w, 12] -> video [B, 6(F-1)+1, 8h, 8w, 3]): a pointwise ``conv_in`` to 768
  channels, residual blocks, three up blocks (residual blocks, then a per-pixel linear layer to
  ``C_out * st * sh * sw`` channels rearranged depth-to-space into ``st`` frames and ``sh x sw`` pixels: time x3
  then x2 then x1, space x2 each), residual blocks, SiLU, a linear projection to RGB. The up blocks make 6F
  frames; the first 5 are dropped, as the release does. The decoder has no attention, so it is exactly causal
  and per-frame local: decoding a few latent frames at a time while carrying the last two input frames of
  every convolution (``frames_per_chunk``) gives the same video as one pass, with bounded memory.
* Encoder (video [B, 6k+1, H, W, 3] -> posterior moments): Fourier features (the input plus sin / cos of it at
  frequencies 2π·2^6 and 2π·2^7), a linear ``proj_in``, residual blocks, three down blocks (a strided causal
  conv with kernel = stride = (time x1 / x2 / x3, space x2), then residual blocks each followed by a causal
  multi-head attention along time per pixel: group norm, 32-dim heads, l2-normalised q and k, residual), more
  residual blocks with attention, group norm, SiLU, a bias-free linear projection to 2 x 12 channels (mean,
  log-variance). The causal attention spans the whole clip, so the encoder runs in one pass.

Spatial tiling (``MochiTiling``) reproduces diffusers' ``enable_tiling()`` decode / encode: overlapping tiles,
linear blending of the overlaps, each tile decoded on its own (what the diffusers Mochi pipeline example does).

Public API: ``MochiVAEConfig`` (``MOCHI_VAE`` = the release, ``MochiVAEConfig.tiny_config()``), ``MochiVAE``
(weights only; ``.decode`` / ``.encode`` take diffusers' layout [B, C, F, H, W]), the jitted module functions
``decode`` / ``encode`` / ``encode_moments``, ``unnormalize_latents`` / ``normalize_latents``,
``frames_for_latents`` / ``latent_frames``, ``LATENTS_MEAN`` / ``LATENTS_STD`` and ``load``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.vae import common
from models.vae.common import chunked, load_converted, tiled_2d, to_first, to_last

MODEL = "mochi_vae"

# Per-channel statistics of Mochi 1's latent space (genmo/mochi-1-preview vae config = diffusers defaults).
LATENTS_MEAN = (
    -0.06730895953510081, -0.038011381506090416, -0.07477820912866141, -0.05565264470995561,
    0.012767231469026969, -0.04703542746246419, 0.043896967884726704, -0.09346305707025976,
    -0.09918314763016893, -0.008729793427399178, -0.011931556316503654, -0.0321993391887285,
)  # fmt: skip
LATENTS_STD = (
    0.9263795028493863, 0.9248894543193766, 0.9393059390890617, 0.959253732819592,
    0.8244560132752793, 0.917259975397747, 0.9294154431013696, 1.3720942357788521,
    0.881393668867029, 0.9168315692124348, 0.9185249279345552, 0.9274757570805041,
)  # fmt: skip
SCALING_FACTOR = 1.0

GROUPS = 32  # group norm groups, fixed in the release (and in diffusers)
HEAD_DIM = 32  # encoder attention head width, fixed in the release
NORM_EPS = 1e-5  # group norm eps and the l2 q/k normalisation floor
FOURIER_OCTAVES = (6, 7)  # encoder Fourier features: frequencies 2*pi*2**k
ATTENTION_CHUNK_ELEMENTS = 1 << 28  # encoder attention: score elements per pixel batch (1 GiB in float32)

Cache = Any  # nested tuples of [B, kt - 1, H, W, C] arrays (None where a conv keeps nothing)


@dataclasses.dataclass(frozen=True)
class MochiVAEConfig(common.DictConfig):
    """Architecture and latent statistics of a Mochi VAE (the fields of diffusers ``AutoencoderKLMochi``).

    Attributes:
        in_channels: Encoder input channels after the Fourier features (3 * (1 + 2 * 2) = 15 for RGB).
        out_channels: Video channels out of the decoder.
        encoder_block_out_channels: Encoder widths: ``block_in``, then each down block's output.
        decoder_block_out_channels: Decoder widths, highest resolution first (``block_out`` is the first,
            ``conv_in`` / ``block_in`` the last).
        latent_channels: Latent channels (the encoder emits twice as many: mean and log-variance).
        layers_per_block: Residual blocks of ``block_in``, each of the three down blocks, and ``block_out``
            (encoder order; the decoder mirrors it).
        temporal_expansions: Per down block, the time compression (the decoder's up blocks mirror it).
        spatial_expansions: Per down block, the height and width compression.
        add_attention_block: Per encoder block (``block_in``, down blocks, ``block_out``), whether its residual
            blocks are followed by causal attention. The decoder has none.
        latents_mean: Per-channel mean of the raw latents.
        latents_std: Per-channel standard deviation of the raw latents.
        scaling_factor: diffusers' ``scaling_factor`` (1.0 for Mochi 1).
        with_encoder: False for a decoder-only model (e.g. converted from genmo's ``decoder.safetensors`` alone).
    """

    in_channels: int = 15
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 128, 256, 384)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 768)
    latent_channels: int = 12
    layers_per_block: tuple[int, ...] = (3, 3, 4, 6, 3)
    temporal_expansions: tuple[int, ...] = (1, 2, 3)
    spatial_expansions: tuple[int, ...] = (2, 2, 2)
    add_attention_block: tuple[bool, ...] = (False, True, True, True, True)
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD
    scaling_factor: float = SCALING_FACTOR
    with_encoder: bool = True

    def __post_init__(self):
        for name in (
            "encoder_block_out_channels",
            "decoder_block_out_channels",
            "layers_per_block",
            "temporal_expansions",
            "spatial_expansions",
            "add_attention_block",
            "latents_mean",
            "latents_std",
        ):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.decoder_block_out_channels)
        if n < 2 or len(self.encoder_block_out_channels) != n:
            raise ValueError(
                f"encoder_block_out_channels and decoder_block_out_channels need the same length >= 2, got "
                f"{self.encoder_block_out_channels} and {self.decoder_block_out_channels}"
            )
        lengths = {
            "layers_per_block": (self.layers_per_block, n + 1),
            "temporal_expansions": (self.temporal_expansions, n - 1),
            "spatial_expansions": (self.spatial_expansions, n - 1),
            "add_attention_block": (self.add_attention_block, n + 1),
        }
        for name, (value, want) in lengths.items():
            if len(value) != want:
                raise ValueError(f"{name} needs {want} entries for {n} widths, got {value}")
        for name in ("encoder_block_out_channels", "decoder_block_out_channels"):
            bad = [c for c in getattr(self, name) if c < GROUPS or c % GROUPS]
            if bad:
                raise ValueError(f"{name}: widths {bad} are not positive multiples of {GROUPS} (group norm, heads)")
        if min(self.layers_per_block) < 0 or min(self.temporal_expansions + self.spatial_expansions) < 1:
            raise ValueError("layers_per_block must be >= 0 and the expansions >= 1")
        if self.in_channels % (1 + 2 * len(FOURIER_OCTAVES)) or min(self.out_channels, self.latent_channels) < 1:
            raise ValueError(
                f"in_channels={self.in_channels} must be video channels x {1 + 2 * len(FOURIER_OCTAVES)} (Fourier "
                f"features); out_channels and latent_channels must be positive"
            )
        if len(self.latents_mean) != self.latent_channels or len(self.latents_std) != self.latent_channels:
            raise ValueError(f"latents_mean / latents_std need latent_channels={self.latent_channels} entries")
        if min(self.latents_std) <= 0 or self.scaling_factor <= 0:
            raise ValueError("latents_std and scaling_factor must be positive")

    @classmethod
    def tiny_config(cls) -> MochiVAEConfig:
        """Test-sized config with the release structure (x6 time, x8 space, 12 latent channels, encoder
        attention with 1 and 2 heads), widths 32..96 and one or two residual blocks per level."""
        return cls(
            encoder_block_out_channels=(32, 32, 64, 64),
            decoder_block_out_channels=(32, 32, 64, 96),
            layers_per_block=(1, 1, 2, 1, 1),
        )

    @property
    def video_channels(self) -> int:
        """Channels of the video fed to the encoder (before the Fourier features)."""
        return self.in_channels // (1 + 2 * len(FOURIER_OCTAVES))

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W."""
        return math.prod(self.spatial_expansions)

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first."""
        return math.prod(self.temporal_expansions)


MOCHI_VAE = MochiVAEConfig()
"""Mochi 1 (preview) VAE: genmo ``encoder.safetensors`` + ``decoder.safetensors`` / diffusers ``vae`` folder."""


def latent_frames(frames: int, config: MochiVAEConfig = MOCHI_VAE) -> int:
    """Latent frames for ``frames`` video frames, which must be ``6k + 1`` (``temporal_factor * k + 1``)."""
    return common.latent_frames(frames, config.temporal_factor)


def frames_for_latents(latent_frames: int, config: MochiVAEConfig = MOCHI_VAE) -> int:
    """Video frames decoded from ``latent_frames`` latent frames: ``6 (F - 1) + 1``."""
    return common.frames_for_latents(latent_frames, config.temporal_factor)


def _stats(config: MochiVAEConfig, shape: tuple[int, ...], dtype) -> tuple[jax.Array, jax.Array]:
    mean = jnp.asarray(config.latents_mean, jnp.float32).reshape(shape).astype(dtype)
    std = jnp.asarray(config.latents_std, jnp.float32).reshape(shape).astype(dtype)
    return mean, std


def _channel_shape(ndim: int, axis: int) -> tuple[int, ...]:
    axis = axis % ndim
    return tuple(-1 if d == axis else 1 for d in range(ndim))


def unnormalize_latents(z: jax.Array, config: MochiVAEConfig = MOCHI_VAE, *, channel_axis: int = 1) -> jax.Array:
    """Transformer latents -> raw VAE latents: ``z * latents_std / scaling_factor + latents_mean``.

    The diffusers MochiPipeline applies exactly this (in the latents' dtype) before ``vae.decode``.

    Args:
        z: Latents with ``latent_channels`` channels on ``channel_axis`` (1: diffusers [B, 12, F, h, w]).
        config: Supplies the statistics.
        channel_axis: The channel axis (-1 for channels-last).
    """
    mean, std = _stats(config, _channel_shape(z.ndim, channel_axis), z.dtype)
    return z * std / jnp.asarray(config.scaling_factor, z.dtype) + mean


def normalize_latents(z: jax.Array, config: MochiVAEConfig = MOCHI_VAE, *, channel_axis: int = 1) -> jax.Array:
    """Raw VAE latents -> the transformer's space: ``(z - latents_mean) * scaling_factor / latents_std``
    (the inverse of ``unnormalize_latents``)."""
    mean, std = _stats(config, _channel_shape(z.ndim, channel_axis), z.dtype)
    return (z - mean) * jnp.asarray(config.scaling_factor, z.dtype) / std


# ---------------------------------------------------------------------------------------------------------
# Layers. Everything is [B, T, H, W, C].


class GroupNorm(nnx.Module):
    """Per-frame group norm over (H, W, C / 32) with affine scale and bias; statistics in float32."""

    def __init__(self, dim: int, *, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        xg = x.astype(jnp.float32).reshape(b, t, h, w, GROUPS, c // GROUPS)
        mean = jnp.mean(xg, axis=(2, 3, 5), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(2, 3, 5), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + jnp.float32(NORM_EPS))).reshape(b, t, h, w, c)
        scale = self.scale[...].astype(jnp.float32).reshape(1, 1, 1, 1, c)
        y = y * scale + self.bias[...].astype(jnp.float32).reshape(1, 1, 1, 1, c)
        return y.astype(x.dtype)


class CausalConv3d(nnx.Module):
    """3-D convolution with replicate padding: ``kt - 1`` copies of the first frame in front (or the cached last
    ``kt - 1`` input frames of the previous chunk), ``(k - 1) // 2`` border copies on each side in space."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int], stride: tuple[int, int, int], kw: dict):
        kt, kh, kwd = kernel
        fan_in = cin * kt * kh * kwd
        self.kernel = nnx.Param(
            jax.random.normal(kw["rngs"].params(), (kt, kh, kwd, cin, cout), kw["param_dtype"]) / math.sqrt(fan_in)
        )
        self.bias = nnx.Param(jnp.zeros((cout,), kw["param_dtype"]))
        self.stride = tuple(stride)
        self.dtype = kw["dtype"]

    def __call__(self, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """x [B, T, H, W, Cin], cache [B, kt - 1, H, W, Cin] or None -> (y [B, T', H', W', Cout], new cache)."""
        kt, kh, kwd = self.kernel.shape[:3]
        if kt > 1:
            front = jnp.repeat(x[:, :1], kt - 1, axis=1) if cache is None else cache.astype(x.dtype)
            x = jnp.concatenate([front, x], axis=1)
        new_cache = x[:, x.shape[1] - (kt - 1) :] if kt > 1 else None
        ph, pw = (kh - 1) // 2, (kwd - 1) // 2
        if ph or pw:
            x = jnp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw), (0, 0)), mode="edge")
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=self.stride,
            padding="VALID",
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
        return y + self.bias[...].astype(y.dtype).reshape(1, 1, 1, 1, -1), new_cache


def _linear(cin: int, cout: int, kw: dict, *, bias: bool = True) -> nnx.Linear:
    # Pointwise convolutions and diffusers' per-pixel nn.Linear layers are matmuls over the channel axis.
    return nnx.Linear(cin, cout, use_bias=bias, **kw)


class ResnetBlock(nnx.Module):
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))))))`` with 3x3x3 causal replicate-padded convs (fixed width)."""

    def __init__(self, dim: int, kw: dict):
        self.norm1 = GroupNorm(dim, param_dtype=kw["param_dtype"])
        self.conv1 = CausalConv3d(dim, dim, (3, 3, 3), (1, 1, 1), kw)
        self.norm2 = GroupNorm(dim, param_dtype=kw["param_dtype"])
        self.conv2 = CausalConv3d(dim, dim, (3, 3, 3), (1, 1, 1), kw)

    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        c1, c2 = (None, None) if cache is None else cache
        y, c1 = self.conv1(jax.nn.silu(self.norm1(x)), c1)
        y, c2 = self.conv2(jax.nn.silu(self.norm2(y)), c2)
        return x + y.astype(x.dtype), (c1, c2)


class CausalTimeAttention(nnx.Module):
    """Multi-head causal self-attention along time, separately for every pixel (the encoder's attention).

    q, k, v: bias-free projections into ``dim / 32`` heads of 32; q and k are l2-normalised per head
    (``x / max(||x||, 1e-5)``), scores scaled by ``32 ** -0.5``, frame t attends to frames <= t. Output through
    a projection with bias. The caller adds the residual.
    """

    def __init__(self, dim: int, kw: dict):
        self.heads = dim // HEAD_DIM
        self.chunk_elements = ATTENTION_CHUNK_ELEMENTS  # static (part of the graphdef, so of the jit cache key)
        self.to_q = _linear(dim, dim, kw, bias=False)
        self.to_k = _linear(dim, dim, kw, bias=False)
        self.to_v = _linear(dim, dim, kw, bias=False)
        self.to_out = _linear(dim, dim, kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        seq = jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b * h * w, t, c)  # [N, T, C], N = pixels
        # The scores are [N, heads, T, T] float32: at the release size (101,760 pixels x 4 heads x 163^2 in the
        # first down block) that is 43 GB, so long sequences run in pixel batches through lax.map.
        per_pixel = self.heads * t * t
        if seq.shape[0] * per_pixel > self.chunk_elements:
            batch = max(1, self.chunk_elements // per_pixel)
            out = jax.lax.map(lambda s: self._attend(s[None])[0], seq, batch_size=batch)
        else:
            out = self._attend(seq)
        return jnp.transpose(out.reshape(b, h, w, t, c), (0, 3, 1, 2, 4))  # [B, T, H, W, C]

    def _attend(self, seq: jax.Array) -> jax.Array:
        """[N, T, C] -> [N, T, C]: causal attention of each of the N sequences, output projection included."""
        n, t, c = seq.shape

        def heads(y: jax.Array) -> jax.Array:
            return y.reshape(n, t, self.heads, HEAD_DIM)  # [N, T, Hd, D]

        def l2(y: jax.Array) -> jax.Array:
            y32 = y.astype(jnp.float32)
            norm = jnp.sqrt(jnp.sum(jnp.square(y32), axis=-1, keepdims=True))
            return (y32 / jnp.maximum(norm, jnp.float32(NORM_EPS))).astype(y.dtype)

        q, k, v = l2(heads(self.to_q(seq))), l2(heads(self.to_k(seq))), heads(self.to_v(seq))
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * jnp.float32(HEAD_DIM**-0.5)
        causal = jnp.tril(jnp.ones((1, 1, t, t), jnp.bool_))
        scores = jnp.where(causal, scores, jnp.float32(-jnp.inf))
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, t, c)
        return self.to_out(out)


class ResnetStack(nnx.Module):
    """``num_layers`` residual blocks, each optionally followed by ``x + attention(norm(x))`` (diffusers
    ``MochiMidBlock3D``; also the body of the down blocks)."""

    def __init__(self, dim: int, num_layers: int, attention: bool, kw: dict):
        self.resnets = nnx.List([ResnetBlock(dim, kw) for _ in range(num_layers)])
        n_attn = num_layers if attention else 0
        self.norms = nnx.List([GroupNorm(dim, param_dtype=kw["param_dtype"]) for _ in range(n_attn)])
        self.attentions = nnx.List([CausalTimeAttention(dim, kw) for _ in range(n_attn)])

    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        new = []
        for i, resnet in enumerate(self.resnets):
            x, c = resnet(x, None if cache is None else cache[i])
            new.append(c)
            if self.attentions:
                x = x + self.attentions[i](self.norms[i](x)).astype(x.dtype)
        return x, tuple(new)


class DownBlock(ResnetStack):
    """Strided causal conv (kernel = stride = (st, ss, ss)) from ``cin`` to ``cout``, then a ``ResnetStack``."""

    def __init__(self, cin: int, cout: int, num_layers: int, st: int, ss: int, attention: bool, kw: dict):
        super().__init__(cout, num_layers, attention, kw)
        self.conv_in = CausalConv3d(cin, cout, (st, ss, ss), (st, ss, ss), kw)

    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        x, _ = self.conv_in(x, None)
        return super().__call__(x, cache)


class UpBlock(nnx.Module):
    """Residual blocks at width ``cin``, then a per-pixel linear layer to ``cout * st * ss * ss`` channels
    rearranged depth-to-space: every frame becomes ``st`` frames and every pixel an ``ss x ss`` patch."""

    def __init__(self, cin: int, cout: int, num_layers: int, st: int, ss: int, kw: dict):
        self.resnets = nnx.List([ResnetBlock(cin, kw) for _ in range(num_layers)])
        self.proj = _linear(cin, cout * st * ss * ss, kw)
        self.st, self.ss = st, ss

    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        new = []
        for i, resnet in enumerate(self.resnets):
            x, c = resnet(x, None if cache is None else cache[i])
            new.append(c)
        y = self.proj(x)
        b, t, h, w, _ = y.shape
        st, ss = self.st, self.ss
        # diffusers' channel index is ((c * st + i) * ss + j) * ss + k for output frame t*st+i, pixel (h*ss+j, w*ss+k).
        y = y.reshape(b, t, h, w, -1, st, ss, ss).transpose(0, 1, 5, 2, 6, 3, 7, 4)  # [B, T, st, H, ss, W, ss, C]
        return y.reshape(b, t * st, h * ss, w * ss, -1), tuple(new)


def fourier_features(x: jax.Array) -> jax.Array:
    """[..., C] -> [..., C * 5]: ``[x, sin(2^k 2π x), cos(2^k 2π x)]`` for k in (6, 7), channel-major (channel c,
    octave k at ``c * 2 + k - 6``), computed in float32 and returned in the input dtype."""
    x32 = x.astype(jnp.float32)
    w = jnp.asarray([2.0**k * 2 * math.pi for k in FOURIER_OCTAVES], jnp.float32).reshape((1,) * x.ndim + (-1,))
    h = (x32[..., :, None] * w).reshape(*x.shape[:-1], -1)  # [..., C * num_freqs]
    return jnp.concatenate([x32, jnp.sin(h), jnp.cos(h)], axis=-1).astype(x.dtype)


class Encoder(nnx.Module):
    """Video [B, T, H, W, video_channels] -> posterior moments [B, T', H/8, W/8, 2 * latent_channels]."""

    def __init__(self, config: MochiVAEConfig, kw: dict):
        ch, layers, attn = config.encoder_block_out_channels, config.layers_per_block, config.add_attention_block
        self.proj_in = _linear(config.in_channels, ch[0], kw)
        self.block_in = ResnetStack(ch[0], layers[0], attn[0], kw)
        self.down_blocks = nnx.List(
            [
                DownBlock(
                    ch[i],
                    ch[i + 1],
                    layers[i + 1],
                    config.temporal_expansions[i],
                    config.spatial_expansions[i],
                    attn[i + 1],
                    kw,
                )
                for i in range(len(ch) - 1)
            ]
        )
        self.block_out = ResnetStack(ch[-1], layers[-1], attn[-1], kw)
        self.norm_out = GroupNorm(ch[-1], param_dtype=kw["param_dtype"])
        self.proj_out = _linear(ch[-1], 2 * config.latent_channels, kw, bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj_in(fourier_features(x))
        x, _ = self.block_in(x, None)
        for block in self.down_blocks:
            x, _ = block(x, None)
        x, _ = self.block_out(x, None)
        return self.proj_out(jax.nn.silu(self.norm_out(x)))


class Decoder(nnx.Module):
    """Raw latents [B, F, h, w, latent_channels] -> 6F frames [B, 6F, 8h, 8w, out_channels] (before the drop
    of the first five), with the conv caches for the next chunk."""

    def __init__(self, config: MochiVAEConfig, kw: dict):
        ch, layers = config.decoder_block_out_channels, config.layers_per_block
        n = len(ch)
        self.conv_in = _linear(config.latent_channels, ch[-1], kw)
        self.block_in = ResnetStack(ch[-1], layers[-1], False, kw)
        self.up_blocks = nnx.List(
            [
                UpBlock(
                    ch[-i - 1],
                    ch[-i - 2],
                    layers[-i - 2],
                    config.temporal_expansions[-i - 1],
                    config.spatial_expansions[-i - 1],
                    kw,
                )
                for i in range(n - 1)
            ]
        )
        self.block_out = ResnetStack(ch[0], layers[0], False, kw)
        self.proj_out = _linear(ch[0], config.out_channels, kw)

    def __call__(self, z: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        c_in, c_up, c_out = (None, None, None) if cache is None else cache
        x, c_in = self.block_in(self.conv_in(z), c_in)
        new_up = []
        for i, block in enumerate(self.up_blocks):
            x, c = block(x, None if c_up is None else c_up[i])
            new_up.append(c)
        x, c_out = self.block_out(x, c_out)
        return self.proj_out(jax.nn.silu(x)), (c_in, tuple(new_up), c_out)


class MochiVAE(nnx.Module):
    """Mochi 1 VAE weights: ``encoder`` (None when ``config.with_encoder`` is False) and ``decoder``.

    ``decode`` / ``encode`` take diffusers' layout and are jitted; ``decode_raw`` / ``encode_moments_raw`` are
    the unjitted channels-last computations.
    """

    def __init__(self, config: MochiVAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        """Creates randomly initialised weights.

        Args:
            config: Architecture and latent statistics.
            rngs: Initialisation randomness.
            dtype: Compute dtype (norms, Fourier features and softmax run in float32).
            param_dtype: Storage dtype of the weights.
        """
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.encoder = Encoder(config, kw) if config.with_encoder else None
        self.decoder = Decoder(config, kw)

    def decode_raw(self, z: jax.Array, *, frames_per_chunk: int | None = 2) -> jax.Array:
        """Raw latents -> video, channels-last, unjitted.

        Args:
            z: [B, F, h, w, latent_channels] raw (un-normalised) latents.
            frames_per_chunk: Latent frames decoded per step of a ``lax.scan`` carrying the conv caches (the
                first chunk takes the remainder, 1..frames_per_chunk frames); None decodes all at once. The
                result is the same either way; chunks bound the activation memory.

        Returns:
            [B, 6(F - 1) + 1, 8h, 8w, out_channels], not clipped (as diffusers).
        """
        cfg = self.config
        if z.ndim != 5 or z.shape[-1] != cfg.latent_channels:
            raise ValueError(f"latents must be [B, F, h, w, {cfg.latent_channels}] (channels last), got {z.shape=}")
        if frames_per_chunk is not None and (not isinstance(frames_per_chunk, int) or frames_per_chunk < 1):
            raise ValueError(f"frames_per_chunk must be a positive int or None, got {frames_per_chunk!r}")
        b, f, h, w, c = z.shape
        if frames_per_chunk is None or frames_per_chunk >= f:
            video, _ = self.decoder(z, None)
        else:
            n = (f - 1) // frames_per_chunk
            r = f - n * frames_per_chunk  # first chunk: 1..frames_per_chunk frames
            rest = jnp.moveaxis(z[:, r:].reshape(b, n, frames_per_chunk, h, w, c), 1, 0)
            video = chunked(self.decoder, z[:, :r], rest)
        drop = cfg.temporal_factor - 1  # the release keeps 6(F - 1) + 1 frames
        return video[:, drop:] if video.shape[1] >= cfg.temporal_factor else video

    def encode_moments_raw(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Video -> posterior (mean, log-variance clamped to [-30, 20]), channels-last, unjitted, one pass.

        Args:
            video: [B, T, H, W, video_channels] in [-1, 1]; T = 6k + 1; H, W divisible by 8.

        Returns:
            (mean, logvar), each [B, k + 1, H/8, W/8, latent_channels].
        """
        cfg = self.config
        if self.encoder is None:
            raise ValueError("this MochiVAE has no encoder (converted from a decoder-only checkpoint)")
        b, t, h, w, c = video.shape
        latent_frames(t, cfg)
        f = cfg.spatial_factor
        if c != cfg.video_channels or h % f or w % f:
            raise ValueError(
                f"video must be [B, T, H, W, {cfg.video_channels}] with H, W divisible by {f}: {video.shape=}"
            )
        moments = self.encoder(video)
        mean, logvar = moments[..., : cfg.latent_channels], moments[..., cfg.latent_channels :]
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def set_attention_chunk_elements(self, elements: int) -> None:
        """Bounds the encoder attention's float32 score tensor to about ``elements`` per pixel batch (default
        ``ATTENTION_CHUNK_ELEMENTS``); smaller saves memory, larger runs fewer, bigger batches. Same results."""
        if not isinstance(elements, int) or elements < 1:
            raise ValueError(f"elements must be a positive int, got {elements!r}")
        for _, module in nnx.iter_modules(self):
            if isinstance(module, CausalTimeAttention):
                module.chunk_elements = elements

    def decode(self, latents: jax.Array, **kwargs) -> jax.Array:
        """``decode(self, latents, **kwargs)``: see the module function."""
        return decode(self, latents, **kwargs)

    def encode(self, video: jax.Array, **kwargs) -> jax.Array:
        """``encode(self, video, **kwargs)``: see the module function."""
        return encode(self, video, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Tiling (diffusers AutoencoderKLMochi.enable_tiling / tiled_decode / tiled_encode).


@dataclasses.dataclass(frozen=True)
class MochiTiling:
    """Spatial tiles in video pixels, as diffusers' ``enable_tiling`` arguments (defaults are diffusers').

    Tiling is used only when the video is larger than one tile (diffusers' rule). Tiles start every ``stride``
    pixels, are ``min`` pixels wide, and neighbours are blended linearly over ``min - stride`` pixels.
    """

    min_height: int = 256
    min_width: int = 256
    stride_height: int = 192
    stride_width: int = 192

    def __post_init__(self):
        for d in ("height", "width"):
            lo, st = getattr(self, f"min_{d}"), getattr(self, f"stride_{d}")
            if not 0 < st <= lo:
                raise ValueError(f"MochiTiling needs 0 < stride_{d} <= min_{d}, got {st} and {lo}")


# ---------------------------------------------------------------------------------------------------------
# Jitted entry points (diffusers layout [B, C, F, H, W] unless channels_last).


@jax.jit(static_argnames=("graphdef", "frames_per_chunk"))
def _decode_jit(graphdef, state, z, *, frames_per_chunk):
    return nnx.merge(graphdef, state).decode_raw(z, frames_per_chunk=frames_per_chunk)


@jax.jit(static_argnames=("graphdef",))
def _encode_jit(graphdef, state, video):
    return nnx.merge(graphdef, state).encode_moments_raw(video)


def decode(
    vae: MochiVAE,
    latents: jax.Array,
    *,
    unnormalize: bool = False,
    frames_per_chunk: int | None = 2,
    tiling: MochiTiling | None = None,
    clip: bool = False,
    channels_last: bool = False,
) -> jax.Array:
    """Decodes Mochi latents into a video (each distinct tile shape compiles once).

    Args:
        vae: The VAE.
        latents: [B, 12, F, h, w] ([B, F, h, w, 12] with ``channels_last``), raw VAE latents as diffusers'
            ``AutoencoderKLMochi.decode`` takes them; pass the transformer's output with ``unnormalize=True``
            (or through ``unnormalize_latents`` first).
        unnormalize: Apply ``unnormalize_latents`` first (what the diffusers MochiPipeline does before decode).
        frames_per_chunk: Latent frames per decoder chunk (None: one pass); exact either way, see
            ``MochiVAE.decode_raw``.
        tiling: Spatial tiling like diffusers' ``vae.enable_tiling()``; None decodes the full frame at once.
        clip: Clip to [-1, 1] (diffusers leaves it to the video post-processor).
        channels_last: Layout of both the latents and the returned video.

    Returns:
        Video [B, 3, 6(F - 1) + 1, 8h, 8w] ([B, T, H, W, 3] with ``channels_last``) in about [-1, 1], in the
        compute dtype.
    """
    cfg = vae.config
    axis = -1 if channels_last else 1
    if latents.ndim != 5 or latents.shape[axis] != cfg.latent_channels:
        layout = "[B, F, h, w, C]" if channels_last else "[B, C, F, h, w]"
        raise ValueError(f"latents must be {layout} with C = {cfg.latent_channels}, got {latents.shape=}")
    z = latents if channels_last else to_last(latents)
    if unnormalize:
        z = unnormalize_latents(z, cfg, channel_axis=-1)
    graphdef, state = nnx.split(vae)
    run = lambda t: _decode_jit(graphdef, state, t, frames_per_chunk=frames_per_chunk)  # noqa: E731
    f = cfg.spatial_factor
    h, w = z.shape[2], z.shape[3]
    if tiling is not None and (w > tiling.min_width // f or h > tiling.min_height // f):
        video = tiled_2d(
            run,
            z,
            (tiling.min_height // f, tiling.min_width // f),
            (tiling.stride_height // f, tiling.stride_width // f),
            (tiling.min_height - tiling.stride_height, tiling.min_width - tiling.stride_width),
            (tiling.stride_height, tiling.stride_width),
            (h * f, w * f),
        )
    else:
        video = run(z)
    if clip:
        video = jnp.clip(video, -1.0, 1.0)
    return video if channels_last else to_first(video)


def encode_moments(
    vae: MochiVAE, video: jax.Array, *, tiling: MochiTiling | None = None, channels_last: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Posterior (mean, log-variance) of a video in the raw latent space (jitted; tiles like diffusers'
    ``tiled_encode`` when ``tiling`` is given and the video is larger than a tile).

    Args:
        vae: The VAE (with an encoder).
        video: [B, 3, 6k + 1, H, W] in [-1, 1] ([B, T, H, W, 3] with ``channels_last``); H, W multiples of 8.
        tiling: Spatial tiling; None encodes the full frame at once (diffusers' default).
        channels_last: Layout of the video and the returned moments.

    Returns:
        (mean, logvar), each [B, 12, k + 1, H/8, W/8] (channels last with ``channels_last``).
    """
    cfg = vae.config
    axis = -1 if channels_last else 1
    if video.ndim != 5 or video.shape[axis] != cfg.video_channels:
        layout = "[B, T, H, W, C]" if channels_last else "[B, C, T, H, W]"
        raise ValueError(f"video must be {layout} with C = {cfg.video_channels}, got {video.shape=}")
    x = video if channels_last else to_last(video)
    latent_frames(x.shape[1], cfg)
    f = cfg.spatial_factor
    h, w = x.shape[2], x.shape[3]
    if h % f or w % f:
        raise ValueError(f"video height and width must be divisible by {f}, got {h}x{w}")
    graphdef, state = nnx.split(vae)

    def run(t: jax.Array) -> jax.Array:
        return jnp.concatenate(_encode_jit(graphdef, state, t), axis=-1)

    if tiling is not None and (w > tiling.min_width or h > tiling.min_height):
        tile_min = (tiling.min_height // f, tiling.min_width // f)
        tile_stride = (tiling.stride_height // f, tiling.stride_width // f)
        blend = (tile_min[0] - tile_stride[0], tile_min[1] - tile_stride[1])
        tiles, strides = (tiling.min_height, tiling.min_width), (tiling.stride_height, tiling.stride_width)
        moments = tiled_2d(run, x, tiles, strides, blend, tile_stride, (h // f, w // f))
    else:
        moments = run(x)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    if not channels_last:
        mean, logvar = to_first(mean), to_first(logvar)
    return mean, logvar


def encode(
    vae: MochiVAE,
    video: jax.Array,
    *,
    rng: jax.Array | None = None,
    normalize: bool = False,
    tiling: MochiTiling | None = None,
    channels_last: bool = False,
) -> jax.Array:
    """Encodes a video into Mochi latents: the posterior mean (diffusers' ``latent_dist.mode()``), or a sample.

    Args:
        vae: The VAE (with an encoder).
        video: [B, 3, 6k + 1, H, W] in [-1, 1] ([B, T, H, W, 3] with ``channels_last``).
        rng: When given, returns ``mean + exp(logvar / 2) * noise`` instead of the mean.
        normalize: Return ``normalize_latents`` of the result (the transformer's latent space).
        tiling: Spatial tiling, see ``encode_moments``.
        channels_last: Layout of the video and the returned latents.

    Returns:
        Latents [B, 12, k + 1, H/8, W/8] ([B, k + 1, H/8, W/8, 12] with ``channels_last``).
    """
    mean, logvar = encode_moments(vae, video, tiling=tiling, channels_last=channels_last)
    z = mean
    if rng is not None:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    if normalize:
        z = normalize_latents(z, vae.config, channel_axis=-1 if channels_last else 1)
    return z


def load(path: str | os.PathLike, *, dtype=None) -> MochiVAE:
    """The MochiVAE written by ``python -m convert_weights mochi-vae`` (built on ``nnx.eval_shape``).

    Args:
        path: A converted checkpoint directory (orbax ``params/`` + ``manifest.json`` with model ``mochi_vae``).
        dtype: Parameter and compute dtype; None keeps the stored dtype and computes in it.

    Raises:
        ValueError: When the directory holds another model or its arrays do not match the config.
    """
    return load_converted(path, model=MODEL, config_cls=MochiVAEConfig, module_cls=MochiVAE, dtype=dtype)
