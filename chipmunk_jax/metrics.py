"""Fidelity metrics of a Chipmunk sample against the dense sample of the same seed.

PSNR and SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, "valid" filtering, mean
over channels) on images in [0, data_range], and the relative L2 error of latents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def psnr(x: jax.Array, y: jax.Array, *, data_range: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB over the trailing [H, W, C] axes; +inf for identical images."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    if x.shape != y.shape:
        raise ValueError(f"psnr needs equal shapes, got {x.shape=} {y.shape=}")
    mse = jnp.mean((x - y) ** 2, axis=(-3, -2, -1))
    return 10.0 * jnp.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g).astype(np.float32)


def ssim(x: jax.Array, y: jax.Array, *, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> jax.Array:
    """Structural similarity of images [..., H, W, C] (H, W >= window), averaged over pixels and channels."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    if x.shape != y.shape or x.ndim < 3:
        raise ValueError(f"ssim needs equal [..., H, W, C] shapes, got {x.shape=} {y.shape=}")
    if min(x.shape[-3:-1]) < window:
        raise ValueError(f"ssim needs images of at least {window}x{window} pixels, got {x.shape[-3:-1]}")
    lead = x.shape[:-3]
    h, w, c = x.shape[-3:]
    kernel = jnp.asarray(_gaussian_window(window, sigma))[:, :, None, None]  # [kh, kw, 1, 1]

    def blur(a):  # [..., H, W, C] -> [..., H', W', C], each channel separately ("valid")
        a = jnp.moveaxis(a.reshape(-1, h, w, c), -1, 1).reshape(-1, h, w, 1)
        out = jax.lax.conv_general_dilated(a, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        hh, ww = out.shape[1:3]
        return jnp.moveaxis(out.reshape(-1, c, hh, ww), 1, -1)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean(axis=(-3, -2, -1)).reshape(lead)


def relative_l2(x: jax.Array, y: jax.Array) -> jax.Array:
    """||x - y|| / ||y|| over everything but the leading (batch) axis."""
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    axes = tuple(range(1, x.ndim))
    return jnp.sqrt(jnp.sum((x - y) ** 2, axis=axes) / jnp.sum(y**2, axis=axes))
