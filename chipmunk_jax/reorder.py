"""Token reordering so that contiguous 192/128-token chunks are spatially local (SPEC §3).

Each function acts on one token axis of any array (activations [B, N, C], RoPE tables [N, ...], ...).
Tokens outside [start, start + n_image) (a text prefix, or text after the video) are left where they are.
Permutations are computed with numpy at trace time: grids are static.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

VOXEL_SHAPE = (4, 6, 8)


@functools.cache
def patchify_permutation(h: int, w: int, c1: int = 8, c2: int = 4) -> np.ndarray:
    """Gather order of the image patchify (SPEC §3.1): ``patched = raster[perm]``.

    Raster token (r, c) goes to position P*c1^2 + s*c2^2 + (r % c2)*c2 + (c % c2) with
    P = (r // c1)*(w // c1) + (c // c1) and s = ((r % c1) // c2)*(c1 // c2) + ((c % c1) // c2).

    Raises:
      ValueError: h or w not divisible by c1 and c2, or c2 not dividing c1.
    """
    if c1 % c2 or h % c1 or w % c1 or h % c2 or w % c2:
        raise ValueError(
            "patchify needs h and w divisible by both chunk sizes and chunk_size_2 dividing chunk_size_1; "
            f"got {h=}, {w=}, {c1=}, {c2=}"
        )
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    big = (r // c1) * (w // c1) + (c // c1)
    sub = ((r % c1) // c2) * (c1 // c2) + ((c % c1) // c2)
    pos = big * c1 * c1 + sub * c2 * c2 + (r % c2) * c2 + (c % c2)
    perm = np.empty(h * w, dtype=np.int64)
    perm[pos.reshape(-1)] = np.arange(h * w)
    perm.setflags(write=False)
    return perm


@functools.cache
def voxel_permutation(t: int, h: int, w: int, voxel: tuple[int, int, int] = VOXEL_SHAPE) -> np.ndarray:
    """Gather order of the video voxel order (SPEC §3.2): ``voxelized = raster[perm]``.

    Main region [0:T, 0:Hf, 0:Wf] voxel-major (voxels in raster order, tokens in (vt, vh, vw) raster order),
    then the t-tail [T:t, :, :], the h-tail [0:T, Hf:h, :] and the w-tail [0:T, 0:Hf, Wf:w], each in raster
    order; T, Hf, Wf are t, h, w rounded down to the voxel. No padding.
    """
    vt, vh, vw = voxel
    tf, hf, wf = (t // vt) * vt, (h // vh) * vh, (w // vw) * vw
    ids = np.arange(t * h * w).reshape(t, h, w)
    main = ids[:tf, :hf, :wf].reshape(tf // vt, vt, hf // vh, vh, wf // vw, vw)
    main = main.transpose(0, 2, 4, 1, 3, 5).reshape(-1)
    tails = [ids[tf:, :, :].reshape(-1), ids[:tf, hf:, :].reshape(-1), ids[:tf, :hf, wf:].reshape(-1)]
    perm = np.concatenate([main, *tails])
    assert perm.size == t * h * w
    perm.setflags(write=False)
    return perm


def _apply(x: jax.Array, perm: np.ndarray, axis: int, start: int) -> jax.Array:
    axis = axis % x.ndim
    n_img = perm.size
    if x.shape[axis] < start + n_img:
        raise ValueError(f"token axis {axis} of {x.shape} is shorter than start={start} + {n_img} image tokens")
    idx = np.arange(x.shape[axis])
    idx[start : start + n_img] = start + perm
    return jnp.take(x, jnp.asarray(idx), axis=axis)


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    return inv


def patchify(x: jax.Array, h: int, w: int, *, c1: int = 8, c2: int = 4, axis: int = 1, start: int = 0) -> jax.Array:
    """Reorders the h*w raster image tokens at [start, start + h*w) of ``axis`` into patchified order."""
    return _apply(x, patchify_permutation(h, w, c1, c2), axis, start)


def unpatchify(x: jax.Array, h: int, w: int, *, c1: int = 8, c2: int = 4, axis: int = 1, start: int = 0) -> jax.Array:
    """Exact inverse of ``patchify``."""
    return _apply(x, _inverse(patchify_permutation(h, w, c1, c2)), axis, start)


def voxelize(x: jax.Array, grid: tuple[int, int, int], *, axis: int = 1, start: int = 0) -> jax.Array:
    """Reorders the t*h*w raster video tokens at [start, start + t*h*w) of ``axis`` into voxel order."""
    return _apply(x, voxel_permutation(*grid), axis, start)


def unvoxelize(x: jax.Array, grid: tuple[int, int, int], *, axis: int = 1, start: int = 0) -> jax.Array:
    """Exact inverse of ``voxelize``."""
    return _apply(x, _inverse(voxel_permutation(*grid)), axis, start)
