"""Mochi 1 transformer: parity with diffusers, Chipmunk sparse joint attention, full-size parameter count."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import MochiTransformer3DModel
from flax import nnx

from chipmunk_jax.config import preset
from chipmunk_jax.indices import attn_top_k, unpack_bits
from chipmunk_jax.schedules import AttnKind, step_kinds
from models.mochi import (
    MOCHI_1_PREVIEW,
    ChipmunkRun,
    MochiConfig,
    MochiTransformer3D,
    forward,
    init_mochi_cache,
    mochi_static_mask,
    tiny_config,
)
from tests.models.helpers import mochi_diffusers_model, mochi_from_diffusers, rel

# Latents 4 x 12 x 18 with patch 2 -> token grid (4, 6, 9): one full (4, 6, 8) voxel plus a w tail in voxel order.
# 7 text slots; the parity test's rows have 5 and 2 valid tokens.
LATENT = (4, 12, 18)
GRID = (4, 6, 9)
TEXT_SLOTS = 7


@pytest.fixture(scope="module")
def tiny():
    """(cfg, diffusers model with every parameter random, ours with its weights through the Mochi converter)."""
    cfg = tiny_config()
    tm = mochi_diffusers_model(cfg, seed=0)
    return cfg, tm, mochi_from_diffusers(cfg, tm)


def _inputs(cfg: MochiConfig, valid: tuple[int, ...], latent=LATENT, slots=TEXT_SLOTS, seed=0):
    rs = np.random.RandomState(seed)
    b = len(valid)
    lat = rs.randn(b, cfg.in_channels, *latent).astype(np.float32)
    ts = rs.uniform(0, 1000, size=(b,)).astype(np.float32)
    txt = rs.randn(b, slots, cfg.text_dim).astype(np.float32)
    mask = np.arange(slots)[None, :] < np.asarray(valid)[:, None]
    return lat, ts, txt, mask


def _torch_out(tm, lat, ts, txt, mask) -> np.ndarray:
    with torch.no_grad():
        args = (torch.tensor(lat), torch.tensor(txt), torch.tensor(ts), torch.tensor(mask))
        return tm(*args, return_dict=False)[0].numpy()


def test_matches_diffusers_with_padded_text(tiny):
    cfg, tm, model = tiny
    assert float(np.abs(np.asarray(model.pos_frequencies[...])).min()) > 0  # RoPE is really exercised
    lat, ts, txt, mask = _inputs(cfg, valid=(5, 2))
    ref = _torch_out(tm, lat, ts, txt, mask)
    graphdef, state = nnx.split(model)
    out, _ = forward(graphdef, state, *(jnp.asarray(a) for a in (lat, ts, txt, mask)))
    assert out.shape == ref.shape == (2, cfg.out_channels, *LATENT)
    assert rel(out, ref) < 2e-5
    # Padded text really is masked: changing the padding embeddings changes nothing.
    txt2 = txt.copy()
    txt2[~mask] = 100.0
    out2, _ = forward(graphdef, state, *(jnp.asarray(a) for a in (lat, ts, txt2, mask)))
    np.testing.assert_allclose(np.asarray(out2), np.asarray(out), rtol=0, atol=1e-5)


def test_full_size_parameter_count():
    with torch.device("meta"):
        ref = sum(p.numel() for p in MochiTransformer3DModel().parameters())
    abstract = nnx.eval_shape(lambda: MochiTransformer3D(MOCHI_1_PREVIEW, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == ref
    assert 9.5e9 < n < 10.5e9  # 10,027,677,744 ("10B")


# ---------------------------------------------------------------------------------------------------------
# Chipmunk sparse joint attention.


def _schedule_config(**attn):
    base = preset("mochi")
    a = dataclasses.replace(base.attn, full_step_schedule=frozenset({0, 1, 4}), first_n_dense_layers=1, **attn)
    return base.replace(attn=a)


def _cfg_run(model, ck, lat0, txt, mask, text_len, *, static: bool, steps: int = 6, step_caching: bool = False):
    """A CFG run (cond and uncond batched, cond first) driven by the dense velocities; returns per-step
    (chipmunk output, dense output), the kinds of the last layer and the final cache."""
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    grid = (lat0.shape[2], lat0.shape[3] // cfg.patch_size, lat0.shape[4] // cfg.patch_size)
    schedule = step_kinds(ck, steps, cfg.num_layers)
    cache = init_mochi_cache(
        cfg, ck, batch=2, grid=grid, text_len=text_len, dtype=jnp.float32, step_caching=step_caching
    )
    key = jax.random.key(3)
    sm = None
    if static:
        m = mochi_static_mask(cfg, ck, grid, text_len, jax.random.fold_in(key, 10_000))
        sm = (jnp.asarray(m.mask), jnp.asarray(m.sparse_group))
    x, sigmas = lat0, np.linspace(1.0, 0.2, steps + 1)
    results, kinds = [], []
    for t in range(steps):
        plan = schedule.steps[t]
        kinds.append(plan.attn[-1])
        xx = jnp.concatenate([x, x], axis=0)
        ts = jnp.full((2,), sigmas[t] * 1000.0, jnp.float32)
        run = ChipmunkRun(ck, plan, text_len)
        out, cache = forward(graphdef, state, xx, ts, txt, mask, cache, chipmunk=run, rng=key, step=t, static_mask=sm)
        dense, _ = forward(graphdef, state, xx, ts, txt, mask)
        results.append((np.asarray(out), np.asarray(dense)))
        v = dense[1] + 4.5 * (dense[0] - dense[1])
        x = x + jnp.float32(sigmas[t + 1] - sigmas[t]) * v[None]
    return results, kinds, cache


def test_chipmunk_all_keys_equals_dense_over_cfg_run(tiny):
    cfg, _, model = tiny
    # Same shapes as the parity test, so the dense program is compiled once for both.
    lat, _, txt, mask = _inputs(cfg, valid=(4, 4), seed=1)
    n = int(np.prod(GRID)) + 4
    ck = _schedule_config(top_keys=1.0, random_keys=0.0, local_voxels=0)
    assert attn_top_k(ck.attn, n) >= n
    results, kinds, cache = _cfg_run(
        model, ck, jnp.asarray(lat[:1]), jnp.asarray(txt), jnp.asarray(mask), 4, static=False, step_caching=True
    )
    assert kinds == [AttnKind.WARMUP, AttnKind.MASK, AttnKind.SPARSE, AttnKind.SPARSE, AttnKind.MASK, AttnKind.SPARSE]
    assert np.asarray(unpack_bits(cache.attn.mask_bits, n)).all()
    assert cache.attn.out.shape == (cfg.num_layers - 1, 2, cfg.heads, n, cfg.head_dim)
    for t, (out, dense) in enumerate(results):
        for branch in (0, 1):  # cond, uncond: each its own cache slice
            assert rel(out[branch], dense[branch]) <= 1e-5, (t, branch)
    # Step caching: the recorded raster hidden states reproduce the last output through the head alone.
    ts_last = jnp.full((2,), np.linspace(1.0, 0.2, 7)[5] * 1000.0, jnp.float32)  # step 5 of _cfg_run
    again = model.final_layer(cache.hidden, ts_last, jnp.asarray(txt), jnp.asarray(mask), GRID)
    np.testing.assert_allclose(np.asarray(again), results[-1][0], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("CHIPMUNK_SLOW_TESTS"), reason="~40 s of compiles on CPU: set CHIPMUNK_SLOW_TESTS=1 to run"
)
def test_chipmunk_sparse_stays_close_to_dense(tiny):
    cfg, _, model = tiny
    lat, _, txt, mask = _inputs(cfg, valid=(3, 3), latent=(8, 12, 32), seed=2)  # grid (8, 6, 16): 4 voxels
    ck = _schedule_config(top_keys=0.3, local_voxels=1, random_keys=0.01)
    results, kinds, cache = _cfg_run(
        model, ck, jnp.asarray(lat[:1]), jnp.asarray(txt), jnp.asarray(mask), 3, static=True
    )
    for t, (out, dense) in enumerate(results):
        err = rel(out, dense)
        if kinds[t] is AttnKind.SPARSE:
            assert 1e-6 < err < 0.1, (t, err)  # a real approximation, but a close one
        else:
            assert err <= 1e-5, (t, kinds[t], err)
    selected = np.asarray(unpack_bits(cache.attn.mask_bits, 8 * 6 * 16 + 3))
    assert 0.2 < selected.mean() < 0.8


def test_chipmunk_errors(tiny):
    cfg, _, model = tiny
    lat, ts, txt, mask = (jnp.asarray(a) for a in _inputs(cfg, valid=(5, 2)))
    ck = _schedule_config(top_keys=0.3)
    plan = step_kinds(ck, 6, cfg.num_layers).steps[0]
    cache = init_mochi_cache(cfg, ck, batch=2, grid=GRID, text_len=5, dtype=jnp.float32)
    with pytest.raises(ValueError, match="exactly text_len=5"):
        model(lat, ts, txt, mask, cache, chipmunk=ChipmunkRun(ck, plan, 5))
    with pytest.raises(ValueError, match="needs the cache"):
        model(lat, ts, txt, mask, chipmunk=ChipmunkRun(ck, plan, 2))
    with pytest.raises(ValueError, match="not divisible"):
        model(lat[..., :11], ts, txt, mask)
