"""Sampler: Flux schedule, Chipmunk-with-everything-selected == dense, no recompiles, step caching."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import chipmunk_jax as cj
from chipmunk_jax import sampler
from models.flux import Flux, FluxCache, position_ids, rope_table, tiny_config
from models.flux.sampling import check_size, flux_sigmas, generate, pack_noise

STEPS = 10
W = H = 128  # 8 x 8 latent tokens: one patchify chunk


def _randomised(cfg, seed: int) -> Flux:
    """A float32 tiny Flux with every parameter (norm scales included) drawn at random."""
    model = Flux(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [0.25 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, new))


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config(depth_double=3, depth_single=2)
    model = _randomised(cfg, 0)
    rng = np.random.default_rng(0)
    txt = jnp.asarray(rng.standard_normal((2, 8, cfg.context_dim)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((2, cfg.vec_dim)), jnp.float32)
    flux = cj.preset("flux")
    # Everything selected: top_keys 1, no random neurons; full steps every 5 so that a 10-step run has
    # warm-up (0), mask (1), full (5) and sparse attention steps, and full / sparse MLP steps. Layer 0 stays
    # dense, so the double stack runs in three scans of different kinds.
    chip = flux.replace(
        attn=dataclasses.replace(flux.attn, top_keys=1.0, full_step_every=5, first_n_dense_layers=1),
        mlp=dataclasses.replace(flux.mlp, top_keys=1.0, random_keys=0.0, full_step_every=5, first_n_dense_layers=2),
    )
    return model, txt, y, chip


@pytest.fixture(scope="module")
def chip_run(setup):
    model, txt, y, chip = setup
    return generate(model, txt, y, width=W, height=H, steps=STEPS, chipmunk=chip, progress=False)


@pytest.mark.parametrize("dev, seq_len", [(True, 4080), (True, 64), (False, 4080)])
def test_sigmas_match_diffusers_flux_scheduler(dev, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if dev:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    n = 28
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=calculate_shift(seq_len))
    ours = flux_sigmas(n, seq_len, dynamic_shift=dev)
    np.testing.assert_allclose(ours, sched.sigmas.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(ours[:-1] * 1000, sched.timesteps.numpy(), rtol=1e-6)


def test_chipmunk_with_all_selected_equals_dense(setup, chip_run):
    model, txt, y, _ = setup
    labels = set(chip_run.report.step_times)
    for kind in ("attn=warmup", "attn=mask", "attn=full", "attn=sparse", "mlp=full", "mlp=sparse_recompute"):
        assert any(kind in label for label in labels), (kind, labels)
    dense = generate(model, txt, y, width=W, height=H, steps=STEPS, chipmunk=None, progress=False)
    got, want = np.asarray(chip_run.tokens), np.asarray(dense.tokens)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert chip_run.latents.shape == (2, 4, 16, 16)
    assert chip_run.report.stats["attention density (keys kept / keys)"] == pytest.approx(1.0)
    assert chip_run.report.cache_bytes > 0


def test_first_dense_layers_keep_no_cache(chip_run):
    """attn.first_n_dense_layers = 1 and mlp.first_n_dense_layers = 2 over the double-then-single layer index."""
    cache = chip_run.state.cache
    assert not np.any(np.asarray(cache.double_attn.out[0]))
    assert np.all(np.asarray(cache.double_attn.counts[1:]) > 0) and np.all(np.asarray(cache.single_attn.counts) > 0)
    assert not np.any(np.asarray(cache.double_mlp.act[:2]))
    assert np.any(np.asarray(cache.double_mlp.act[2])) and np.all(np.asarray(cache.single_mlp.counts) > 0)


def test_second_generation_does_not_recompile(setup, chip_run):
    model, txt, y, chip = setup
    before = dict(sampler.TRACE_COUNTS)
    again = generate(model, txt * 0.5, y, width=W, height=H, steps=STEPS, chipmunk=chip, seed=7, progress=False)
    assert dict(sampler.TRACE_COUNTS) == before
    assert again.report.compile_s == {}
    assert not np.allclose(np.asarray(again.tokens), np.asarray(chip_run.tokens))


def test_step_caching_matches_hand_computed_skip(setup):
    model, txt, y, _ = setup
    cfg = model.cfg
    off = cj.preset("flux")
    off = off.replace(
        attn=dataclasses.replace(off.attn, is_enabled=False),
        mlp=dataclasses.replace(off.mlp, is_enabled=False),
        step_caching=cj.StepCachingConfig(is_enabled=True, skip_step_schedule=frozenset({2})),
    )
    h = w = 8
    noise = pack_noise(jax.random.key(3), 2, h, w, cfg.in_channels)
    got = generate(
        model, txt, y, width=W, height=H, steps=3, chipmunk=off, noise=noise, patchify_on=False, progress=False
    )
    assert set(got.report.step_times) == {"attn=dense,mlp=dense", "skip"}

    sig = flux_sigmas(3, h * w, dynamic_shift=True)
    rope = rope_table(position_ids(txt.shape[1], h, w), cfg.axes_dim, cfg.theta)
    g = jnp.full((2,), 3.5, jnp.float32)
    x = noise
    hidden = None
    for t in range(2):
        cache = FluxCache(hidden=jnp.zeros((2, h * w, cfg.hidden), jnp.float32))
        v, cache = model(x, txt, y, jnp.full((2,), sig[t]), g, rope, cache)
        x = x + (sig[t + 1] - sig[t]) * v
        hidden = cache.hidden
    vec = model.embed_vec(y, jnp.full((2,), sig[2]), g)
    x = x + (sig[3] - sig[2]) * model.final_layer(hidden, vec)
    np.testing.assert_allclose(np.asarray(got.tokens), np.asarray(x), rtol=1e-5, atol=1e-5)


def test_size_errors_name_valid_sizes():
    with pytest.raises(ValueError, match="nearest valid: 1024 or 1152"):
        check_size(1100, 768)
    with pytest.raises(ValueError, match="height 760 .*nearest valid: 640 or 768"):
        check_size(1280, 760)
    assert check_size(1280, 768) == (48, 80)
    assert check_size(1008, 720, patchify_on=False) == (45, 63)
