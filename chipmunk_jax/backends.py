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

# Ops for which 'auto' takes the Mosaic GPU kernel on Hopper: verified on an H200 (tests/pallas_kernels, -m gpu)
# and faster than the xla path there (docs/PERFORMANCE.md, 2026-11-23): sparse attention 1.3x cuDNN inside the
# Chipmunk op at Flux shape, the tuned dense kernel about 0.9x cuDNN (the xla path is a chunked loop), dense +
# column sums 2.0x the xla mask step. The sparse MLP kernel is not here: 0.2x the dense MLP, slower than xla.
AUTO_MOSAIC_OPS = frozenset({"sparse_attention", "dense_attention", "dense_attention_colsum"})


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
