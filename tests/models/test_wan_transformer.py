"""Wan2.1 transformer: parity with diffusers, the weight converter, and Chipmunk sparse self-attention."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from flax import nnx
from safetensors.numpy import save_file

from chipmunk_jax.config import preset
from chipmunk_jax.indices import attn_top_k, unpack_bits
from chipmunk_jax.schedules import AttnKind, step_kinds
from convert_weights import wan as cw
from convert_weights.common import ConversionError
from models.wan import (
    WAN_I2V_14B,
    WAN_T2V_1_3B,
    WAN_T2V_14B,
    ChipmunkRun,
    WanConfig,
    WanTransformer3D,
    forward,
    init_wan_cache,
    tiny_config,
    wan_static_mask,
)
from tests.models.helpers import rel, torch_state, wan_torch_model

# Latents of 5 x 14 x 20 -> token grid (5, 7, 10): no dimension divisible by the (4, 6, 8) voxel, so the
# voxel order has a main block and all three tails.
LATENT = (5, 14, 20)
GRID = (5, 7, 10)
TEXT_LEN = 7


@pytest.fixture(scope="module")
def t2v():
    cfg = tiny_config()
    tm = wan_torch_model(cfg, seed=0)
    sd = torch_state(tm)
    model = cw.to_model(cfg, cw.convert_tensors(sd, cfg), dtype=jnp.float32)
    return cfg, tm, sd, model


def _inputs(cfg: WanConfig, batch: int, latent=LATENT, text_len=TEXT_LEN, seed=0):
    rs = np.random.RandomState(seed)
    lat = rs.randn(batch, cfg.in_channels, *latent).astype(np.float32)
    ts = rs.uniform(0, 1000, size=(batch,)).astype(np.float32)
    txt = rs.randn(batch, text_len, cfg.text_dim).astype(np.float32)
    return lat, ts, txt


def _torch_out(tm, lat, ts, txt, img=None) -> np.ndarray:
    with torch.no_grad():
        out = tm(
            torch.tensor(lat),
            torch.tensor(ts),
            torch.tensor(txt),
            encoder_hidden_states_image=None if img is None else torch.tensor(img),
            return_dict=False,
        )[0]
    return out.numpy()


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers.


def test_t2v_matches_diffusers_batch2_odd_grid(t2v):
    cfg, tm, _, model = t2v
    lat, ts, txt = _inputs(cfg, batch=2)
    ref = _torch_out(tm, lat, ts, txt)
    graphdef, state = nnx.split(model)
    cache = init_wan_cache(cfg, None, batch=2, grid=GRID, dtype=jnp.float32, step_caching=True)
    out, new = forward(graphdef, state, jnp.asarray(lat), jnp.asarray(ts), jnp.asarray(txt), cache)
    assert out.shape == ref.shape == (2, cfg.out_channels, *LATENT)
    assert rel(out, ref) <= 1e-5
    # Step caching: the recorded pre-head hidden states reproduce the output through the head alone.
    assert new.attn is None and new.hidden.shape == (2, np.prod(GRID), cfg.dim)
    again = model.final_layer(new.hidden, jnp.asarray(ts), GRID)
    np.testing.assert_allclose(np.asarray(again), np.asarray(out), rtol=0, atol=1e-6)
    # Channels-last latents give the same patch tokens, and unpatchify inverts patchify in both layouts.
    x = jnp.asarray(lat)
    tok, grid = model.patchify(x, channels_last=False)
    tok_cl, grid_cl = model.patchify(jnp.moveaxis(x, 1, -1), channels_last=True)
    assert grid == grid_cl == GRID
    np.testing.assert_array_equal(np.asarray(tok), np.asarray(tok_cl))
    np.testing.assert_array_equal(np.asarray(model.unpatchify(tok, grid, False)), lat)
    np.testing.assert_array_equal(np.asarray(model.unpatchify(tok, grid, True)), np.moveaxis(lat, 1, -1))


def test_i2v_matches_diffusers():
    cfg = tiny_config(i2v=True, num_layers=2)
    tm = wan_torch_model(cfg, seed=1)
    model = cw.to_model(cfg, cw.convert_tensors(torch_state(tm), cfg), dtype=jnp.float32)
    # diffusers splits image tokens off the context assuming exactly 512 text tokens.
    lat, ts, txt = _inputs(cfg, batch=2, latent=(2, 6, 8), text_len=512, seed=1)
    img = np.random.RandomState(2).randn(2, 5, cfg.image_dim).astype(np.float32)
    ref = _torch_out(tm, lat, ts, txt, img)
    graphdef, state = nnx.split(model)
    out, _ = forward(graphdef, state, jnp.asarray(lat), jnp.asarray(ts), jnp.asarray(txt), image=jnp.asarray(img))
    assert rel(out, ref) <= 1e-5
    with pytest.raises(ValueError, match="I2V"):
        model(jnp.asarray(lat), jnp.asarray(ts), jnp.asarray(txt))


# ---------------------------------------------------------------------------------------------------------
# Converter.

_BLOCK_PARTS = {
    k for k in cw.DIFFUSERS_NAMES if k.startswith(("sa_", "ca_", "ffn_")) or k in ("cross_norm", "block_table")
}


def _to_original_names(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames a diffusers state dict to the original Wan release names through the converter's name tables."""
    out = {}
    for key, a in sd.items():
        prefix, rest = "", key
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            prefix = f"blocks.{i}."
        d = cw.DIFFUSERS_NAMES
        parts = [k for k in d if (k in _BLOCK_PARTS) == bool(prefix) and (rest == d[k] or rest.startswith(d[k] + "."))]
        assert len(parts) == 1, (key, parts)
        out[prefix + cw.ORIGINAL_NAMES[parts[0]] + rest[len(d[parts[0]]) :]] = a
    return out


def test_infer_config_and_original_names(t2v):
    cfg, _, sd, model = t2v
    assert cw.infer_config(sd, head_dim=cfg.head_dim, rope_max_seq_len=cfg.rope_max_seq_len) == cfg
    # Original release names, checked against diffusers' own original -> diffusers converter.
    orig = _to_original_names(sd)
    back = convert_wan_transformer_to_diffusers({k: torch.tensor(v) for k, v in orig.items()})
    assert sorted(back) == sorted(sd)
    assert all(np.array_equal(back[k].numpy(), sd[k]) for k in sd)
    assert cw.detect_format(orig) == cw.ORIGINAL
    a, b = cw.convert_tensors(orig, cfg), cw.convert_tensors(sd, cfg)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_convert_file_and_load(t2v, tmp_path):
    cfg, _, sd, model = t2v
    # A ComfyUI-style single file: original names behind the "model.diffusion_model." prefix.
    src = tmp_path / "wan.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in _to_original_names(sd).items()}, str(src))
    manifest = cw.convert(src, tmp_path / "ckpt", dtype="fp32", head_dim=cfg.head_dim, hash_sources=False)
    assert manifest["source_format"] == cw.ORIGINAL and manifest["variant"] == "t2v"
    loaded = cw.load(tmp_path / "ckpt")
    assert loaded.cfg == cfg.replace(rope_max_seq_len=1024)  # not stored in any tensor: the default
    want = nnx.to_flat_state(nnx.state(model, nnx.Param))
    got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    assert len(want) == len(got)
    for path, var in want:
        np.testing.assert_array_equal(np.asarray(got[path].get_value()), np.asarray(var.get_value()))


def test_converter_is_strict(t2v):
    cfg, _, sd, _ = t2v
    bad = dict(sd)
    bad["blocks.1.attn1.extra.weight"] = np.zeros(3, np.float32)
    del bad["blocks.2.attn2.norm_k.weight"]
    bad["proj_out.weight"] = np.zeros((5, cfg.dim), np.float32)
    with pytest.raises(ConversionError) as e:
        cw.convert_tensors(bad, cfg)
    msg = str(e.value)
    assert "blocks.1.attn1.extra.weight" in msg  # unknown key
    assert "blocks.2.attn2.norm_k.weight" in msg and "blocks.ca_norm_k" in msg  # missing key, unassigned layer
    assert "shape mismatch" in msg and "proj_out.kernel" in msg
    with pytest.raises(ConversionError, match="not a Wan2.1"):
        cw.convert_tensors({"foo": np.zeros(1)}, cfg)
    params = cw.convert_tensors(sd, cfg)
    with pytest.raises(ConversionError, match="missing blocks.modulation"):
        cw.to_model(cfg, {k: v for k, v in params.items() if k != "blocks.modulation"})


def test_full_size_parameter_counts():
    def diffusers_count(cfg: WanConfig) -> int:
        with torch.device("meta"):
            m = WanTransformer3DModel(
                num_attention_heads=cfg.heads,
                in_channels=cfg.in_channels,
                ffn_dim=cfg.ffn_dim,
                num_layers=cfg.num_layers,
                image_dim=cfg.image_dim,
                added_kv_proj_dim=cfg.dim if cfg.is_i2v else None,
            )
        return sum(p.numel() for p in m.parameters())

    counts = {}
    for cfg in (WAN_T2V_1_3B, WAN_T2V_14B, WAN_I2V_14B):
        abstract = nnx.eval_shape(lambda cfg=cfg: WanTransformer3D(cfg, rngs=nnx.Rngs(0)))
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
        assert n == cw.param_count(cfg) == diffusers_count(cfg)
        counts[cfg] = n
    assert 1.3e9 <= counts[WAN_T2V_1_3B] <= 1.5e9  # 1,418,996,800
    assert 14.0e9 <= counts[WAN_T2V_14B] <= 14.5e9  # 14,288,491,584
    assert 16.0e9 <= counts[WAN_I2V_14B] <= 16.8e9  # 16,394,878,784


# ---------------------------------------------------------------------------------------------------------
# Chipmunk sparse self-attention.


def _schedule_config(**attn):
    base = preset("wan")
    a = dataclasses.replace(base.attn, full_step_schedule=frozenset({0, 1, 4}), first_n_dense_layers=1, **attn)
    return base.replace(attn=a)


def _cfg_run(model, chipmunk_cfg, lat0, txt_cond, txt_uncond, *, static: bool, steps: int = 6):
    """A 6-step CFG run (cond and uncond batched) driven by the dense model's velocities; returns per-step
    (chipmunk output, dense output) pairs, the kinds run and the final cache."""
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    b = lat0.shape[0]
    grid = tuple(d // p for d, p in zip(lat0.shape[2:], cfg.patch_size, strict=True))
    schedule = step_kinds(chipmunk_cfg, steps, cfg.num_layers)
    cache = init_wan_cache(cfg, chipmunk_cfg, batch=2 * b, grid=grid, dtype=jnp.float32)
    key = jax.random.key(7)
    mask = None
    if static:
        sm = wan_static_mask(cfg, chipmunk_cfg, grid, jax.random.fold_in(key, 10_000))
        mask = (jnp.asarray(sm.mask), jnp.asarray(sm.sparse_group))
    txt = jnp.concatenate([txt_cond, txt_uncond], axis=0)
    x = lat0
    sigmas = np.linspace(1.0, 0.2, steps + 1)
    results, kinds = [], []
    for t in range(steps):
        plan = schedule.steps[t]
        kinds.append(plan.attn[-1])
        xx = jnp.concatenate([x, x], axis=0)
        ts = jnp.full((2 * b,), sigmas[t] * 1000.0, jnp.float32)
        run = ChipmunkRun(chipmunk_cfg, plan)
        out, cache = forward(graphdef, state, xx, ts, txt, cache, chipmunk=run, rng=key, step=t, static_mask=mask)
        dense, _ = forward(graphdef, state, xx, ts, txt)
        results.append((np.asarray(out), np.asarray(dense)))
        cond, uncond = dense[:b], dense[b:]
        v = uncond + 5.0 * (cond - uncond)
        x = x + jnp.float32(sigmas[t + 1] - sigmas[t]) * v
    return results, kinds, cache


def test_chipmunk_all_keys_equals_dense_over_cfg_run(t2v):
    cfg, _, _, model = t2v
    n = int(np.prod(GRID))
    # Every key selected: top_keys 1 with the default tile 128 rounds 350 keys up to >= 350, no random keys.
    # No static mask: with top_keys = 1 every group fails the static-mask sparsity test and would use only its
    # (here nearly empty) static row (SPEC §1.3), so the static part is exercised in the sparse test below.
    ck = _schedule_config(top_keys=1.0, random_keys=0.0, local_voxels=0)
    assert attn_top_k(ck.attn, n) >= n
    lat, _, txt = _inputs(cfg, batch=1)
    txt_u = np.random.RandomState(3).randn(*txt.shape).astype(np.float32)
    results, kinds, cache = _cfg_run(model, ck, jnp.asarray(lat), jnp.asarray(txt), jnp.asarray(txt_u), static=False)
    assert kinds == [AttnKind.WARMUP, AttnKind.MASK, AttnKind.SPARSE, AttnKind.SPARSE, AttnKind.MASK, AttnKind.SPARSE]
    assert np.asarray(unpack_bits(cache.attn.mask_bits, n)).all()
    for t, (out, dense) in enumerate(results):
        for branch in (0, 1):  # cond, uncond
            err = rel(out[branch], dense[branch])
            assert err <= 1e-5, (t, branch, err)


def test_chipmunk_sparse_runs_and_stays_close_to_dense(t2v):
    cfg, _, _, model = t2v
    # 8 x 26 x 34 latents -> grid (8, 13, 17): 8 full voxels plus h and w tails, 1768 tokens.
    ck = _schedule_config(top_keys=0.3, local_voxels=1, random_keys=0.01)
    lat, _, txt = _inputs(cfg, batch=1, latent=(8, 26, 34), seed=4)
    txt_u = np.random.RandomState(5).randn(*txt.shape).astype(np.float32)
    results, kinds, cache = _cfg_run(model, ck, jnp.asarray(lat), jnp.asarray(txt), jnp.asarray(txt_u), static=True)
    for t, (out, dense) in enumerate(results):
        err = rel(out, dense)
        if kinds[t] is AttnKind.SPARSE:
            assert 1e-6 < err < 0.05, (t, err)  # a real approximation (~0.7%), but a close one
        else:
            assert err <= 1e-5, (t, kinds[t], err)  # full steps return exact dense attention
    # The stored key masks [layers, 2B, H, G, N] are genuinely sparse (about 43% of the keys).
    selected = np.asarray(unpack_bits(cache.attn.mask_bits, 8 * 13 * 17))
    assert selected.shape == (cfg.num_layers - 1, 2, cfg.heads, 10, 8 * 13 * 17)
    assert 0.2 < selected.mean() < 0.6


def test_chipmunk_argument_errors(t2v):
    cfg, _, _, model = t2v
    lat, ts, txt = (jnp.asarray(a) for a in _inputs(cfg, batch=1))
    ck = _schedule_config(top_keys=0.3)
    sched = step_kinds(ck, 6, cfg.num_layers)
    with pytest.raises(ValueError, match="needs the cache"):
        model(lat, ts, txt, chipmunk=ChipmunkRun(ck, sched.steps[0]))
    short = step_kinds(ck, 6, cfg.num_layers - 1)
    with pytest.raises(ValueError, match="layers"):
        model(lat, ts, txt, chipmunk=ChipmunkRun(ck, short.steps[0]))
    with pytest.raises(ValueError, match="not divisible"):
        model(lat[:, :, :, :13], ts, txt)
    with pytest.raises(ValueError, match="attention cache is"):
        wrong = init_wan_cache(cfg, ck, batch=2, grid=GRID, dtype=jnp.float32)
        model(lat, ts, txt, wrong, chipmunk=ChipmunkRun(ck, sched.steps[0]))


def test_chipmunk_disabled_is_the_dense_model(t2v):
    cfg, _, _, model = t2v
    lat, ts, txt = (jnp.asarray(a) for a in _inputs(cfg, batch=2))
    off = preset("wan").replace(attn=dataclasses.replace(preset("wan").attn, is_enabled=False))
    plan = step_kinds(off, 6, cfg.num_layers).steps[2]
    assert set(plan.attn) == {AttnKind.DENSE}
    cache = init_wan_cache(cfg, off, batch=2, grid=GRID, dtype=jnp.float32)
    assert cache.attn is None
    graphdef, state = nnx.split(model)
    out, new = forward(graphdef, state, lat, ts, txt, cache, chipmunk=ChipmunkRun(off, plan))
    dense, _ = forward(graphdef, state, lat, ts, txt)
    assert new.attn is None
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dense))


def test_bf16_i2v_chipmunk_steps_under_strict_promotion():
    """bf16 parameters and caches through warm-up, mask and sparse steps of an I2V model (CFG batch)."""
    cfg = tiny_config(i2v=True, num_layers=2)
    model = WanTransformer3D(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
    graphdef, s32 = nnx.split(model)
    s16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), s32)
    ck = _schedule_config(top_keys=0.3, local_voxels=1)
    lat, ts, txt = (jnp.asarray(a) for a in _inputs(cfg, batch=2, latent=(4, 12, 16), seed=6))
    img = jnp.asarray(np.random.RandomState(6).randn(2, 5, cfg.image_dim).astype(np.float32))
    grid = (4, 6, 8)
    sm = wan_static_mask(cfg, ck, grid, jax.random.key(1))
    mask = (jnp.asarray(sm.mask), jnp.asarray(sm.sparse_group))
    cache = init_wan_cache(cfg, ck, batch=2, grid=grid, dtype=jnp.bfloat16)
    schedule = step_kinds(ck, 3, cfg.num_layers)
    for t in range(3):
        run = ChipmunkRun(ck, schedule.steps[t])
        out, cache = forward(
            graphdef, s16, lat, ts, txt, cache, image=img, chipmunk=run, rng=jax.random.key(2), step=t, static_mask=mask
        )
    assert schedule.steps[2].attn[-1] is AttnKind.SPARSE
    assert out.dtype == cache.attn.out.dtype == jnp.bfloat16
    ref, _ = forward(graphdef, s32, lat, ts, txt, image=img)
    assert rel(out.astype(jnp.float32), ref) < 0.03
