"""Sparse MLP delta with ``implementation=`` dispatch ('reference', 'xla', 'mosaic_gpu')."""

from __future__ import annotations

from pallas_kernels import registry
from pallas_kernels.mlp import reference, xla

registry.register("sparse_mlp_delta", "reference", reference.sparse_mlp_delta_reference)
registry.register("sparse_mlp_delta", "xla", xla.sparse_mlp_delta_xla)


def sparse_mlp_delta(x, w1, b1, w2, indices, counts, act, out, *, block: int = 128, implementation: str = "xla"):
    """Column-sparse MLP delta (SPEC §2.2 step 5); see ``reference.sparse_mlp_delta_reference``.

    Shapes: x [B, N, C], w1 [F, C], b1 [F], w2 [F, C], indices [B, N/block, K], counts [B, N/block],
    act [B, N, F], out [B, N, C]. Returns (new out, new act).
    """
    b, n, c = x.shape
    f = w1.shape[0]
    if n % block:
        raise ValueError(f"x token count must be a multiple of block={block}, got {x.shape=}")
    g = n // block
    if w1.shape != (f, c) or w2.shape != (f, c) or b1.shape != (f,):
        raise ValueError(f"need w1 [F, C], b1 [F], w2 [F, C] with C={c}; got {w1.shape=}, {b1.shape=}, {w2.shape=}")
    if indices.ndim != 3 or indices.shape[:2] != (b, g) or counts.shape != (b, g):
        raise ValueError(
            f"need indices [B, G, K] and counts [B, G] with (B, G)={(b, g)}; got {indices.shape=}, {counts.shape=}"
        )
    if act.shape != (b, n, f) or out.shape != (b, n, c):
        raise ValueError(
            f"need act [B, N, F]={(b, n, f)} and out [B, N, C]={(b, n, c)}; got {act.shape=}, {out.shape=}"
        )
    registry.load_optional_backends()
    return registry.get("sparse_mlp_delta", implementation)(x, w1, b1, w2, indices, counts, act, out, block=block)
