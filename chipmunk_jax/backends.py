"""Backend names and automatic selection.

'reference': f32 jnp written for clarity (tests); 'xla': portable, chunked, linear memory; 'mosaic_gpu':
Pallas Mosaic GPU kernels for Hopper. 'auto' resolves per op: mosaic_gpu on a Hopper GPU for the ops whose
kernel was verified correct and no slower than xla on an H200 (``AUTO_MOSAIC_OPS``), xla otherwise.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import registry

BACKENDS = ("reference", "xla", "mosaic_gpu")

# Ops for which 'auto' takes the Mosaic GPU kernel on Hopper. Measured on an H200 on 2026-11-23
# (docs/PERFORMANCE.md): the dense + column-sums kernel gave wrong column sums on hardware (it passes in
# interpret mode), the dense kernel ran at 0.39x cuDNN, and the sparse MLP kernel at 0.19x the dense MLP
# (slower than the xla delta). Add an op here once [h200-run] has verified and tuned its kernel.
AUTO_MOSAIC_OPS = frozenset({"sparse_attention"})


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
        use = op in AUTO_MOSAIC_OPS and _on_hopper() and "mosaic_gpu" in registry.available(op)
        return "mosaic_gpu" if use else "xla"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    return backend
