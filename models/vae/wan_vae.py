"""The Wan2.1 video VAE (diffusers ``AutoencoderKLWan``) in Flax NNX, channels-last.

A causal 3-D convolutional autoencoder: 8x spatial and 4x temporal compression into 16 latent channels, RMS norms
(L2 normalisation over channels times ``sqrt(C) * gamma``), SiLU, and a single-head per-frame self-attention in
the middle of encoder and decoder. Frames ``4k + 1`` map to ``k + 1`` latent frames.

Chunking follows the release exactly, because it changes the numerics: the encoder sees the first frame alone,
then 4-frame chunks; the decoder sees one latent frame at a time. Every causal convolution keeps the last frames
of its input (two, or one for the temporal downsampler) as a cache carried from chunk to chunk; the first chunk
runs with empty caches (zero padding), and the temporal resamplers pass the first chunk through without their
time convolution. Here the first chunk is one traced call and the remaining chunks are one ``jax.lax.scan`` whose
carry is the cache pytree, so a video of any length compiles the chunk body once.

Layouts: inside the module everything is [B, T, H, W, C]. The public ``encode`` / ``decode`` functions take the
diffusers / Wan transformer layout [B, C, T, H, W] (or channels-last with ``channels_last=True``) and apply the
Wan pipelines' latent normalisation ``(z - latents_mean) / latents_std``.
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
from models.vae.common import chunked, load_converted, to_first, to_last

# Per-channel statistics of the Wan2.1 latent space (diffusers AutoencoderKLWan defaults / Wan2.1 release).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

Cache = Any  # nested tuples of [B, T_cache, H, W, C] arrays (None where a layer keeps nothing)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig(common.DictConfig):
    """Architecture and latent statistics of a Wan2.1 VAE (diffusers ``AutoencoderKLWan`` fields).

    Attributes:
        base_dim: Width of the first encoder level (and of the last decoder level).
        z_dim: Latent channels (the encoder emits 2 * z_dim: posterior mean and log-variance).
        dim_mult: Width multiplier of each resolution level, highest resolution first.
        num_res_blocks: Residual blocks per encoder level (the decoder has one more per level).
        temperal_downsample: Per level transition (len(dim_mult) - 1 of them), whether the encoder also halves
            the frame count there; the decoder mirrors it. Spelling as in diffusers.
        in_channels: Video channels into the encoder.
        out_channels: Video channels out of the decoder.
        latents_mean: Per-channel mean subtracted when entering the normalised latent space.
        latents_std: Per-channel standard deviation divided out when entering the normalised latent space.
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self):
        for name in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if min(self.base_dim, self.z_dim, self.num_res_blocks, self.in_channels, self.out_channels) < 1:
            raise ValueError(f"WanVAEConfig has a non-positive size: {self}")
        if not self.dim_mult or min(self.dim_mult) < 1:
            raise ValueError(f"dim_mult must be non-empty positive ints, got {self.dim_mult}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample needs {len(self.dim_mult) - 1} entries, got {self.temperal_downsample}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean / latents_std need z_dim={self.z_dim} entries")
        if min(self.latents_std) <= 0:
            raise ValueError("latents_std must be positive")
        for i, d in enumerate(self.dims_decoder[1:-1]):
            if d % 2:
                raise ValueError(f"decoder level {i} width {d} must be even (the upsamplers halve it)")

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first."""
        return 2 ** sum(self.temperal_downsample)

    @property
    def dims_encoder(self) -> tuple[int, ...]:
        """Encoder widths: conv_in output, then each level's output."""
        return tuple(self.base_dim * m for m in (1, *self.dim_mult))

    @property
    def dims_decoder(self) -> tuple[int, ...]:
        """Decoder widths: conv_in output, then each level's output."""
        return tuple(self.base_dim * m for m in (self.dim_mult[-1], *reversed(self.dim_mult)))

    def latent_frames(self, frames: int) -> int:
        """Latent frames for ``frames`` video frames (which must be ``temporal_factor * k + 1``)."""
        return common.latent_frames(frames, self.temporal_factor)


WAN21_VAE = WanVAEConfig()
"""Wan2.1 VAE: ``Wan2.1_VAE.pth`` / the ``vae`` folder of the Wan2.1 diffusers repos (also used by Wan2.2 14B)."""

WAN_VAE_TINY = WanVAEConfig(base_dim=4, z_dim=4, latents_mean=(-0.5, 0.25, 1.0, 0.0), latents_std=(2.0, 0.5, 1.5, 1.0))
"""Test-sized config with the Wan2.1 structure (levels, blocks, resamplers, widths 4/8/16/16), 4 latent channels."""


class RMSNorm(nnx.Module):
    """``x / max(||x||_2, 1e-12) * sqrt(C) * gamma`` over the channel axis (last); statistics in float32."""

    def __init__(self, dim: int, *, param_dtype):
        self.gamma = nnx.Param(jnp.ones((dim,), param_dtype))
        self.scale = math.sqrt(dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        sumsq = jnp.sum(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.maximum(sumsq, jnp.float32(1e-24))) * jnp.float32(self.scale)
        g = self.gamma[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        return (y * g).astype(x.dtype)


class CausalConv3d(nnx.Module):
    """3-D convolution, causal in time through a cache of the previous input frames.

    The input of a call is ``concat(cache, x)`` along time (the cache is zeros on the first chunk, which is the
    release's causal zero padding), convolved with no temporal padding; the new cache is the last
    ``cache_frames`` frames of that input.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: tuple[int, int, int],
        *,
        cache_frames: int,
        time_stride: int = 1,
        rngs: nnx.Rngs,
        dtype,
        param_dtype,
    ):
        kt, kh, kw = kernel
        fan_in = cin * kt * kh * kw
        self.kernel = nnx.Param(
            jax.random.normal(rngs.params(), (kt, kh, kw, cin, cout), param_dtype) / math.sqrt(fan_in)
        )
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype))
        self.cache_frames = cache_frames
        self.time_stride = time_stride
        self.dtype = dtype

    def __call__(self, x: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """x [B, T, H, W, Cin], cache [B, cache_frames, H, W, Cin] or None -> (y [B, T', H, W, Cout], new cache)."""
        if cache is None:
            cache = jnp.zeros((x.shape[0], self.cache_frames, *x.shape[2:]), x.dtype)
        xc = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        kt, kh, kw = self.kernel.shape[:3]
        y = jax.lax.conv_general_dilated(
            xc.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.time_stride, 1, 1),
            padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
        y = y + self.bias[...].astype(y.dtype).reshape(1, 1, 1, 1, -1)
        return y, xc[:, xc.shape[1] - self.cache_frames :]


class Conv2d(nnx.Module):
    """Per-frame 3x3 convolution on [B, T, H, W, C] with explicit spatial padding ((top, bottom), (left, right))."""

    def __init__(self, cin: int, cout: int, *, stride: int, padding, rngs: nnx.Rngs, dtype, param_dtype):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (3, 3, cin, cout), param_dtype) / math.sqrt(9 * cin))
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype))
        self.stride = stride
        self.padding = tuple(tuple(p) for p in padding)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t = x.shape[:2]
        y = jax.lax.conv_general_dilated(
            x.reshape(b * t, *x.shape[2:]).astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        y = y + self.bias[...].astype(y.dtype).reshape(1, 1, 1, -1)
        return y.reshape(b, t, *y.shape[1:])


def _conv3(cin: int, cout: int, kw: dict) -> CausalConv3d:
    return CausalConv3d(cin, cout, (3, 3, 3), cache_frames=2, **kw)


def _pointwise(cin: int, cout: int, kw: dict) -> nnx.Linear:
    # A 1x1(x1) convolution is a matmul over the channel axis.
    return nnx.Linear(cin, cout, **kw)


class ResidualBlock(nnx.Module):
    """``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`` with causal convs; pointwise shortcut when
    the width changes."""

    def __init__(self, cin: int, cout: int, kw: dict):
        self.norm1 = RMSNorm(cin, param_dtype=kw["param_dtype"])
        self.conv1 = _conv3(cin, cout, kw)
        self.norm2 = RMSNorm(cout, param_dtype=kw["param_dtype"])
        self.conv2 = _conv3(cout, cout, kw)
        self.shortcut = _pointwise(cin, cout, kw) if cin != cout else None

    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        c1, c2 = (None, None) if cache is None else cache
        h = x if self.shortcut is None else self.shortcut(x)
        y, c1 = self.conv1(jax.nn.silu(self.norm1(x)), c1)
        y, c2 = self.conv2(jax.nn.silu(self.norm2(y)), c2)
        return y + h, (c1, c2)


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time), pre-RMS-norm, residual."""

    def __init__(self, dim: int, kw: dict):
        self.norm = RMSNorm(dim, param_dtype=kw["param_dtype"])
        self.to_qkv = _pointwise(dim, 3 * dim, kw)
        self.proj = _pointwise(dim, dim, kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c)  # [BT, N, 3C]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * jnp.float32(c**-0.5)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = self.proj(jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + out.reshape(b, t, h, w, c)


class Resample(nnx.Module):
    """2x spatial down/upsampling, with a causal temporal 2x for the ``*3d`` modes.

    ``downsample3d``: pad bottom/right, stride-2 3x3 conv per frame, then a (3, 1, 1) stride-2 time conv over
    ``[last frame of the previous chunk] + chunk`` (the first chunk passes through unchanged).
    ``upsample3d``: a (3, 1, 1) causal time conv to 2C channels whose two halves become frames 2t and 2t+1 (not on
    the first chunk, whose cache stays zeros), then nearest 2x and a 3x3 conv to C/2 channels.
    """

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str, kw: dict):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("down"):
            self.conv = Conv2d(dim, dim, stride=2, padding=((0, 1), (0, 1)), **kw)
        else:
            self.conv = Conv2d(dim, dim // 2, stride=1, padding=((1, 1), (1, 1)), **kw)
        if mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), cache_frames=1, time_stride=2, **kw)
        elif mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), cache_frames=2, **kw)
        else:
            self.time_conv = None

    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        if self.mode == "upsample3d":
            if cache is None:
                cache = jnp.zeros((x.shape[0], 2, *x.shape[2:]), x.dtype)
            else:
                y, cache = self.time_conv(x, cache)  # [B, T, H, W, 2C]
                b, t, h, w, c2 = y.shape
                y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5)  # [B, T, 2, H, W, C]
                x = y.reshape(b, 2 * t, h, w, c2 // 2)
        if self.mode.startswith("up"):
            x = self.conv(jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3))
        else:
            x = self.conv(x)
        if self.mode == "downsample3d":
            if cache is None:
                cache = x[:, -1:]
            else:
                x, cache = self.time_conv(x, cache)
        return x, cache


class MidBlock(nnx.Module):
    """Residual block, attention, residual block at the lowest resolution."""

    def __init__(self, dim: int, kw: dict):
        self.resnet_0 = ResidualBlock(dim, dim, kw)
        self.attention = AttentionBlock(dim, kw)
        self.resnet_1 = ResidualBlock(dim, dim, kw)

    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        c0, c1 = (None, None) if cache is None else cache
        x, c0 = self.resnet_0(x, c0)
        x, c1 = self.resnet_1(self.attention(x), c1)
        return x, (c0, c1)


def _run_layers(layers, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    new = []
    for i, layer in enumerate(layers):
        x, c = layer(x, None if cache is None else cache[i])
        new.append(c)
    return x, tuple(new)


class Encoder(nnx.Module):
    """Video chunk [B, T, H, W, in] -> posterior moments [B, T', H/f, W/f, 2 * z_dim], with caches.

    ``down_blocks`` is the flat list of the release: per level, ``num_res_blocks`` residual blocks then (except
    at the last level) a Resample.
    """

    def __init__(self, config: WanVAEConfig, kw: dict):
        dims = config.dims_encoder
        self.conv_in = _conv3(config.in_channels, dims[0], kw)
        layers: list[nnx.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(config.num_res_blocks):
                layers.append(ResidualBlock(cin, cout, kw))
                cin = cout
            if i < len(config.dim_mult) - 1:
                layers.append(Resample(cout, "downsample3d" if config.temperal_downsample[i] else "downsample2d", kw))
        self.down_blocks = nnx.List(layers)
        self.mid_block = MidBlock(dims[-1], kw)
        self.norm_out = RMSNorm(dims[-1], param_dtype=kw["param_dtype"])
        self.conv_out = _conv3(dims[-1], 2 * config.z_dim, kw)

    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        c_in, c_down, c_mid, c_out = (None,) * 4 if cache is None else cache
        x, c_in = self.conv_in(x, c_in)
        x, c_down = _run_layers(self.down_blocks, x, c_down)
        x, c_mid = self.mid_block(x, c_mid)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), c_out)
        return x, (c_in, c_down, c_mid, c_out)


class UpBlock(nnx.Module):
    """``num_res_blocks + 1`` residual blocks, then an optional Resample that halves the width."""

    def __init__(self, cin: int, cout: int, num_resnets: int, mode: str | None, kw: dict):
        resnets = []
        for _ in range(num_resnets):
            resnets.append(ResidualBlock(cin, cout, kw))
            cin = cout
        self.resnets = nnx.List(resnets)
        self.upsampler = None if mode is None else Resample(cout, mode, kw)

    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        c_res, c_up = (None, None) if cache is None else cache
        x, c_res = _run_layers(self.resnets, x, c_res)
        if self.upsampler is not None:
            x, c_up = self.upsampler(x, c_up)
        return x, (c_res, c_up)


class Decoder(nnx.Module):
    """Latent chunk [B, T, h, w, z_dim] -> video frames [B, T', h*f, w*f, out], with caches."""

    def __init__(self, config: WanVAEConfig, kw: dict):
        dims = config.dims_decoder
        upsample = tuple(reversed(config.temperal_downsample))
        self.conv_in = _conv3(config.z_dim, dims[0], kw)
        self.mid_block = MidBlock(dims[0], kw)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                cin //= 2  # the previous level's upsampler halved the width
            mode = None
            if i < len(config.dim_mult) - 1:
                mode = "upsample3d" if upsample[i] else "upsample2d"
            blocks.append(UpBlock(cin, cout, config.num_res_blocks + 1, mode, kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], param_dtype=kw["param_dtype"])
        self.conv_out = _conv3(dims[-1], config.out_channels, kw)

    def __call__(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        c_in, c_mid, c_up, c_out = (None,) * 4 if cache is None else cache
        x, c_in = self.conv_in(x, c_in)
        x, c_mid = self.mid_block(x, c_mid)
        x, c_up = _run_layers(self.up_blocks, x, c_up)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), c_out)
        return x, (c_in, c_mid, c_up, c_out)


class WanVAE(nnx.Module):
    """Wan2.1 VAE: encoder, quant convs and decoder; weights only (use the module functions ``encode`` and
    ``decode`` to run it under jit)."""

    def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        """Creates randomly initialised weights.

        Args:
            config: Architecture and latent statistics.
            rngs: Initialisation randomness.
            dtype: Compute dtype (norms and softmax run in float32).
            param_dtype: Storage dtype of the weights.
        """
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.encoder = Encoder(config, kw)
        self.quant_conv = _pointwise(2 * config.z_dim, 2 * config.z_dim, kw)
        self.post_quant_conv = _pointwise(config.z_dim, config.z_dim, kw)
        self.decoder = Decoder(config, kw)

    def encode_moments(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Video -> posterior (mean, log-variance) in the raw latent space, chunked as the release.

        Args:
            video: [B, T, H, W, in_channels] in [-1, 1]; T = 4k + 1; H, W divisible by ``config.spatial_factor``.

        Returns:
            (mean, logvar), each [B, k + 1, H/f, W/f, z_dim].
        """
        cfg = self.config
        b, t, h, w, c = video.shape
        f = cfg.spatial_factor
        cfg.latent_frames(t)
        if c != cfg.in_channels or h % f or w % f:
            raise ValueError(
                f"video must be [B, T, H, W, {cfg.in_channels}] with H, W divisible by {f}: {video.shape=}"
            )
        n, tf = (t - 1) // cfg.temporal_factor, cfg.temporal_factor
        rest = None if n == 0 else jnp.moveaxis(video[:, 1:].reshape(b, n, tf, h, w, c), 1, 0)  # [n, B, tf, H, W, C]
        moments = self.quant_conv(chunked(self.encoder, video[:, :1], rest))
        return moments[..., : cfg.z_dim], moments[..., cfg.z_dim :]

    def decode_raw(self, z: jax.Array) -> jax.Array:
        """Raw latents -> video, one latent frame per chunk as the release, clipped to [-1, 1].

        Args:
            z: [B, F, h, w, z_dim] (not normalised).

        Returns:
            [B, 4(F - 1) + 1, h*f, w*f, out_channels].
        """
        cfg = self.config
        if z.ndim != 5 or z.shape[-1] != cfg.z_dim:
            raise ValueError(f"latents must be [B, F, h, w, {cfg.z_dim}], got {z.shape=}")
        x = self.post_quant_conv(z)
        rest = None if z.shape[1] == 1 else jnp.moveaxis(x[:, 1:, None], 1, 0)  # [F-1, B, 1, h, w, C]
        return jnp.clip(chunked(self.decoder, x[:, :1], rest), -1.0, 1.0)


def _stats(config: WanVAEConfig, ndim_before: int, dtype) -> tuple[jax.Array, jax.Array]:
    shape = (1,) * ndim_before + (config.z_dim,)
    mean = jnp.asarray(config.latents_mean, jnp.float32).reshape(shape)
    std = jnp.asarray(config.latents_std, jnp.float32).reshape(shape)
    return mean.astype(dtype), std.astype(dtype)


def normalize_latents(z: jax.Array, config: WanVAEConfig) -> jax.Array:
    """Raw latents [..., z_dim] (channels last) -> ``(z - latents_mean) / latents_std``."""
    mean, std = _stats(config, z.ndim - 1, z.dtype)
    return (z - mean) / std


def denormalize_latents(latents: jax.Array, config: WanVAEConfig) -> jax.Array:
    """Normalised latents [..., z_dim] (channels last) -> ``latents * latents_std + latents_mean``."""
    mean, std = _stats(config, latents.ndim - 1, latents.dtype)
    return latents * std + mean


@jax.jit(static_argnames=("graphdef", "normalize", "channels_last", "sample"))
def _encode_jit(graphdef, state, video, rng, *, normalize, channels_last, sample):
    vae = nnx.merge(graphdef, state)
    x = video if channels_last else to_last(video)
    mean, logvar = vae.encode_moments(x)
    z = mean
    if sample:
        z = mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jax.random.normal(rng, mean.shape, mean.dtype)
    if normalize:
        z = normalize_latents(z, vae.config)
    return z if channels_last else to_first(z)


@jax.jit(static_argnames=("graphdef", "normalize", "channels_last"))
def _decode_jit(graphdef, state, latents, *, normalize, channels_last):
    vae = nnx.merge(graphdef, state)
    z = latents if channels_last else to_last(latents)
    if normalize:
        z = denormalize_latents(z, vae.config)
    video = vae.decode_raw(z)
    return video if channels_last else to_first(video)


def encode(
    vae: WanVAE,
    video: jax.Array,
    *,
    rng: jax.Array | None = None,
    normalize: bool = True,
    channels_last: bool = False,
) -> jax.Array:
    """Encodes a video into Wan latents (jitted; one compilation per shape).

    Args:
        vae: The VAE.
        video: [B, 3, T, H, W] in [-1, 1] ([B, T, H, W, 3] with ``channels_last``); T = 4k + 1, H and W
            divisible by 8.
        rng: When given, samples from the posterior; otherwise returns its mean (the Wan pipelines' choice).
        normalize: Return ``(z - latents_mean) / latents_std`` (the transformer's latent space); False gives the
            raw posterior mean / sample.
        channels_last: Layout of both the video and the returned latents.

    Returns:
        Latents [B, 16, k + 1, H/8, W/8] ([B, k + 1, H/8, W/8, 16] with ``channels_last``).
    """
    graphdef, state = nnx.split(vae)
    key = jax.random.key(0) if rng is None else rng
    return _encode_jit(
        graphdef, state, video, key, normalize=normalize, channels_last=channels_last, sample=rng is not None
    )


def decode(vae: WanVAE, latents: jax.Array, *, normalize: bool = True, channels_last: bool = False) -> jax.Array:
    """Decodes Wan latents into a video in [-1, 1] (jitted; one compilation per shape).

    Args:
        vae: The VAE.
        latents: [B, 16, F, h, w] as the Wan transformer produces them ([B, F, h, w, 16] with ``channels_last``).
        normalize: The latents are in the normalised space, so ``latents * latents_std + latents_mean`` is applied
            first (as the diffusers Wan pipeline does); False decodes raw latents.
        channels_last: Layout of both the latents and the returned video.

    Returns:
        Video [B, 3, 4(F - 1) + 1, 8h, 8w] ([B, T, H, W, 3] with ``channels_last``), clipped to [-1, 1], in the
        compute dtype.
    """
    z_axis = -1 if channels_last else 1
    if latents.ndim != 5 or latents.shape[z_axis] != vae.config.z_dim:
        layout = "[B, F, h, w, C]" if channels_last else "[B, C, F, h, w]"
        raise ValueError(f"latents must be {layout} with C = {vae.config.z_dim}, got {latents.shape=}")
    graphdef, state = nnx.split(vae)
    return _decode_jit(graphdef, state, latents, normalize=normalize, channels_last=channels_last)


MODEL = "wan_vae"


def load(path: str | os.PathLike, *, dtype=None) -> WanVAE:
    """The WanVAE written by ``python -m convert_weights wan-vae`` (built on ``nnx.eval_shape``, no random init).

    Args:
        path: A converted checkpoint directory (orbax ``params/`` + ``manifest.json`` with model ``wan_vae``).
        dtype: Parameter and compute dtype; None keeps the stored parameter dtype and computes in it.

    Returns:
        The filled VAE.

    Raises:
        ValueError: When the directory holds another model or its arrays do not match the config.
    """
    return load_converted(path, model=MODEL, config_cls=WanVAEConfig, module_cls=WanVAE, dtype=dtype)
