"""Index selection: top-k keys, compressed masks, static video masks, bit-packing, MLP neuron selection.

Everything is pure jnp with fixed-size buffers: counts are values, never shapes. Randomness comes from
explicit ``jax.random`` keys (``layer_rng`` derives one per (seed, step, layer)).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.config import AttnConfig, MLPConfig

# The reference adds random keys with this probability in compressed mode (hard-coded there too).
COMPRESSED_RANDOM_PROB = 0.01
VOXEL_SHAPE = (4, 6, 8)  # 192 tokens: one query group
_BITS = 32


def layer_rng(key: jax.Array, step, layer) -> jax.Array:
    """The random key of (generation key, step, layer); step and layer may be traced."""
    return jax.random.fold_in(jax.random.fold_in(key, step), layer)


@flax.struct.dataclass
class KeySlice:
    """A random key that stands for a [B, H] block of a draw made over the full, unsharded [B_full, H_full, ...].

    Inside ``shard_map`` a device sees only its batch rows and heads; drawing with the plain key there would give
    other numbers than the unsharded run. ``random_uniform`` draws the full array and slices this block, so that
    sharded and unsharded runs select the same random keys (``chipmunk_jax.parallel`` builds these).

    Attributes:
      key: the key of the unsharded draw.
      offset: (first batch row, first head) of this block; may be traced.
      full: (B_full, H_full), static.
    """

    key: jax.Array
    offset: tuple[jax.Array, jax.Array]
    full: tuple[int, int] = flax.struct.field(pytree_node=False)


def random_uniform(rng: jax.Array | KeySlice, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.uniform(rng, shape)``, or for a KeySlice its block of the draw over the full leading axes."""
    if not isinstance(rng, KeySlice):
        return jax.random.uniform(rng, shape)
    full = jax.random.uniform(rng.key, (*rng.full, *shape[2:]))
    starts = (*rng.offset, *([0] * (len(shape) - 2)))
    return jax.lax.dynamic_slice(full, starts, shape)


def round_up(x, m: int):
    return -(-x // m) * m


def num_groups(n: int, group: int) -> int:
    return -(-n // group)


def attn_top_k(cfg: AttnConfig, n_keys: int) -> int:
    """tk = m * round(top_keys * N_k / m) (round half to even, as the reference), m = counts_multiple_of."""
    m = cfg.counts_multiple_of
    return m * round(cfg.top_keys * n_keys / m)


def topk_capacity(cfg: AttnConfig, n_keys: int) -> int:
    """Index slots of the uncompressed (Flux) mode: tk clamped to [min(m, N), N].

    The reference would run an empty selection when tk rounds to 0 (tiny sequences); we keep at least one
    KV tile so that A_S is defined.
    """
    return int(min(max(attn_top_k(cfg, n_keys), min(cfg.counts_multiple_of, n_keys)), n_keys))


def topk_indices(cs: jax.Array, k: int) -> jax.Array:
    """Top-k columns of cs [..., N] in ascending column order -> [..., k] int32."""
    _, idx = jax.lax.top_k(cs, k)
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def mask_to_indices(mask: jax.Array, multiple: int) -> tuple[jax.Array, jax.Array]:
    """Boolean mask [..., N] -> (indices [..., N] int32, counts [...] int32).

    Selected columns come first in ascending order, then the unselected ones in ascending order.
    counts = popcount rounded up to ``multiple`` (capped at N): the lowest-numbered unselected columns that
    fill the last tile become real members, as in the reference.
    """
    n = mask.shape[-1]
    mask = mask.astype(bool)
    pop = mask.sum(-1, dtype=jnp.int32)
    sel_pos = jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1
    unsel_pos = pop[..., None] + jnp.cumsum(~mask, axis=-1, dtype=jnp.int32) - 1
    pos = jnp.where(mask, sel_pos, unsel_pos)
    cols = jax.lax.broadcasted_iota(jnp.int32, mask.shape, mask.ndim - 1)
    flat_pos = pos.reshape(-1, n)
    flat_cols = cols.reshape(-1, n)
    idx = jax.vmap(lambda p, c: jnp.zeros((n,), jnp.int32).at[p].set(c))(flat_pos, flat_cols)
    counts = jnp.minimum(round_up(pop, multiple), n).astype(jnp.int32)
    return idx.reshape(mask.shape), counts


def pack_bits(mask: jax.Array) -> jax.Array:
    """Boolean [..., N] -> uint32 [..., ceil(N / 32)]; bit j % 32 of word j // 32 is column j."""
    n = mask.shape[-1]
    w = num_groups(n, _BITS)
    m = jnp.pad(mask.astype(jnp.uint32), [(0, 0)] * (mask.ndim - 1) + [(0, w * _BITS - n)])
    m = m.reshape(*mask.shape[:-1], w, _BITS)
    shifts = jax.lax.broadcasted_iota(jnp.uint32, m.shape, m.ndim - 1)
    return (m << shifts).sum(-1, dtype=jnp.uint32)


def unpack_bits(bits: jax.Array, n: int) -> jax.Array:
    """Inverse of ``pack_bits``: uint32 [..., W] -> bool [..., n]."""
    shifts = jax.lax.broadcasted_iota(jnp.uint32, (*bits.shape, _BITS), bits.ndim)
    b = (bits[..., None] >> shifts) & jnp.uint32(1)
    return b.reshape(*bits.shape[:-1], bits.shape[-1] * _BITS)[..., :n].astype(bool)


@dataclasses.dataclass(frozen=True)
class StaticMask:
    """The per-generation static part of the compressed video mask (SPEC §1.3).

    Attributes:
      mask: [H, G, N] bool, columns every query group always attends.
      sparse_group: [H, G] bool; groups where it is False use only their static row.
    """

    mask: np.ndarray
    sparse_group: np.ndarray


def _window(center: int, size: int, half: int) -> range:
    """Voxel window of 2*half+1 (clipped to size), shifted inward at the borders."""
    width = min(2 * half + 1, size)
    start = min(max(center - half, 0), size - width)
    return range(start, start + width)


def static_video_mask(
    grid: tuple[int, int, int],
    text_len: int,
    num_heads: int,
    cfg: AttnConfig,
    *,
    rng: jax.Array | None = None,
    group: int = 192,
    kv_tile: int = 128,
) -> StaticMask:
    """Builds the static mask for a video of ``grid`` = (t, h, w) tokens followed by ``text_len`` text tokens.

    Sequence layout: [video in voxel order; text]. Rules (SPEC §1.3):
      1. every group attends all text columns;
      2. local_voxels lv > 0: voxel g attends its neighbours, a window of 2*(lv//2)+1 voxels per axis (lv for
         odd lv, as the reference's offsets give) shifted inward at borders, expanded to 192 columns each; the
         groups past the last full voxel attend the last 192 * lv**3 columns. Unlike the reference, no group
         attends voxel 0 unless it is a real neighbour (SPEC §9);
      3. local_1d_window w: group g attends video columns within +-w*N_vid/2 of its centre 192g + 96;
      4. the last floor(T/192) + 1 groups attend the last floor(N/128)*128 columns;
      5. static random keys with probability cfg.random_keys (per head), except in those last groups.

    Args:
      grid: video token grid (t, h, w) after patch embedding.
      text_len: text tokens appended after the video.
      num_heads: heads (the random part differs per head).
      cfg: attention config (local_voxels, local_1d_window, random_keys, top_keys).
      rng: key for the random part (required when cfg.random_keys > 0).
      group: query group size (must equal the voxel size, 192).
      kv_tile: the KV tile of rule 4.
    """
    tt, th, tw = grid
    vt, vh, vw = VOXEL_SHAPE
    voxel = vt * vh * vw
    if group != voxel:
        raise ValueError(f"the static video mask needs query groups of one voxel ({voxel}), got {group=}")
    n_vid = tt * th * tw
    n = n_vid + text_len
    g = num_groups(n, group)
    mask = np.zeros((g, n), dtype=bool)
    mask[:, n_vid:] = True  # rule 1

    lv = cfg.local_voxels
    nt, nh, nw = tt // vt, th // vh, tw // vw
    n_voxels = nt * nh * nw
    if lv > 0 and n_voxels > 0:
        half = lv // 2
        for gi in range(n_voxels):
            a, rem = divmod(gi, nh * nw)
            b, c = divmod(rem, nw)
            for i in _window(a, nt, half):
                for j in _window(b, nh, half):
                    for k in _window(c, nw, half):
                        v = (i * nh + j) * nw + k
                        mask[gi, v * voxel : (v + 1) * voxel] = True
        mask[n_voxels:, max(0, n - voxel * lv**3) :] = True

    if cfg.local_1d_window > 0:
        half_w = cfg.local_1d_window * n_vid / 2
        for gi in range(g):
            centre = group * gi + group // 2
            lo, hi = int(max(0, np.ceil(centre - half_w))), int(min(n_vid, np.floor(centre + half_w) + 1))
            if lo < hi:
                mask[gi, lo:hi] = True

    n_text_groups = text_len // group + 1
    dense_cols = (n // kv_tile) * kv_tile
    if dense_cols > 0:
        mask[g - n_text_groups :, n - dense_cols :] = True  # rule 4

    mask = np.broadcast_to(mask, (num_heads, g, n)).copy()
    if cfg.random_keys > 0:
        if rng is None:
            raise ValueError("static_video_mask needs rng when cfg.random_keys > 0")
        rand = np.array(jax.random.uniform(rng, (num_heads, g, n)) < cfg.random_keys)  # writable copy
        rand[:, g - n_text_groups :, :] = False
        mask |= rand
    static_count = mask.sum(-1)
    sparse_group = static_count + int(np.floor(cfg.top_keys * n_vid)) < n
    return StaticMask(mask=mask, sparse_group=sparse_group)


def compressed_mask(
    cs: jax.Array,
    cfg: AttnConfig,
    rng: jax.Array | KeySlice,
    static: StaticMask | None,
) -> jax.Array:
    """The compressed-mode key mask [B, H, G, N] (SPEC §1.2b, should_compress_indices)."""
    n = cs.shape[-1]
    tk = min(attn_top_k(cfg, n), n)
    if static is None:
        static_mask = jnp.zeros(cs.shape[1:], bool)
        sparse_group = jnp.ones(cs.shape[1:3], bool)
    else:
        static_mask = jnp.asarray(static.mask)
        sparse_group = jnp.asarray(static.sparse_group)
        if static_mask.shape != cs.shape[1:]:
            raise ValueError(f"static mask {static_mask.shape} does not match column sums [H, G, N] {cs.shape[1:]}")
    if tk == 0:
        return jnp.broadcast_to(static_mask, cs.shape)
    mask = random_uniform(rng, cs.shape) < COMPRESSED_RANDOM_PROB
    _, top = jax.lax.top_k(cs, tk)
    top_mask = jnp.zeros(cs.shape, bool)
    top_mask = jax.vmap(jax.vmap(jax.vmap(lambda mm, ii: mm.at[ii].set(True))))(top_mask, top)
    mask = mask | top_mask
    return (mask & sparse_group[None, :, :, None]) | static_mask[None]


def block_mean(x: jax.Array, block: int, n_valid: int | None = None) -> jax.Array:
    """Mean over token blocks: [B, N, X] (N a multiple of block) -> [B, N / block, X] in float32.

    When ``n_valid`` < N, rows at or past it are padding and excluded from the last block's mean.
    """
    b, n, c = x.shape
    xs = x.astype(jnp.float32).reshape(b, n // block, block, c)
    if n_valid is None or n_valid == n:
        return xs.mean(axis=2)
    valid = (jnp.arange(n) < n_valid).reshape(n // block, block)
    cnt = jnp.maximum(valid.sum(-1), 1).astype(jnp.float32)
    return jnp.where(valid[None, :, :, None], xs, 0.0).sum(axis=2) / cnt[None, :, None]


def mlp_select(score: jax.Array, cfg: MLPConfig, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """MLP neuron selection per token block (SPEC §2.2 step 3).

    Keeps neurons whose score is >= the exact (1 - top_keys) quantile of the block's scores (linear
    interpolation, as torch.quantile), plus each other neuron with probability random_keys; the count is
    rounded up to counts_multiple_of with the lowest-numbered unselected neurons.

    Args:
      score: [B, G, F] float32 (|Zhat - M|).
    Returns:
      indices [B, G, F] int32 (capacity F), counts [B, G] int32.
    """
    thr = jnp.quantile(score, 1.0 - cfg.top_keys, axis=-1, keepdims=True, method="linear")
    keep = score >= thr
    if cfg.random_keys > 0:
        keep = keep | (jax.random.uniform(rng, score.shape) < cfg.random_keys)
    return mask_to_indices(keep, cfg.counts_multiple_of)
