"""PSNR / SSIM against values that follow from their definitions, and against a direct float64 evaluation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax import metrics


def test_psnr_known_values():
    x = np.zeros((2, 8, 8, 3), np.float32)
    y = x + np.float32(0.1)  # MSE 0.01 -> 20 dB at data range 1
    np.testing.assert_allclose(np.asarray(metrics.psnr(x, y)), [20.0, 20.0], rtol=1e-5)
    np.testing.assert_allclose(float(metrics.psnr(x[0], y[0] * 2, data_range=2.0)), 20.0, rtol=1e-5)  # MSE .04, R 2
    assert np.isinf(float(metrics.psnr(x[0], x[0])))


def _ssim64(x, y, data_range=1.0):
    """SSIM written out pixel by pixel in float64 (Gaussian window 11, sigma 1.5, valid positions)."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    h, w, c = x.shape
    vals = []
    for ch in range(c):
        for i in range(h - 10):
            for j in range(w - 10):
                px, py = x[i : i + 11, j : j + 11, ch], y[i : i + 11, j : j + 11, ch]
                mx, my = (win * px).sum(), (win * py).sum()
                vx, vy = (win * px * px).sum() - mx**2, (win * py * py).sum() - my**2
                cxy = (win * px * py).sum() - mx * my
                vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_direct_definition_and_limits():
    rng = np.random.default_rng(0)
    x = rng.random((16, 14, 2))
    y = np.clip(x + 0.1 * rng.normal(size=x.shape), 0, 1)
    got = float(metrics.ssim(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
    np.testing.assert_allclose(got, _ssim64(x, y), rtol=1e-4)
    assert float(metrics.ssim(jnp.asarray(x, jnp.float32), jnp.asarray(x, jnp.float32))) == pytest.approx(1.0, abs=1e-5)
    assert got < 0.95  # noise lowers it
    batch = metrics.ssim(jnp.asarray(np.stack([x, y]), jnp.float32), jnp.asarray(np.stack([y, y]), jnp.float32))
    np.testing.assert_allclose(np.asarray(batch), [got, 1.0], rtol=1e-4, atol=1e-5)


def test_metric_input_errors_and_relative_l2():
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.psnr(jnp.zeros((4, 4, 3), jnp.float32), jnp.zeros((4, 5, 3), jnp.float32))
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(jnp.zeros((8, 8, 3), jnp.float32), jnp.zeros((8, 8, 3), jnp.float32))
    y = jnp.asarray(np.ones((2, 3, 4)), jnp.float32)
    x = y.at[1].multiply(1.5)
    np.testing.assert_allclose(np.asarray(metrics.relative_l2(x, y)), [0.0, 0.5], rtol=1e-6)
