"""Shared pieces of the per-op kernel test suites: implementations, tolerances, random inputs."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import registry

INTERPRET = "mosaic_gpu_interpret"
# Per-dtype absolute tolerance of one unit of reduction (about the unit roundoff of the operands, since
# rounding errors of independent unit-size terms add up like a random walk); checks scale it by sqrt(n).
ATOL = {jnp.float32: 2e-6, jnp.bfloat16: 2.0**-9, jnp.float16: 2.0**-12}
# Implementations whose kernels take 16-bit operands whatever the input dtype.
SIXTEEN_BIT = {INTERPRET: jnp.bfloat16, "mosaic_gpu": jnp.bfloat16}

interpret_marks = (pytest.mark.slow, pytest.mark.timeout(300))


def implementations(op: str, small_cases, interpret_cases):
    """pytest params (implementation, case): every case for reference/xla, the small list for interpret mode."""
    params = [pytest.param(impl, case, id=f"{impl}-{case}") for impl in ("reference", "xla") for case in small_cases]
    params += [
        pytest.param(INTERPRET, case, id=f"{INTERPRET}-{case}", marks=interpret_marks) for case in interpret_cases
    ]
    return params


def require(op: str, implementation: str) -> None:
    """Skips (with the loader's reason) only when the optional Mosaic GPU backend cannot import."""
    if implementation not in registry.available(op):
        pytest.skip(f"{implementation} not available: {registry._load_errors}")


def tolerance(implementation: str, dtype, n: int) -> float:
    eff = SIXTEEN_BIT.get(implementation, dtype)
    return ATOL[eff] * float(np.sqrt(n))


def product(**axes):
    return [tuple(vals) for vals in itertools.product(*axes.values())]


def normal(key, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def selection(key, lead: tuple[int, ...], universe: int, capacity: int) -> jax.Array:
    """Duplicate-free random indices [*lead, capacity] drawn from range(universe)."""
    scores = jax.random.uniform(key, (*lead, universe))
    return jnp.argsort(scores, axis=-1)[..., :capacity].astype(jnp.int32)


def counts_below(key, lead: tuple[int, ...], capacity: int, *, full_first: bool = True) -> jax.Array:
    """Random counts in [1, capacity]; the first entry is the full capacity, so both cases occur."""
    c = jax.random.randint(key, lead, 1, capacity + 1, jnp.int32)
    if full_first:
        c = c.reshape(-1).at[0].set(capacity).reshape(lead)
    return c


def assert_close(actual, expected, atol: float, what: str) -> None:
    """|actual - expected| <= atol + eps(actual.dtype) * |expected|: the relative term is the output's own rounding."""
    eps = float(jnp.finfo(jnp.asarray(actual).dtype).eps)
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values (unwritten output?)"
    excess = np.abs(actual - expected) - (atol + eps * np.abs(expected))
    worst = int(np.argmax(excess))
    assert excess.flat[worst] <= 0, (
        f"{what}: error {abs(actual.flat[worst] - expected.flat[worst]):.3g} at {np.unravel_index(worst, actual.shape)}"
        f" exceeds {atol:.3g} + {eps:.2g} * |{expected.flat[worst]:.3g}|"
    )
