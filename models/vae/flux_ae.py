"""The Flux autoencoder (a KL autoencoder with 16 latent channels) in Flax NNX, NHWC.

Same network as diffusers ``AutoencoderKL`` configured for Flux (no quant / post-quant 1x1 convs) and as BFL's
``flux.modules.autoencoder``: ResNet blocks with GroupNorm + SiLU, a single-head self-attention block in the
middle of encoder and decoder, stride-2 convs (padded right/bottom only) to downsample and nearest-neighbour 2x +
conv to upsample. ``encode``/``decode`` work on the normalised latent space the Flux transformer sees:
``latents = (z - shift_factor) * scaling_factor``.

Images are [B, H, W, C] in [-1, 1]; latents are [B, H/f, W/f, latent_channels] with f = 2**(levels-1) (8 for Flux).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture and latent normalisation of a KL autoencoder.

    Attributes:
        in_channels: Image channels into the encoder.
        out_channels: Image channels out of the decoder.
        latent_channels: Channels of z (the encoder emits twice as many: mean and log-variance).
        block_out_channels: Width of each resolution level, highest resolution first.
        layers_per_block: ResNet blocks per encoder level (the decoder has one more per level).
        norm_num_groups: GroupNorm groups.
        eps: GroupNorm epsilon.
        scaling_factor: Multiplier applied after the shift when entering the latent space.
        shift_factor: Subtracted from z when entering the latent space.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    eps: float = 1e-6
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self):
        if not self.block_out_channels:
            raise ValueError("AutoencoderConfig.block_out_channels must not be empty")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block width {c} is not divisible by norm_num_groups={self.norm_num_groups}")
        if self.layers_per_block < 1 or min(self.in_channels, self.out_channels, self.latent_channels) < 1:
            raise ValueError(f"AutoencoderConfig has a non-positive size: {self}")

    @property
    def downsample_factor(self) -> int:
        """Spatial ratio between images and latents."""
        return 2 ** (len(self.block_out_channels) - 1)


FLUX_AE = AutoencoderConfig()
"""black-forest-labs FLUX.1 ``ae.safetensors`` / diffusers ``vae`` subfolder."""

AE_TINY = AutoencoderConfig(latent_channels=16, block_out_channels=(8, 16, 32), layers_per_block=2, norm_num_groups=4)


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, dtype, param_dtype, stride: int = 1, pad: int | None = None):
    padding = ((k // 2, k // 2),) * 2 if pad is None else ((pad, pad),) * 2
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _norm(c: int, config: AutoencoderConfig, rngs: nnx.Rngs, dtype, param_dtype) -> nnx.GroupNorm:
    return nnx.GroupNorm(
        c,
        num_groups=config.norm_num_groups,
        epsilon=config.eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class ResnetBlock(nnx.Module):
    """``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``; 1x1 conv shortcut when the width changes."""

    def __init__(self, cin: int, cout: int, config: AutoencoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.norm1 = _norm(cin, config, rngs, dtype, param_dtype)
        self.conv1 = _conv(cin, cout, 3, rngs, dtype, param_dtype)
        self.norm2 = _norm(cout, config, rngs, dtype, param_dtype)
        self.conv2 = _conv(cout, cout, 3, rngs, dtype, param_dtype)
        self.shortcut = _conv(cin, cout, 1, rngs, dtype, param_dtype) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all pixels, pre-GroupNorm, residual."""

    def __init__(self, c: int, config: AutoencoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.norm = _norm(c, config, rngs, dtype, param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = nnx.Linear(c, c, **kw)
        self.k = nnx.Linear(c, c, **kw)
        self.v = nnx.Linear(c, c, **kw)
        self.proj_out = nnx.Linear(c, c, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = self.norm(x).reshape(b, hgt * wid, c)  # [B, N, C]
        q, k, v = self.q(h), self.k(h), self.v(h)
        scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * jnp.float32(c**-0.5)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = self.proj_out(jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + out.reshape(b, hgt, wid, c)


class Downsample(nnx.Module):
    """Stride-2 3x3 conv after padding one pixel on the bottom and right only (as the original)."""

    def __init__(self, c: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.conv = _conv(c, c, 3, rngs, dtype, param_dtype, stride=2, pad=0)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, c: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.conv = _conv(c, c, 3, rngs, dtype, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
    """One resolution level: ResNet blocks and an optional resampler."""

    def __init__(self, resnets: list[ResnetBlock], resample: nnx.Module | None):
        self.resnets = nnx.List(resnets)
        self.resample = resample

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        return x if self.resample is None else self.resample(x)


class MidBlock(nnx.Module):
    """ResNet, attention, ResNet at the lowest resolution."""

    def __init__(self, c: int, config: AutoencoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnet_1 = ResnetBlock(c, c, config, **kw)
        self.attn = AttnBlock(c, config, **kw)
        self.resnet_2 = ResnetBlock(c, c, config, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.resnet_2(self.attn(self.resnet_1(x)))


class Encoder(nnx.Module):
    """Image [B, H, W, in] -> moments [B, H/f, W/f, 2 * latent] (mean, log-variance)."""

    def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        chans = config.block_out_channels
        self.conv_in = _conv(config.in_channels, chans[0], 3, rngs, dtype, param_dtype)
        levels = []
        cin = chans[0]
        for i, cout in enumerate(chans):
            resnets = [ResnetBlock(cin if j == 0 else cout, cout, config, **kw) for j in range(config.layers_per_block)]
            levels.append(Level(resnets, Downsample(cout, **kw) if i < len(chans) - 1 else None))
            cin = cout
        self.levels = nnx.List(levels)
        self.mid = MidBlock(chans[-1], config, **kw)
        self.norm_out = _norm(chans[-1], config, rngs, dtype, param_dtype)
        self.conv_out = _conv(chans[-1], 2 * config.latent_channels, 3, rngs, dtype, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for level in self.levels:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class Decoder(nnx.Module):
    """z [B, h, w, latent] -> image [B, h*f, w*f, out]; levels are stored in processing order (lowest res first)."""

    def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        chans = tuple(reversed(config.block_out_channels))
        self.conv_in = _conv(config.latent_channels, chans[0], 3, rngs, dtype, param_dtype)
        self.mid = MidBlock(chans[0], config, **kw)
        levels = []
        cin = chans[0]
        for i, cout in enumerate(chans):
            n = config.layers_per_block + 1
            resnets = [ResnetBlock(cin if j == 0 else cout, cout, config, **kw) for j in range(n)]
            levels.append(Level(resnets, Upsample(cout, **kw) if i < len(chans) - 1 else None))
            cin = cout
        self.levels = nnx.List(levels)
        self.norm_out = _norm(chans[-1], config, rngs, dtype, param_dtype)
        self.conv_out = _conv(chans[-1], config.out_channels, 3, rngs, dtype, param_dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid(self.conv_in(z))
        for level in self.levels:
            x = level(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class FluxAutoencoder(nnx.Module):
    """Encoder, decoder and the Flux latent normalisation."""

    def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        """Creates randomly initialised weights.

        Args:
            config: Architecture and latent normalisation.
            rngs: Initialisation randomness.
            dtype: Compute dtype (softmax runs in float32).
            param_dtype: Storage dtype of the weights.
        """
        self.config = config
        self.encoder = Encoder(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.decoder = Decoder(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def _check(self, x: jax.Array, channels: int, what: str) -> None:
        f = self.config.downsample_factor if what == "images" else 1
        if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"{what} must be NHWC [B, H, W, {channels}] with H and W divisible by {f}, got {x.shape=}")

    def encode(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Images -> normalised latents.

        Args:
            images: [B, H, W, in_channels] in [-1, 1], H and W divisible by ``config.downsample_factor``.
            rng: When given, samples z from the posterior (as BFL's encode does); otherwise uses its mean.

        Returns:
            ``(z - shift_factor) * scaling_factor``, [B, H/f, W/f, latent_channels].
        """
        self._check(images, self.config.in_channels, "images")
        moments = self.encoder(images)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        z = mean
        if rng is not None:
            std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
            z = mean + std * jax.random.normal(rng, mean.shape, mean.dtype)
        return (z - jnp.asarray(self.config.shift_factor, z.dtype)) * jnp.asarray(self.config.scaling_factor, z.dtype)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Normalised latents -> images.

        Args:
            latents: [B, h, w, latent_channels] in the Flux latent space.

        Returns:
            Images [B, h*f, w*f, out_channels], nominally in [-1, 1] (not clipped).
        """
        self._check(latents, self.config.latent_channels, "latents")
        dt = latents.dtype
        z = latents / jnp.asarray(self.config.scaling_factor, dt) + jnp.asarray(self.config.shift_factor, dt)
        return self.decoder(z)
