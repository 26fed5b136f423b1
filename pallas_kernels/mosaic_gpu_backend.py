"""Registers the Pallas Mosaic GPU (Hopper) kernels with ``pallas_kernels.registry``.

Two implementation names per op, with the exact signatures and output contracts of the 'xla' implementations:
  'mosaic_gpu'            the hardware path (needs an sm_90a GPU to run; cross-lowers anywhere);
  'mosaic_gpu_interpret'  the same kernels in Mosaic GPU interpret mode on CPU (slow; for tests).
Padding, f32 -> bf16 casts and layout changes happen inside the kernel wrappers. Importing this module on a
machine whose jax lacks Mosaic GPU raises ImportError, which the registry records as "not available".
"""

from __future__ import annotations

import functools

from pallas_kernels import registry
from pallas_kernels.attention import mosaic_gpu as attn
from pallas_kernels.mlp import mosaic_gpu as mlp

IMPLEMENTATIONS = {"mosaic_gpu": False, "mosaic_gpu_interpret": True}

# The pre-gathered K/V copies are [B, H, G, K, D] each: G times the selected keys. At long video sequences with
# many kept keys that is hundreds of GiB (Wan 720p, CFG), so above this size the in-kernel row gather is used.
PREGATHER_MAX_BYTES = 4 * 2**30


def _pregathered_bytes(q, indices) -> int:
    b, h, g, kcap = indices.shape
    return 2 * b * h * g * kcap * q.shape[3] * 2  # K and V, 16-bit


def dense_attention(q, k, v, *, group: int = 192, interpret: bool = False):
    """Registry adapter: (o [B, H, N, D], lse [B, H, N] f32)."""
    # The dense op's group only sets the tiling; other values fall back to the 192-row group.
    cfg = attn.tuned_config("dense", group if group in (128, 192) else 192, k.shape[2])
    return attn.dense_attention(q, k, v, config=cfg, interpret=interpret)


def dense_attention_colsum(q, k, v, prev_lse, *, group: int = 192, interpret: bool = False):
    """Registry adapter: (o, lse, cs [B, H, ceil(N / group), Nk] f32); group must be 128 or 192."""
    if group not in (128, 192):
        raise ValueError(f"{group=} must be 128 or 192 for the Mosaic GPU attention kernels")
    # The tuned dense tiles (block_kv 64) do not lower with column sums (the partials need 128-wide vectors).
    cfg = attn.tuned_config("dense", group, k.shape[2])
    if cfg.block_kv % 128:
        cfg = attn.default_config(group, sparse=False)
    return attn.dense_attention_colsum(q, k, v, prev_lse, config=cfg, interpret=interpret)


def sparse_attention(q, k, v, indices, counts, *, group: int = 192, interpret: bool = False):
    """Registry adapter: o [B, H, N, D]; group must be 128 or 192; the config is the tuned one for N."""
    if group not in (128, 192):
        raise ValueError(f"{group=} must be 128 or 192 for the Mosaic GPU attention kernels")
    cfg = attn.tuned_config("sparse", group, k.shape[2])
    if cfg.gather == "pregathered" and _pregathered_bytes(q, indices) > PREGATHER_MAX_BYTES:
        cfg = attn.default_config(group, sparse=True)
    return attn.sparse_attention(q, k, v, indices, counts, config=cfg, interpret=interpret)


def sparse_mlp_delta(x, w1, b1, w2, indices, counts, act, out, *, block: int = 128, interpret: bool = False):
    """Registry adapter: (new out [B, N, C], new act [B, N, F])."""
    return mlp.sparse_mlp_delta(x, w1, b1, w2, indices, counts, act, out, block=block, interpret=interpret)


for _name, _interpret in IMPLEMENTATIONS.items():
    registry.register("dense_attention", _name, functools.partial(dense_attention, interpret=_interpret))
    registry.register("dense_attention_colsum", _name, functools.partial(dense_attention_colsum, interpret=_interpret))
    registry.register("sparse_attention", _name, functools.partial(sparse_attention, interpret=_interpret))
    registry.register("sparse_mlp_delta", _name, functools.partial(sparse_mlp_delta, interpret=_interpret))
