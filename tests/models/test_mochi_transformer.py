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

# Latents 4 x 12 x 18 with patch 2 -> token grid (4, 6, 9): one full (4, 6, 8) voxel plus a w tail in voxel order.
# 7 text slots; the parity test's rows have 5 and 2 valid tokens.
LATENT = (4, 12, 18)
GRID = (4, 6, 9)
TEXT_SLOTS = 7


def _diffusers(cfg: MochiConfig, seed: int) -> MochiTransformer3DModel:
    """A diffusers model of ``cfg`` with EVERY parameter randomised (norm weights and pos_frequencies included)."""
    m = MochiTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim,
        num_layers=cfg.num_layers,
        pooled_projection_dim=cfg.text_width,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        text_embed_dim=cfg.text_dim,
        time_embed_dim=cfg.time_embed_dim,
    ).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            fan_in = p.shape[-1] if p.ndim >= 2 else 4
            noise = torch.randn(p.shape, generator=g) / fan_in**0.5
            if "norm" in name and name.endswith("weight") and p.ndim == 1:
                noise = noise + 1.0  # RMS scales around 1 (random, but not so small they hide the normalised values)
            p.copy_(noise)
    return m


def _load(cfg: MochiConfig, tm: MochiTransformer3DModel) -> MochiTransformer3D:
    """The JAX model with the diffusers weights (an explicit test-side key table; float32)."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in tm.state_dict().items()}
    c, ct, p = cfg.dim, cfg.text_width, cfg.patch_size
    # Abstract construction (eager random init of every small tensor is slow on CPU); every leaf is replaced below.
    model = nnx.eval_shape(lambda: MochiTransformer3D(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32))

    def put(module, name, arr):
        old = getattr(module, name)
        assert old.shape == arr.shape, (name, old.shape, arr.shape)
        setattr(module, name, nnx.Param(jnp.asarray(arr, jnp.float32)))

    def lin(module, key):
        put(module, "kernel", sd.pop(f"{key}.weight").T)
        put(module, "bias", sd.pop(f"{key}.bias"))

    put(
        model.patch_embed,
        "kernel",
        sd.pop("patch_embed.proj.weight").transpose(2, 3, 1, 0).reshape(p * p * cfg.in_channels, c),
    )
    put(model.patch_embed, "bias", sd.pop("patch_embed.proj.bias"))
    lin(model.timestep_embedder.linear_1, "time_embed.timestep_embedder.linear_1")
    lin(model.timestep_embedder.linear_2, "time_embed.timestep_embedder.linear_2")
    for name in ("to_kv", "to_q", "to_out"):
        lin(getattr(model.pooler, name), f"time_embed.pooler.{name}")
    lin(model.caption_proj, "time_embed.caption_proj")
    put(model, "pos_frequencies", sd.pop("pos_frequencies"))
    lin(model.norm_out, "norm_out.linear")
    lin(model.proj_out, "proj_out")

    def block(i: int, last: bool) -> dict[str, np.ndarray]:
        b = f"transformer_blocks.{i}"
        g = lambda k: sd.pop(f"{b}.{k}")  # noqa: E731
        out = {
            "mod_w": g("norm1.linear.weight").T,
            "mod_b": g("norm1.linear.bias"),
            "qkv_w": np.stack([g(f"attn1.to_{n}.weight").T for n in "qkv"], axis=1),
            "ctx_qkv_w": np.stack([g(f"attn1.add_{n}_proj.weight").T for n in "qkv"], axis=1),
            "norm_q": g("attn1.norm_q.weight"),
            "norm_k": g("attn1.norm_k.weight"),
            "norm_ctx_q": g("attn1.norm_added_q.weight"),
            "norm_ctx_k": g("attn1.norm_added_k.weight"),
            "out_w": g("attn1.to_out.0.weight").T,
            "out_b": g("attn1.to_out.0.bias"),
        }
        up, gate = np.split(g("ff.net.0.proj.weight").T, 2, axis=1)  # diffusers SwiGLU: [up; gate]
        out.update(ff_gate_w=gate, ff_up_w=up, ff_down_w=g("ff.net.2.weight").T)
        if last:
            out.update(ctx_scale_w=g("norm1_context.linear_1.weight").T, ctx_scale_b=g("norm1_context.linear_1.bias"))
        else:
            cup, cgate = np.split(g("ff_context.net.0.proj.weight").T, 2, axis=1)
            out.update(
                ctx_mod_w=g("norm1_context.linear.weight").T,
                ctx_mod_b=g("norm1_context.linear.bias"),
                ctx_out_w=g("attn1.to_add_out.weight").T,
                ctx_out_b=g("attn1.to_add_out.bias"),
                ctx_ff_gate_w=cgate,
                ctx_ff_up_w=cup,
                ctx_ff_down_w=g("ff_context.net.2.weight").T,
            )
        return out

    layers = [block(i, False) for i in range(cfg.num_layers - 1)]
    for name in layers[0]:
        put(model.blocks, name, np.stack([lay[name] for lay in layers]))
    for name, arr in block(cfg.num_layers - 1, True).items():
        put(model.last_block, name, arr)
    assert not sd, sorted(sd)  # every diffusers tensor used
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.Array) for x in leaves)  # and every JAX parameter set
    assert c == cfg.heads * cfg.head_dim and ct == cfg.text_width
    return model


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    tm = _diffusers(cfg, seed=0)
    return cfg, tm, _load(cfg, tm)


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


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_matches_diffusers_with_padded_text(tiny):
    cfg, tm, model = tiny
    assert float(np.abs(np.asarray(model.pos_frequencies[...])).min()) > 0  # RoPE is really exercised
    lat, ts, txt, mask = _inputs(cfg, valid=(5, 2))
    ref = _torch_out(tm, lat, ts, txt, mask)
    graphdef, state = nnx.split(model)
    out, _ = forward(graphdef, state, *(jnp.asarray(a) for a in (lat, ts, txt, mask)))
    assert out.shape == ref.shape == (2, cfg.out_channels, *LATENT)
    assert _rel(out, ref) < 2e-5
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
            assert _rel(out[branch], dense[branch]) <= 1e-5, (t, branch)
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
        err = _rel(out, dense)
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
