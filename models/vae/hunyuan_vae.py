"""The HunyuanVideo causal 3-D VAE (diffusers ``AutoencoderKLHunyuanVideo``) in Flax NNX, channels-last.

A causal 3-D convolutional autoencoder: 8x spatial and 4x temporal compression into 16 latent channels, the first
frame kept on its own (frames ``4k + 1`` <-> ``k + 1`` latent frames). Its parts, as in diffusers:

* Causal Conv3d: before every 3x3x3 convolution the input is padded by *replicating* its edge values: two copies
  of the first frame in front (nothing behind, so no frame sees the future) and one row / column on each
  spatial side. 1x1x1 convolutions (shortcuts, quant convs) are matmuls over the channel axis.
* GroupNorm (eps 1e-6, affine) whose statistics run over the groups' channels and ALL frames and pixels of the
  clip (not per frame), then SiLU; residual blocks ``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``.
* Mid-block attention: one head of width C over every voxel of the clip, GroupNorm'ed, with the frame-causal
  mask diffusers builds (``prepare_causal_attention_mask``): a query in frame t sees every pixel of frames
  ``<= t``. Here it is computed one query frame at a time (``lax.map``) so the score matrix is never [N, N].
* Downsampling: a stride-(2|1, 2, 2) causal conv (frames ``2k + 1 -> k + 1`` with the replicate padding).
  Upsampling: the first frame is repeated 2x in space only, the other frames 2x in time and space (nearest),
  then a causal conv: ``k + 1 -> 2k + 1`` frames.

Tiling (``Tiling``) reproduces diffusers' ``tiled_decode`` / ``_temporal_tiled_decode`` (and the encode
counterparts) exactly: same default tile sizes, strides and linear blends, and the same defaults (temporal
tiling on, spatial tiling off until ``enable_tiling``), because the GroupNorm statistics and the attention depend
on the tile, so tiling changes the numbers. Each tile runs through one jitted function per tile shape; the tiles
are driven from Python, so a tiled decode holds one tile's activations at a time (its memory purpose) and
compiles at most a few tile shapes whatever the video size.

Layouts: inside the module everything is [B, T, H, W, C]. The public ``encode`` / ``decode`` take the diffusers /
HunyuanVideo transformer layout [B, C, T, H, W] (or channels-last with ``channels_last=True``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.vae import common
from models.vae.common import blend, load_converted, tiled_2d

SCALING_FACTOR = 0.476986
"""HunyuanVideo's latent scale: the transformer works on ``raw_latents * SCALING_FACTOR``."""

GROUP_NORM_EPS = 1e-6
MODEL = "hunyuan_vae"


def latent_frames(frames: int, temporal_ratio: int = 4) -> int:
    """Latent frames for ``frames`` video frames, which must be ``temporal_ratio * k + 1`` (the first frame is
    kept alone): 1 -> 1, 5 -> 2, 129 -> 33."""
    return common.latent_frames(frames, temporal_ratio)


def frames_for_latents(latent_frames: int, temporal_ratio: int = 4) -> int:
    """Video frames decoded from ``latent_frames`` latent frames: ``temporal_ratio * (F - 1) + 1``."""
    return common.frames_for_latents(latent_frames, temporal_ratio)


@dataclasses.dataclass(frozen=True)
class HunyuanVAEConfig(common.DictConfig):
    """Architecture of a HunyuanVideo VAE (diffusers ``AutoencoderKLHunyuanVideo`` fields; defaults = release).

    Attributes:
        in_channels: Video channels into the encoder.
        out_channels: Video channels out of the decoder.
        latent_channels: Latent channels (the encoder emits twice as many: posterior mean and log-variance).
        block_out_channels: Width of each encoder level (highest resolution first); the decoder mirrors it.
        layers_per_block: Residual blocks per encoder level (the decoder has one more per level).
        norm_num_groups: GroupNorm groups (must divide every width).
        scaling_factor: Latent scale of the transformer's latent space.
        spatial_compression_ratio: Pixels per latent along H and W (a power of two).
        temporal_compression_ratio: Frames per latent frame after the first (4; diffusers' decoder supports no
            other).
        mid_block_add_attention: Whether the mid blocks have their attention layer.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = SCALING_FACTOR
    spatial_compression_ratio: int = 8
    temporal_compression_ratio: int = 4
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        sizes = (self.in_channels, self.out_channels, self.latent_channels, self.layers_per_block, self.norm_num_groups)
        if min(sizes) < 1 or not self.block_out_channels or min(self.block_out_channels) < 1:
            raise ValueError(f"HunyuanVAEConfig has a non-positive size: {self}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block width, not {bad}")
        if self.temporal_compression_ratio != 4:
            raise ValueError(
                f"temporal_compression_ratio must be 4 (the only one diffusers' HunyuanVideo decoder builds), "
                f"got {self.temporal_compression_ratio}"
            )
        s = self.spatial_compression_ratio
        if s < 1 or s & (s - 1):
            raise ValueError(f"spatial_compression_ratio must be a power of two, got {s}")
        strides = [st for st in self.down_strides if st is not None]
        got = (math.prod(st[1] for st in strides), math.prod(st[0] for st in strides))
        if got != (s, self.temporal_compression_ratio):
            raise ValueError(
                f"{len(self.block_out_channels)} levels give spatial x{got[0]} and temporal x{got[1]}, not the "
                f"configured x{s} / x{self.temporal_compression_ratio}; use more levels (the release has 4)"
            )
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")

    @property
    def down_strides(self) -> tuple[tuple[int, int] | None, ...]:
        """Per encoder level, the (time, space) stride of its downsampler, or None (diffusers' formula; the
        decoder's up factors are the same list)."""
        n = len(self.block_out_channels)
        n_space = int(math.log2(self.spatial_compression_ratio))
        n_time = int(math.log2(self.temporal_compression_ratio))
        out = []
        for i in range(n):
            space = i < n_space
            time = n - 1 - n_time <= i < n - 1
            out.append((2 if time else 1, 2 if space else 1) if (space or time) else None)
        return tuple(out)


HUNYUAN_VAE = HunyuanVAEConfig()
"""The HunyuanVideo release VAE (``hunyuan-video-t2v-720p/vae``, diffusers ``hunyuanvideo-community/HunyuanVideo``
``vae/``): 246,478,803 parameters."""


def release_config() -> HunyuanVAEConfig:
    """The released HunyuanVideo VAE's architecture (``HUNYUAN_VAE``)."""
    return HUNYUAN_VAE


def tiny_config(**overrides) -> HunyuanVAEConfig:
    """A test-sized VAE with the release structure (4 levels, the same down/up sampling, shortcut convs, mid
    attention): widths 8/16/16/16, 4 GroupNorm groups, one residual block per level, 4 latent channels."""
    fields = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    return HunyuanVAEConfig(**{**fields, **overrides})


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tiled encode / decode settings, in video pixels and frames (diffusers' ``enable_tiling`` arguments).

    The defaults are diffusers' defaults: temporal tiling on (``use_framewise_*``), spatial tiling off
    (``use_tiling``), 256x256 px tiles every 192 px, 16-frame tiles every 12 frames. ``Tiling(spatial=True)``
    is ``vae.enable_tiling()``, which the HunyuanVideo pipeline examples call (needed at 720p: the mid-block
    attention spans the whole tile).

    Attributes:
        spatial: Split H and W into overlapping tiles when the input is larger than one tile.
        temporal: Split time into overlapping tiles when the input has more frames than one tile.
        min_height / min_width / min_frames: Tile size (a tile spans ``min_frames + 1`` frames in time).
        stride_height / stride_width / stride_frames: Tile step; ``min - stride`` pixels / frames are blended
            linearly between neighbouring tiles.
    """

    spatial: bool = False
    temporal: bool = True
    min_height: int = 256
    min_width: int = 256
    min_frames: int = 16
    stride_height: int = 192
    stride_width: int = 192
    stride_frames: int = 12

    def check(self, config: HunyuanVAEConfig) -> None:
        """Raises ValueError unless the sizes are positive multiples of the compression ratios, stride <= min."""
        s, t = config.spatial_compression_ratio, config.temporal_compression_ratio
        for name, m, st, f in (
            ("height", self.min_height, self.stride_height, s),
            ("width", self.min_width, self.stride_width, s),
            ("frames", self.min_frames, self.stride_frames, t),
        ):
            if m < f or st < f or m % f or st % f or st > m:
                raise ValueError(
                    f"Tiling min_{name}={m} / stride_{name}={st} must be positive multiples of {f} with stride <= min"
                )


DEFAULT_TILING = Tiling()
"""diffusers' defaults: temporal tiles above 16 frames (4 latent frames), no spatial tiles."""

SPATIAL_TILING = Tiling(spatial=True)
"""diffusers after ``vae.enable_tiling()`` with its default sizes (what the HunyuanVideo examples use)."""

NO_TILING = Tiling(spatial=False, temporal=False)
"""Whole-clip encode / decode (what diffusers does with ``use_framewise_*`` and ``use_tiling`` off)."""


class Posterior(NamedTuple):
    """The encoder's diagonal Gaussian over raw latents ([B, C, F, h, w] or channels-last)."""

    mean: jax.Array
    logvar: jax.Array  # clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution

    def sample(self, rng: jax.Array) -> jax.Array:
        """``mean + exp(logvar / 2) * eps``."""
        eps = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
        return self.mean + jnp.exp(0.5 * self.logvar) * eps


# ---------------------------------------------------------------------------------------------------------
# Layers.


class GroupNorm(nnx.Module):
    """GroupNorm over [B, T, H, W, C]: statistics per sample and group over (T, H, W, C/G), in float32."""

    def __init__(self, dim: int, groups: int, *, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.groups = groups

    def __call__(self, x: jax.Array) -> jax.Array:
        b, c = x.shape[0], x.shape[-1]
        g = self.groups
        x32 = x.astype(jnp.float32).reshape(b, -1, g, c // g)  # [B, THW, G, C/G]
        mean = jnp.mean(x32, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=(1, 3), keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + jnp.float32(GROUP_NORM_EPS))).reshape(x.shape)
        bshape = (1,) * (x.ndim - 1) + (c,)
        scale = self.weight[...].astype(jnp.float32).reshape(bshape)
        y = y * scale + self.bias[...].astype(jnp.float32).reshape(bshape)
        return y.astype(x.dtype)


class CausalConv3d(nnx.Module):
    """Cubic 3-D convolution after replicate padding: ``k - 1`` copies of the first frame in front, ``k // 2``
    rows / columns on each spatial side (diffusers ``HunyuanVideoCausalConv3d``)."""

    def __init__(self, cin: int, cout: int, *, kernel: int = 3, stride=(1, 1, 1), rngs: nnx.Rngs, dtype, param_dtype):
        fan_in = cin * kernel**3
        self.kernel = nnx.Param(
            jax.random.normal(rngs.params(), (kernel, kernel, kernel, cin, cout), param_dtype) / math.sqrt(fan_in)
        )
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype))
        self.stride = tuple(stride)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, H, W, Cin] -> [B, T', H', W', Cout]."""
        k = self.kernel.shape[0]
        x = jnp.pad(x, ((0, 0), (k - 1, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode="edge")
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=self.stride,
            padding="VALID",
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
        return y + self.bias[...].astype(y.dtype).reshape(1, 1, 1, 1, -1)


def _pointwise(cin: int, cout: int, kw: dict) -> nnx.Linear:
    # A 1x1x1 convolution is a matmul over the channel axis.
    return nnx.Linear(cin, cout, **kw)


class ResnetBlock(nnx.Module):
    """``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``; 1x1x1 shortcut when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int, kw: dict):
        self.norm1 = GroupNorm(cin, groups, param_dtype=kw["param_dtype"])
        self.conv1 = CausalConv3d(cin, cout, **kw)
        self.norm2 = GroupNorm(cout, groups, param_dtype=kw["param_dtype"])
        self.conv2 = CausalConv3d(cout, cout, **kw)
        self.conv_shortcut = _pointwise(cin, cout, kw) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nnx.Module):
    """Single-head self-attention over all voxels of the clip, frame-causal, GroupNorm'ed input, residual."""

    def __init__(self, dim: int, groups: int, kw: dict):
        self.group_norm = GroupNorm(dim, groups, param_dtype=kw["param_dtype"])
        self.to_q = nnx.Linear(dim, dim, **kw)
        self.to_k = nnx.Linear(dim, dim, **kw)
        self.to_v = nnx.Linear(dim, dim, **kw)
        self.to_out = nnx.Linear(dim, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        y = self.group_norm(x)
        q = self.to_q(y).reshape(b, t, h * w, c)  # [B, T, P, C], P pixels per frame
        k = self.to_k(y).reshape(b, t * h * w, c)  # [B, N, C]
        v = self.to_v(y).reshape(b, t * h * w, c)
        key_frame = jnp.repeat(jnp.arange(t), h * w)  # [N]
        scale = jnp.float32(c**-0.5)

        def one_frame(args):
            qf, tq = args  # [B, P, C], scalar query frame
            s = jnp.einsum("bpc,bnc->bpn", qf, k, preferred_element_type=jnp.float32) * scale
            s = jnp.where((key_frame <= tq)[None, None, :], s, -jnp.inf)
            p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
            return jnp.einsum("bpn,bnc->bpc", p, v)

        o = jax.lax.map(one_frame, (jnp.moveaxis(q, 1, 0), jnp.arange(t)))  # [T, B, P, C]
        o = jnp.moveaxis(o, 0, 1).reshape(b, t, h, w, c)
        return x + self.to_out(o)


class MidBlock(nnx.Module):
    """Residual block, (attention), residual block at the lowest resolution."""

    def __init__(self, dim: int, groups: int, attention: bool, kw: dict):
        self.resnets = nnx.List([ResnetBlock(dim, dim, groups, kw) for _ in range(2)])
        self.attention = Attention(dim, groups, kw) if attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class Upsample(nnx.Module):
    """Nearest upsampling by (ft, 2|1, 2|1), the first frame in space only, then a causal conv."""

    def __init__(self, dim: int, factor: tuple[int, int], kw: dict):
        self.factor = factor  # (time, space)
        self.conv = CausalConv3d(dim, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        ft, fs = self.factor
        x = jnp.repeat(jnp.repeat(x, fs, axis=2), fs, axis=3)
        x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], ft, axis=1)], axis=1)
        return self.conv(x)


class DownBlock(nnx.Module):
    """``layers_per_block`` residual blocks, then an optional strided causal conv."""

    def __init__(self, cin: int, cout: int, stride: tuple[int, int] | None, config: HunyuanVAEConfig, kw: dict):
        g = config.norm_num_groups
        self.resnets = nnx.List(
            [ResnetBlock(cin if j == 0 else cout, cout, g, kw) for j in range(config.layers_per_block)]
        )
        self.downsampler = (
            None if stride is None else CausalConv3d(cout, cout, stride=(stride[0], stride[1], stride[1]), **kw)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        return x if self.downsampler is None else self.downsampler(x)


class UpBlock(nnx.Module):
    """``layers_per_block + 1`` residual blocks, then an optional upsampler."""

    def __init__(self, cin: int, cout: int, factor: tuple[int, int] | None, config: HunyuanVAEConfig, kw: dict):
        g = config.norm_num_groups
        self.resnets = nnx.List(
            [ResnetBlock(cin if j == 0 else cout, cout, g, kw) for j in range(config.layers_per_block + 1)]
        )
        self.upsampler = None if factor is None else Upsample(cout, factor, kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        return x if self.upsampler is None else self.upsampler(x)


class Encoder(nnx.Module):
    """Video [B, T, H, W, in] -> moments before ``quant_conv`` [B, T', H/f, W/f, 2 * latent_channels]."""

    def __init__(self, config: HunyuanVAEConfig, kw: dict):
        ch, g = config.block_out_channels, config.norm_num_groups
        self.conv_in = CausalConv3d(config.in_channels, ch[0], **kw)
        self.down_blocks = nnx.List(
            [DownBlock(ch[max(i - 1, 0)], ch[i], stride, config, kw) for i, stride in enumerate(config.down_strides)]
        )
        self.mid_block = MidBlock(ch[-1], g, config.mid_block_add_attention, kw)
        self.conv_norm_out = GroupNorm(ch[-1], g, param_dtype=kw["param_dtype"])
        self.conv_out = CausalConv3d(ch[-1], 2 * config.latent_channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents (after ``post_quant_conv``) [B, F, h, w, latent] -> video [B, 4(F-1)+1, h*f, w*f, out]."""

    def __init__(self, config: HunyuanVAEConfig, kw: dict):
        ch, g = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = CausalConv3d(config.latent_channels, ch[0], **kw)
        self.mid_block = MidBlock(ch[0], g, config.mid_block_add_attention, kw)
        self.up_blocks = nnx.List(
            [UpBlock(ch[max(i - 1, 0)], ch[i], factor, config, kw) for i, factor in enumerate(config.down_strides)]
        )
        self.conv_norm_out = GroupNorm(ch[-1], g, param_dtype=kw["param_dtype"])
        self.conv_out = CausalConv3d(ch[-1], config.out_channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class HunyuanVAE(nnx.Module):
    """HunyuanVideo VAE: encoder, quant convs and decoder; weights only (``encode`` / ``decode`` run it).

    ``vae.decode(latents)`` and ``vae.encode(video)`` are shorthands for the module functions ``decode(vae, ...)``
    and ``encode(vae, ...)``; ``encode_moments`` / ``decode_raw`` are the unjitted, untiled channels-last cores.
    """

    def __init__(self, config: HunyuanVAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        """Creates randomly initialised weights.

        Args:
            config: The architecture.
            rngs: Initialisation randomness.
            dtype: Compute dtype (norm statistics and softmax run in float32).
            param_dtype: Storage dtype of the weights.
        """
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.encoder = Encoder(config, kw)
        self.quant_conv = _pointwise(2 * config.latent_channels, 2 * config.latent_channels, kw)
        self.post_quant_conv = _pointwise(config.latent_channels, config.latent_channels, kw)
        self.decoder = Decoder(config, kw)

    def encode_moments(self, video: jax.Array) -> jax.Array:
        """Video [B, T, H, W, in] -> moments [B, T', H/f, W/f, 2 * latent] (mean, then unclipped logvar), one tile."""
        return self.quant_conv(self.encoder(video))

    def decode_raw(self, z: jax.Array) -> jax.Array:
        """Raw (unscaled) latents [B, F, h, w, latent] -> video [B, 4(F-1)+1, h*f, w*f, out], one tile, unclipped."""
        return self.decoder(self.post_quant_conv(z))

    def decode(self, latents: jax.Array, **kwargs) -> jax.Array:
        """``decode(self, latents, **kwargs)``."""
        return decode(self, latents, **kwargs)

    def encode(self, video: jax.Array, **kwargs) -> Posterior:
        """``encode(self, video, **kwargs)``."""
        return encode(self, video, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Tiles and their blending (channels-last [B, T, H, W, C] throughout).


@jax.jit(static_argnames=("graphdef",))
def _moments_tile(graphdef, state, video: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).encode_moments(video)


@jax.jit(static_argnames=("graphdef",))
def _decode_tile(graphdef, state, z: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).decode_raw(z)


def _spatial_tiles(run, x: jax.Array, in_tile: tuple[int, int], in_stride: tuple[int, int], out_scale: float):
    """Runs ``run`` on overlapping H/W tiles of ``x`` and blends them (diffusers' ``tiled_encode`` /
    ``tiled_decode``): tile (i, j) is first blended with the finished tile above, then with the finished tile to
    its left, then cropped to the stride. Sizes are in input units; outputs are ``out_scale`` times larger."""
    h, w = x.shape[2:4]
    out_tile = (round(in_tile[0] * out_scale), round(in_tile[1] * out_scale))
    out_stride = (round(in_stride[0] * out_scale), round(in_stride[1] * out_scale))
    overlap = (out_tile[0] - out_stride[0], out_tile[1] - out_stride[1])
    out_hw = (round(h * out_scale), round(w * out_scale))
    return tiled_2d(run, x, in_tile, in_stride, overlap, out_stride, out_hw)


def _temporal_tiles(run, x: jax.Array, in_tile: int, in_stride: int, out_tile: int, out_stride: int, out_len: int):
    """Runs ``run`` on time tiles ``x[:, i : i + in_tile + 1]`` every ``in_stride`` and blends them (diffusers'
    ``_temporal_tiled_*``): later tiles lose their first output frame, are blended over ``out_tile - out_stride``
    frames with the finished previous tile, and are cropped to ``out_stride`` frames (the first to one more)."""
    parts, prev = [], None
    for i in range(0, x.shape[1], in_stride):
        tile = run(x[:, i : i + in_tile + 1])
        if prev is None:
            parts.append(tile[:, : out_stride + 1])
        else:
            tile = blend(prev, tile[:, 1:], out_tile - out_stride, axis=1)
            parts.append(tile[:, :out_stride])
        prev = tile
    return jnp.concatenate(parts, axis=1)[:, :out_len]


def _decode_clip(vae: HunyuanVAE, z: jax.Array, tiling: Tiling) -> jax.Array:
    """Raw latents [B, F, h, w, C] -> video [B, T, H, W, 3], tiled as diffusers' ``_decode``."""
    cfg = vae.config
    s, r = cfg.spatial_compression_ratio, cfg.temporal_compression_ratio
    graphdef, state = nnx.split(vae)

    def run(tile):
        return _decode_tile(graphdef, state, tile)

    lat_tile = (tiling.min_height // s, tiling.min_width // s)
    lat_stride = (tiling.stride_height // s, tiling.stride_width // s)

    def spatial(tile):
        if tiling.spatial and (tile.shape[3] > lat_tile[1] or tile.shape[2] > lat_tile[0]):
            return _spatial_tiles(run, tile, lat_tile, lat_stride, s)
        return run(tile)

    f = z.shape[1]
    if tiling.temporal and f > tiling.min_frames // r:
        return _temporal_tiles(
            spatial,
            z,
            tiling.min_frames // r,
            tiling.stride_frames // r,
            tiling.min_frames,
            tiling.stride_frames,
            frames_for_latents(f, r),
        )
    return spatial(z)


def _encode_clip(vae: HunyuanVAE, video: jax.Array, tiling: Tiling) -> jax.Array:
    """Video [B, T, H, W, 3] -> moments [B, F, h, w, 2C], tiled as diffusers' ``_encode``."""
    cfg = vae.config
    s, r = cfg.spatial_compression_ratio, cfg.temporal_compression_ratio
    graphdef, state = nnx.split(vae)

    def run(tile):
        return _moments_tile(graphdef, state, tile)

    h, w = video.shape[2:4]

    def spatial(tile):
        if tiling.spatial and (w > tiling.min_width or h > tiling.min_height):
            tile_px, stride_px = (tiling.min_height, tiling.min_width), (tiling.stride_height, tiling.stride_width)
            return _spatial_tiles(run, tile, tile_px, stride_px, 1 / s)
        return run(tile)

    t = video.shape[1]
    if tiling.temporal and t > tiling.min_frames:
        return _temporal_tiles(
            spatial,
            video,
            tiling.min_frames,
            tiling.stride_frames,
            tiling.min_frames // r,
            tiling.stride_frames // r,
            latent_frames(t, r),
        )
    return spatial(video)


# ---------------------------------------------------------------------------------------------------------
# Public entry points.


def encode(
    vae: HunyuanVAE, video: jax.Array, *, tiling: Tiling = DEFAULT_TILING, channels_last: bool = False
) -> Posterior:
    """Encodes a video into the raw posterior (diffusers ``vae.encode(video).latent_dist``).

    The transformer's latents are ``posterior.mean * SCALING_FACTOR`` (or a ``posterior.sample(rng)`` scaled the
    same way). Each tile runs jitted (one compilation per tile shape).

    Args:
        vae: The VAE.
        video: [B, 3, T, H, W] in [-1, 1] ([B, T, H, W, 3] with ``channels_last``); T = 4k + 1, H and W
            multiples of 8.
        tiling: Tile settings; the default is diffusers' default (temporal tiles above 16 frames, no spatial
            tiles); ``NO_TILING`` encodes the clip whole.
        channels_last: Layout of the video and of the returned mean / logvar.

    Returns:
        ``Posterior(mean, logvar)``, each [B, 16, k + 1, H/8, W/8] ([B, k + 1, H/8, W/8, 16] channels-last),
        logvar clipped to [-30, 20].
    """
    cfg = vae.config
    c_axis = -1 if channels_last else 1
    if video.ndim != 5 or video.shape[c_axis] != cfg.in_channels:
        layout = "[B, T, H, W, C]" if channels_last else "[B, C, T, H, W]"
        raise ValueError(f"video must be {layout} with C = {cfg.in_channels}, got {video.shape=}")
    x = video if channels_last else jnp.moveaxis(video, 1, -1)
    _, t, h, w, _ = x.shape
    latent_frames(t, cfg.temporal_compression_ratio)
    f = cfg.spatial_compression_ratio
    if h % f or w % f:
        raise ValueError(f"video height and width must be divisible by {f}, got {h}x{w}; crop or resize it")
    tiling.check(cfg)
    moments = _encode_clip(vae, x, tiling)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)
    if not channels_last:
        mean, logvar = jnp.moveaxis(mean, -1, 1), jnp.moveaxis(logvar, -1, 1)
    return Posterior(mean, logvar)


def decode(
    vae: HunyuanVAE,
    latents: jax.Array,
    *,
    scaled: bool = True,
    tiling: Tiling = DEFAULT_TILING,
    channels_last: bool = False,
) -> jax.Array:
    """Decodes latents into a video (diffusers ``vae.decode(latents / scaling_factor)`` as the pipeline calls it).

    Args:
        vae: The VAE.
        latents: [B, 16, F, h, w] as the HunyuanVideo transformer produces them ([B, F, h, w, 16] with
            ``channels_last``).
        scaled: The latents are in the transformer's space, so they are divided by ``scaling_factor`` first (the
            pipeline's step); False decodes raw latents (``Posterior.mean``).
        tiling: Tile settings; the default is diffusers' default (temporal tiles above 4 latent frames, no
            spatial tiles); ``Tiling(spatial=True)`` also tiles H and W (``vae.enable_tiling()``, advised at
            720p); ``NO_TILING`` decodes the clip whole.
        channels_last: Layout of the latents and of the returned video.

    Returns:
        Video [B, 3, 4(F - 1) + 1, 8h, 8w] ([B, T, H, W, 3] channels-last), about [-1, 1] but not clipped (the
        pipeline's postprocessing clips), in the compute dtype.
    """
    cfg = vae.config
    c_axis = -1 if channels_last else 1
    if latents.ndim != 5 or latents.shape[c_axis] != cfg.latent_channels:
        layout = "[B, F, h, w, C]" if channels_last else "[B, C, F, h, w]"
        raise ValueError(f"latents must be {layout} with C = {cfg.latent_channels}, got {latents.shape=}")
    tiling.check(cfg)
    z = latents if channels_last else jnp.moveaxis(latents, 1, -1)
    if scaled:
        z = z / jnp.asarray(cfg.scaling_factor, z.dtype)
    video = _decode_clip(vae, z, tiling)
    return video if channels_last else jnp.moveaxis(video, -1, 1)


def load(path: str | os.PathLike, *, dtype=None) -> HunyuanVAE:
    """The HunyuanVAE written by ``python -m convert_weights hunyuan-vae`` (built on ``nnx.eval_shape``).

    Args:
        path: A converted checkpoint directory (orbax ``params/`` + ``manifest.json`` with model ``hunyuan_vae``).
        dtype: Parameter and compute dtype; None keeps the stored parameter dtype and computes in it.

    Raises:
        ValueError: When the directory holds another model or its arrays do not match the config.
    """
    return load_converted(path, model=MODEL, config_cls=HunyuanVAEConfig, module_cls=HunyuanVAE, dtype=dtype)
