"""Pieces the video VAEs (``wan_vae``, ``mochi_vae``, ``hunyuan_vae``) share.

All of them are channels-last inside ([B, T, H, W, C]) and take diffusers' channels-first layout at their entry
points; they run causal decoders chunk by chunk with a carried cache; the tiled ones blend overlapping tiles
with linear ramps as diffusers does; and they load converted checkpoints the same way. What differs between the
models (norms, convolutions, tile sizes, latent statistics) stays in each model's file.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class DictConfig:
    """Mixin of the VAE config dataclasses: ``to_dict`` / ``from_dict``, the ``config`` of a converted
    checkpoint's manifest.json."""

    def to_dict(self) -> dict:
        """JSON-ready fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        """Inverse of ``to_dict``; unknown keys are an error."""
        return cls(**d)


def latent_frames(frames: int, ratio: int) -> int:
    """Latent frames of a causal video VAE for ``frames`` video frames, which must be ``ratio * k + 1`` (the first
    frame is encoded alone, then ``ratio`` frames per latent frame): with ratio 4, 1 -> 1, 5 -> 2, 81 -> 21.

    Raises:
        ValueError: Naming the two nearest valid frame counts.
    """
    integral = isinstance(frames, numbers.Integral)
    if not integral or frames < 1 or (frames - 1) % ratio:
        n = max(0, (int(frames) - 1) // ratio) if integral else 0
        raise ValueError(
            f"frames must be {ratio}k + 1 (1, {ratio + 1}, {2 * ratio + 1}, ...), got {frames!r}; "
            f"use {n * ratio + 1} or {(n + 1) * ratio + 1}"
        )
    return (int(frames) - 1) // ratio + 1


def frames_for_latents(latent_frames: int, ratio: int) -> int:
    """Video frames a causal video VAE decodes from ``latent_frames`` latent frames: ``ratio * (F - 1) + 1``."""
    if not isinstance(latent_frames, numbers.Integral) or latent_frames < 1:
        raise ValueError(f"latent frames must be a positive int, got {latent_frames!r}")
    return ratio * (int(latent_frames) - 1) + 1


def to_last(x: jax.Array) -> jax.Array:
    """[B, C, T, H, W] -> [B, T, H, W, C]."""
    return jnp.moveaxis(x, 1, -1)


def to_first(x: jax.Array) -> jax.Array:
    """[B, T, H, W, C] -> [B, C, T, H, W]."""
    return jnp.moveaxis(x, -1, 1)


def chunked(fn: Callable, first: jax.Array, rest: jax.Array | None) -> jax.Array:
    """``fn(chunk, cache) -> (out, cache)`` on ``first`` (no cache), then scanned over ``rest`` with the cache as
    carry; the outputs concatenated along time.

    Why a scan: a causal video decoder sees the video a few frames at a time and carries the last input frames
    of each convolution; scanning compiles the chunk body once whatever the length.

    Args:
        fn: The chunk function (called with ``cache=None`` on the first chunk).
        first: [B, T0, ...] first chunk.
        rest: [n, B, Tc, ...] further chunks, or None.

    Returns:
        The outputs concatenated along time, [B, T_out, ...].
    """
    out, cache = fn(first, None)
    if rest is None:
        return out

    def body(carry, chunk):
        y, carry = fn(chunk, carry)
        return carry, y

    _, ys = jax.lax.scan(body, cache, rest)  # [n, B, Tc', ...]
    ys = jnp.moveaxis(ys, 0, 1)
    ys = ys.reshape(ys.shape[0], ys.shape[1] * ys.shape[2], *ys.shape[3:])
    return jnp.concatenate([out, ys.astype(out.dtype)], axis=1)


def blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """``b`` with its first ``extent`` slices along ``axis`` faded in from the last ``extent`` of ``a``:
    ``a[-e + y] * (1 - y / e) + b[y] * (y / e)`` (diffusers ``blend_t`` / ``blend_v`` / ``blend_h``)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = extent
    ramp = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape(shape).astype(b.dtype)
    tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    rest = jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)
    return jnp.concatenate([tail * (1 - ramp) + head * ramp, rest], axis=axis)


def tiled_2d(
    run: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    tile: tuple[int, int],
    stride: tuple[int, int],
    overlap: tuple[int, int],
    keep: tuple[int, int],
    out_hw: tuple[int, int],
) -> jax.Array:
    """Runs ``run`` on overlapping H/W tiles of channels-last ``x`` and blends them (diffusers' ``tiled_encode``
    / ``tiled_decode``).

    Tile (i, j) is ``x[:, :, i : i + tile_h, j : j + tile_w]`` for i, j every ``stride``; its output is first
    blended with the finished output above it, then with the finished one to its left (over ``overlap`` output
    rows / columns, the neighbours already blended as diffusers does in place), then cropped to its first
    ``keep`` rows / columns; the assembled result is cropped to ``out_hw``. Pairs are (height, width); ``tile``
    and ``stride`` are in input units, ``overlap``, ``keep`` and ``out_hw`` in output units.

    Raises:
        ValueError: A stride below one input pixel.
    """
    h, w = x.shape[2], x.shape[3]
    if min(stride) < 1:
        raise ValueError(f"tile strides must be at least one latent pixel (8 video pixels), got {stride}")
    rows, above = [], None
    for i in range(0, h, stride[0]):
        done = []
        for jj, j in enumerate(range(0, w, stride[1])):
            out = run(x[:, :, i : i + tile[0], j : j + tile[1]])
            if above is not None:
                out = blend(above[jj], out, overlap[0], axis=2)
            if done:
                out = blend(done[-1], out, overlap[1], axis=3)
            done.append(out)
        rows.append(jnp.concatenate([t[:, :, : keep[0], : keep[1]] for t in done], axis=3))
        above = done
    return jnp.concatenate(rows, axis=2)[:, :, : out_hw[0], : out_hw[1]]


def load_converted(path: str | os.PathLike, *, model: str, config_cls: Any, module_cls: Any, dtype=None):
    """A VAE written by ``python -m convert_weights <model>``, built on ``nnx.eval_shape`` (no random init).

    Args:
        path: A converted checkpoint directory (orbax ``params/`` + ``manifest.json``).
        model: The manifest's expected ``model`` entry (e.g. 'wan_vae').
        config_cls: The config dataclass (with ``from_dict``) the manifest's ``config`` describes.
        module_cls: The module, called as ``module_cls(config, rngs=..., dtype=..., param_dtype=...)``.
        dtype: Parameter and compute dtype; None keeps the stored parameter dtype and computes in it.

    Raises:
        ValueError: When the directory holds another model or its arrays do not match the config.
    """
    from convert_weights.common import fill_module, read_checkpoint, read_manifest

    manifest = read_manifest(path)
    if manifest.get("model") != model:
        raise ValueError(f"{path} holds a {manifest.get('model')!r} checkpoint, not {model!r}")
    config = config_cls.from_dict(manifest["config"])
    arrays = read_checkpoint(path)
    dt = jnp.dtype(dtype) if dtype is not None else jnp.dtype(next(iter(arrays.values())).dtype)
    abstract = nnx.eval_shape(lambda: module_cls(config, rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt))
    return fill_module(abstract, arrays, where=str(path))
