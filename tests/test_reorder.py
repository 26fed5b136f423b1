"""Tests of chipmunk_jax.reorder against SPEC §3: closed forms checked element by element with loops."""

import jax.numpy as jnp
import numpy as np
import pytest

from chipmunk_jax.reorder import (
    patchify,
    patchify_permutation,
    unpatchify,
    unvoxelize,
    voxel_permutation,
    voxelize,
)


def _spec_patch_positions(h, w, c1, c2):
    """SPEC §3.1: destination position of raster token (r, c), by a plain loop."""
    pos = {}
    for r in range(h):
        for c in range(w):
            big = (r // c1) * (w // c1) + (c // c1)
            sub = ((r % c1) // c2) * (c1 // c2) + ((c % c1) // c2)
            pos[(r, c)] = big * c1 * c1 + sub * c2 * c2 + (r % c2) * c2 + (c % c2)
    return pos


def _spec_voxel_order(t, h, w, voxel=(4, 6, 8)):
    """SPEC §3.2: the raster ids (t, h, w flattened) in voxel order, by plain loops."""
    vt, vh, vw = voxel
    tf, hf, wf = (t // vt) * vt, (h // vh) * vh, (w // vw) * vw

    def rid(a, b, c):
        return (a * h + b) * w + c

    order = []
    for bt in range(tf // vt):
        for bh in range(hf // vh):
            for bw in range(wf // vw):
                for i in range(vt):
                    for j in range(vh):
                        for k in range(vw):
                            order.append(rid(bt * vt + i, bh * vh + j, bw * vw + k))
    for a in range(tf, t):  # t-tail [T:t, :, :]
        for b in range(h):
            for c in range(w):
                order.append(rid(a, b, c))
    for a in range(tf):  # h-tail [0:T, Hf:h, :]
        for b in range(hf, h):
            for c in range(w):
                order.append(rid(a, b, c))
    for a in range(tf):  # w-tail [0:T, 0:Hf, Wf:w]
        for b in range(hf):
            for c in range(wf, w):
                order.append(rid(a, b, c))
    return order


PATCH_SHAPES = [(8, 8, 8, 4), (16, 24, 8, 4), (24, 16, 8, 4), (12, 20, 4, 2), (8, 16, 8, 8), (6, 9, 3, 1)]
VIDEO_GRIDS = [(4, 6, 8), (8, 12, 16), (5, 7, 9), (1, 12, 16), (1, 6, 8), (9, 13, 17), (3, 5, 7), (6, 6, 10)]


@pytest.mark.parametrize("h, w, c1, c2", PATCH_SHAPES)
def test_patchify_closed_form(h, w, c1, c2):
    pos = _spec_patch_positions(h, w, c1, c2)
    assert sorted(pos.values()) == list(range(h * w))
    raster = np.arange(h * w, dtype=np.int32) * 3 + 1  # values distinct from positions
    x = jnp.asarray(raster)[None, :]  # [1, N]
    out = np.asarray(patchify(x, h, w, c1=c1, c2=c2))[0]
    for (r, c), p in pos.items():
        assert out[p] == raster[r * w + c], (r, c, p)
    perm = patchify_permutation(h, w, c1, c2)
    for (r, c), p in pos.items():
        assert perm[p] == r * w + c


def test_patchify_flux_first_tokens():
    # 16 x 16 grid, C1 = 8, C2 = 4: the first 16 positions are the top-left 4 x 4 sub-chunk in raster order,
    # the next 16 the sub-chunk to its right (columns 4..7), then rows 4..7 columns 0..3.
    perm = patchify_permutation(16, 16, 8, 4)
    assert list(perm[:16]) == [r * 16 + c for r in range(4) for c in range(4)]
    assert list(perm[16:32]) == [r * 16 + c for r in range(4) for c in range(4, 8)]
    assert list(perm[32:48]) == [r * 16 + c for r in range(4, 8) for c in range(4)]
    assert list(perm[64:80]) == [r * 16 + c for r in range(4) for c in range(8, 12)]


@pytest.mark.parametrize("grid", VIDEO_GRIDS)
def test_voxel_order_closed_form(grid):
    t, h, w = grid
    order = _spec_voxel_order(t, h, w)
    assert sorted(order) == list(range(t * h * w))
    perm = voxel_permutation(t, h, w)
    assert perm.shape == (t * h * w,)
    raster = np.arange(t * h * w, dtype=np.int32) * 7 - 5
    out = np.asarray(voxelize(jnp.asarray(raster)[None, :], grid))[0]
    for p, src in enumerate(order):
        assert perm[p] == src, (p, src)
        assert out[p] == raster[src], (p, src)


def test_voxel_order_first_voxel_and_tails():
    t, h, w = 5, 7, 9  # one full voxel, tails in every dimension
    perm = voxel_permutation(t, h, w)
    first = [(a * h + b) * w + c for a in range(4) for b in range(6) for c in range(8)]
    assert list(perm[:192]) == first
    n_t_tail = 1 * h * w
    assert list(perm[192 : 192 + n_t_tail]) == list(range(4 * h * w, 5 * h * w))
    h_tail = perm[192 + n_t_tail : 192 + n_t_tail + 4 * 1 * w]
    assert list(h_tail) == [(a * h + 6) * w + c for a in range(4) for c in range(w)]
    w_tail = perm[192 + n_t_tail + 4 * w :]
    assert list(w_tail) == [(a * h + b) * w + 8 for a in range(4) for b in range(6)]


def test_single_frame_grid_is_raster_order():
    # t < 4: there is no full voxel, so everything is the t-tail in raster order.
    assert list(voxel_permutation(1, 12, 16)) == list(range(12 * 16))
    assert list(voxel_permutation(3, 6, 8)) == list(range(3 * 6 * 8))


def _rand(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


# Text offsets and array layouts (token axis, rank) rotate over the shapes to keep compilations few.
OFFSETS = [(0, 0), (5, 0), (0, 3), (7, 4)]


def _layouts(n, i):
    all_layouts = [((2, n, 3), 1), ((n, 4), 0), ((2, 3, n, 5), 2), ((2, 3, n, 5), -2), ((n,), 0)]
    return [all_layouts[i % 5], all_layouts[(i + 2) % 5]]


@pytest.mark.parametrize("i", range(len(PATCH_SHAPES) * 2))
def test_patchify_roundtrip_with_text(i):
    h, w, c1, c2 = PATCH_SHAPES[i % len(PATCH_SHAPES)]
    start, trail = OFFSETS[i % 4]
    n = start + h * w + trail
    src = np.empty(h * w, dtype=np.int64)  # src[p] = raster id that lands at position p
    for (r, c), p in _spec_patch_positions(h, w, c1, c2).items():
        src[p] = r * w + c
    for shape, axis in _layouts(n, i):
        x = _rand(shape, seed=n + len(shape))
        y = patchify(x, h, w, c1=c1, c2=c2, axis=axis, start=start)
        assert y.shape == x.shape
        z = unpatchify(y, h, w, c1=c1, c2=c2, axis=axis, start=start)
        np.testing.assert_array_equal(np.asarray(z), np.asarray(x))
        xm, ym = np.moveaxis(np.asarray(x), axis, 0), np.moveaxis(np.asarray(y), axis, 0)
        np.testing.assert_array_equal(ym[:start], xm[:start])  # text prefix untouched
        np.testing.assert_array_equal(ym[start + h * w :], xm[start + h * w :])  # trailing tokens untouched
        # Image part is the SPEC permutation of the original image part.
        np.testing.assert_array_equal(ym[start : start + h * w], xm[start + src])
        # Unpatchify of a patchified order is the inverse on its own too.
        np.testing.assert_array_equal(
            np.asarray(
                patchify(
                    unpatchify(x, h, w, c1=c1, c2=c2, axis=axis, start=start),
                    h,
                    w,
                    c1=c1,
                    c2=c2,
                    axis=axis,
                    start=start,
                )
            ),
            np.asarray(x),
        )


@pytest.mark.parametrize("i", range(len(VIDEO_GRIDS) * 2))
def test_voxelize_roundtrip_with_text(i):
    grid = VIDEO_GRIDS[i % len(VIDEO_GRIDS)]
    start, trail = [(0, 0), (0, 11), (4, 0), (3, 9)][(i // len(VIDEO_GRIDS) + i) % 4]
    t, h, w = grid
    n_vid = t * h * w
    n = start + n_vid + trail
    order = _spec_voxel_order(t, h, w)
    for shape, axis in _layouts(n, i + 1):
        x = _rand(shape, seed=n + 3 * len(shape))
        y = voxelize(x, grid, axis=axis, start=start)
        assert y.shape == x.shape
        z = unvoxelize(y, grid, axis=axis, start=start)
        np.testing.assert_array_equal(np.asarray(z), np.asarray(x))
        xm, ym = np.moveaxis(np.asarray(x), axis, 0), np.moveaxis(np.asarray(y), axis, 0)
        np.testing.assert_array_equal(ym[:start], xm[:start])
        np.testing.assert_array_equal(ym[start + n_vid :], xm[start + n_vid :])
        np.testing.assert_array_equal(ym[start : start + n_vid], xm[start + np.asarray(order)])
        np.testing.assert_array_equal(
            np.asarray(voxelize(unvoxelize(x, grid, axis=axis, start=start), grid, axis=axis, start=start)),
            np.asarray(x),
        )


def test_rope_table_reorder_matches_tokens():
    # RoPE tables [N, d] on axis 0 get the same permutation as activations [B, N, C] on axis 1.
    grid, text = (5, 7, 9), 6
    n = grid[0] * grid[1] * grid[2] + text
    rope = _rand((n, 8), seed=1)
    act = jnp.broadcast_to(rope[None], (2, n, 8))
    r2 = voxelize(rope, grid, axis=0)
    a2 = voxelize(act, grid, axis=1)
    np.testing.assert_array_equal(np.asarray(a2[1]), np.asarray(r2))


@pytest.mark.parametrize(
    "h, w, c1, c2", [(12, 16, 8, 4), (16, 12, 8, 4), (16, 16, 8, 3), (16, 16, 6, 4), (10, 10, 4, 2)]
)
def test_patchify_bad_sizes_raise(h, w, c1, c2):
    x = jnp.zeros((1, h * w, 2), jnp.float32)
    with pytest.raises(ValueError):
        patchify(x, h, w, c1=c1, c2=c2)
    with pytest.raises(ValueError):
        unpatchify(x, h, w, c1=c1, c2=c2)


def test_too_short_token_axis_raises():
    x = jnp.zeros((1, 63, 2), jnp.float32)
    with pytest.raises(ValueError):
        patchify(x, 8, 8)
    with pytest.raises(ValueError):
        patchify(jnp.zeros((1, 64, 2), jnp.float32), 8, 8, start=1)
    with pytest.raises(ValueError):
        voxelize(jnp.zeros((1, 191, 2), jnp.float32), (4, 6, 8))
    with pytest.raises(ValueError):
        unvoxelize(jnp.zeros((1, 192, 2), jnp.float32), (4, 6, 8), start=2)
    with pytest.raises(ValueError):
        voxelize(jnp.zeros((192, 2), jnp.float32), (4, 6, 8), axis=1)
