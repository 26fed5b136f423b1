"""Column-sparse MLP delta primitive."""

from pallas_kernels.mlp.api import sparse_mlp_delta

__all__ = ["sparse_mlp_delta"]
