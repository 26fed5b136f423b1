"""Backend names and automatic selection.

'reference': f32 jnp written for clarity (tests); 'xla': portable, chunked, linear memory; 'mosaic_gpu':
Pallas Mosaic GPU kernels for Hopper. 'auto' picks mosaic_gpu on a Hopper GPU when it is registered, xla
everywhere else.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import registry

BACKENDS = ("reference", "xla", "mosaic_gpu")


@functools.cache
def _on_hopper() -> bool:
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    if dev.platform != "gpu":
        return False
    return getattr(dev, "compute_capability", "") in ("9.0", "9.0a")


def resolve_backend(backend: str, op: str = "sparse_attention") -> str:
    """Maps 'auto' to a concrete backend and checks that the name is known and available."""
    if backend == "auto":
        return "mosaic_gpu" if _on_hopper() and "mosaic_gpu" in registry.available(op) else "xla"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    return backend
