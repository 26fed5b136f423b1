"""HunyuanVideo transformer: parity with diffusers (padded prompts), Chipmunk joint attention, full-size shapes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel
from flax import nnx

from chipmunk_jax.config import preset
from chipmunk_jax.indices import attn_top_k, unpack_bits
from chipmunk_jax.schedules import AttnKind, step_kinds
from models.hunyuan_video import (
    HUNYUAN_VIDEO_13B,
    ChipmunkRun,
    HunyuanVideoConfig,
    HunyuanVideoTransformer3D,
    forward,
    hunyuan_static_mask,
    init_hunyuan_cache,
    tiny_config,
    valid_text_length,
)
from tests.models.helpers import (
    HUNYUAN_LATENT,
    HUNYUAN_TEXT_LEN,
    hunyuan_from_diffusers,
    hunyuan_inputs,
    hunyuan_torch_model,
    hunyuan_torch_out,
    rel,
    torch_state,
)

# Latents of 5 x 14 x 20 -> token grid (5, 7, 10): no dimension divisible by the (4, 6, 8) voxel, so the
# voxel order has a main block and all three tails.
LATENT = HUNYUAN_LATENT
GRID = (5, 7, 10)
TEXT_LEN = HUNYUAN_TEXT_LEN  # padded prompt length of hunyuan_inputs
VALID = 6  # valid prompt tokens in the Chipmunk runs


@pytest.fixture(scope="module")
def tiny():
    """(cfg, diffusers model with every parameter random, ours with its weights through the converter)."""
    cfg = tiny_config()
    tm = hunyuan_torch_model(cfg, seed=0)
    return cfg, tm, hunyuan_from_diffusers(cfg, torch_state(tm))


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers.


def test_matches_diffusers_with_padded_prompts(tiny):
    cfg, tm, model = tiny
    inputs = hunyuan_inputs(cfg, valid=[TEXT_LEN - 3, 4])  # both prompts padded, by different amounts
    ref = hunyuan_torch_out(tm, *inputs)
    graphdef, state = nnx.split(model)
    out, new = forward(graphdef, state, *(jnp.asarray(a) for a in inputs), _dense_cache(cfg, 2))
    assert out.shape == ref.shape == (2, cfg.out_channels, *LATENT)
    assert rel(out, ref) <= 1e-5
    # The padding is masked: changing the padded embeddings changes nothing.
    lat, ts, txt, mask, pooled, guidance = inputs
    txt2 = np.where(mask[:, :, None] > 0, txt, 100.0 * np.ones_like(txt))
    out2, _ = forward(
        graphdef, state, *(jnp.asarray(a) for a in (lat, ts, txt2, mask, pooled, guidance)), _dense_cache(cfg, 2)
    )
    np.testing.assert_allclose(np.asarray(out2), np.asarray(out), rtol=0, atol=1e-5)
    # Step caching: the recorded pre-head hidden states reproduce the output through the head alone.
    assert new.attn is None and new.hidden.shape == (2, np.prod(GRID), cfg.hidden)
    again = model.final_layer(new.hidden, jnp.asarray(ts), jnp.asarray(pooled), jnp.asarray(guidance), GRID)
    np.testing.assert_allclose(np.asarray(again), np.asarray(out), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(model.unpatchify(model.patchify(jnp.asarray(lat))[0], GRID)), lat)


def test_full_size_parameter_count():
    with torch.device("meta"):
        ref = HunyuanVideoTransformer3DModel()
    expected = sum(p.numel() for p in ref.parameters())
    abstract = nnx.eval_shape(lambda: HunyuanVideoTransformer3D(HUNYUAN_VIDEO_13B, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == expected
    assert 12.7e9 <= n <= 12.9e9  # 12,821,012,544


# ---------------------------------------------------------------------------------------------------------
# Chipmunk sparse joint attention.


def _dense_cache(cfg: HunyuanVideoConfig, batch: int):
    return init_hunyuan_cache(cfg, None, batch=batch, grid=GRID, text_len=0, dtype=jnp.float32, step_caching=True)


def _schedule_config(first_n_dense_layers: int = 1, **attn):
    base = preset("hunyuan")
    a = dataclasses.replace(
        base.attn, full_step_schedule=frozenset({0, 1, 3}), first_n_dense_layers=first_n_dense_layers, **attn
    )
    return base.replace(attn=a)


def _run(model, ck, inputs, *, static: bool, steps: int = 5):
    """A multi-step run driven by the dense model's velocities; per-step (chipmunk, dense) outputs."""
    cfg = model.cfg
    lat, _, txt, mask, pooled, guidance = (jnp.asarray(a) for a in inputs)
    text_len = valid_text_length(inputs[3])
    graphdef, state = nnx.split(model)
    b = lat.shape[0]
    grid = tuple(s // p for s, p in zip(lat.shape[2:], cfg.patch, strict=True))
    schedule = step_kinds(ck, steps, cfg.num_layers)
    cache = init_hunyuan_cache(cfg, ck, batch=b, grid=grid, text_len=text_len, dtype=jnp.float32)
    key = jax.random.key(7)
    sm = None
    if static:
        m = hunyuan_static_mask(cfg, ck, grid, text_len, jax.random.fold_in(key, 10_000))
        sm = (jnp.asarray(m.mask), jnp.asarray(m.sparse_group))
    sigmas = np.linspace(1.0, 0.2, steps + 1)
    x, results, kinds = lat, [], []
    for t in range(steps):
        plan = schedule.steps[t]
        kinds.append(plan.attn[-1])
        ts = jnp.full((b,), sigmas[t] * 1000.0, jnp.float32)
        args = (x, ts, txt, mask, pooled, guidance)
        out, cache = forward(
            graphdef,
            state,
            *args,
            cache,
            chipmunk=ChipmunkRun(ck, plan),
            text_len=text_len,
            rng=key,
            step=t,
            static_mask=sm,
        )
        # The dense reference shares the parity test's compilation (same shapes, hidden-only cache).
        dense, _ = forward(graphdef, state, *args, _dense_cache(cfg, b))
        results.append((np.asarray(out), np.asarray(dense)))
        x = x + jnp.float32(sigmas[t + 1] - sigmas[t]) * dense
    return results, kinds, cache


def test_chipmunk_all_keys_equals_dense_with_padded_text(tiny):
    cfg, _, model = tiny
    n = int(np.prod(GRID)) + VALID
    # Every key selected: top_keys 1, no random keys, no static mask (with top_keys 1 every group would fail the
    # static-mask sparsity test and use only its static row, SPEC §1.3).
    ck = _schedule_config(top_keys=1.0, random_keys=0.0)
    assert attn_top_k(ck.attn, n) >= n
    inputs = hunyuan_inputs(cfg, valid=[VALID, VALID], seed=1)
    results, kinds, cache = _run(model, ck, inputs, static=False)
    assert kinds == [AttnKind.WARMUP, AttnKind.MASK, AttnKind.SPARSE, AttnKind.MASK, AttnKind.SPARSE]
    # One cache per sparsified layer (double, then single blocks) over [video; valid text] only.
    assert cache.attn.out.shape == (cfg.num_layers - 1, 2, cfg.heads, n, cfg.head_dim)
    assert np.asarray(unpack_bits(cache.attn.mask_bits, n)).all()
    for t, (out, dense) in enumerate(results):
        err = rel(out, dense)
        assert err <= 1e-5, (t, kinds[t], err)


@pytest.mark.slow  # ~25 s of compilation on a loaded 2-core machine; `-m "not slow"` leaves it out
def test_chipmunk_sparse_with_static_mask_stays_close_to_dense(tiny):
    cfg, _, model = tiny
    # Sparse single blocks only (the double blocks' sparse path is covered above): one compiled sparse scan per kind.
    ck = _schedule_config(first_n_dense_layers=cfg.depth_double, top_keys=0.3, random_keys=0.01)
    inputs = hunyuan_inputs(cfg, valid=[VALID, VALID], seed=4)
    results, kinds, cache = _run(model, ck, inputs, static=True)
    for t, (out, dense) in enumerate(results):
        err = rel(out, dense)
        if kinds[t] is AttnKind.SPARSE:
            assert 1e-6 < err < 0.05, (t, err)  # a real approximation, but a close one
        else:
            assert err <= 1e-5, (t, kinds[t], err)  # full steps return exact dense attention
    n = int(np.prod(GRID)) + VALID
    selected = np.asarray(unpack_bits(cache.attn.mask_bits, n))
    assert 0.2 < selected.mean() < 0.7
    assert selected[..., -VALID:].all()  # every query group attends all valid text (static mask rule 1)


def test_chipmunk_argument_errors(tiny):
    cfg, _, model = tiny
    lat, ts, txt, mask, pooled, guidance = (jnp.asarray(a) for a in hunyuan_inputs(cfg, valid=[VALID, 4]))
    with pytest.raises(ValueError, match="one valid prompt length"):
        valid_text_length(mask)
    with pytest.raises(ValueError, match="prefix"):
        valid_text_length(np.array([[0, 1, 1]]))
    ck = _schedule_config(top_keys=0.3)
    plan = step_kinds(ck, 5, cfg.num_layers).steps[2]
    cache = init_hunyuan_cache(cfg, ck, batch=2, grid=GRID, text_len=VALID, dtype=jnp.float32)
    run = ChipmunkRun(ck, plan)
    call = lambda **kw: model(lat, ts, txt, mask, pooled, guidance, cache, chipmunk=run, **kw)
    with pytest.raises(ValueError, match="text_len"):
        call()
    with pytest.raises(ValueError, match="one valid prompt length"):
        call(text_len=VALID)
    with pytest.raises(ValueError, match="guidance"):
        model(lat, ts, txt, mask, pooled)
