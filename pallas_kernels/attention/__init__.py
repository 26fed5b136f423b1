"""Attention primitives: dense (+ normaliser), dense + column sums, column-sparse."""

from pallas_kernels.attention.api import dense_attention, dense_attention_colsum, sparse_attention

__all__ = ["dense_attention", "dense_attention_colsum", "sparse_attention"]
