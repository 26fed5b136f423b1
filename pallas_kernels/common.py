"""Small helpers shared by the primitive implementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def slot_mask(counts: jax.Array, k: int, offset=0) -> jax.Array:
    """[..., k] bool: slot s (+ offset) is valid iff it is below counts[...] (no rank promotion)."""
    slots = jax.lax.broadcasted_iota(jnp.int32, (*counts.shape, k), counts.ndim) + offset
    return slots < counts[..., None]
