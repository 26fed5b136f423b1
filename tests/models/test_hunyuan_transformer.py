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

# Latents of 5 x 14 x 20 -> token grid (5, 7, 10): no dimension divisible by the (4, 6, 8) voxel, so the
# voxel order has a main block and all three tails.
LATENT = (5, 14, 20)
GRID = (5, 7, 10)
TEXT_LEN = 9  # padded prompt length
VALID = 6  # valid prompt tokens in the Chipmunk runs


def _torch_model(cfg: HunyuanVideoConfig, seed: int) -> HunyuanVideoTransformer3DModel:
    """A diffusers model of ``cfg`` with EVERY parameter randomised (norm weights, refiner, guidance included)."""
    m = HunyuanVideoTransformer3DModel(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim,
        num_layers=cfg.depth_double,
        num_single_layers=cfg.depth_single,
        num_refiner_layers=cfg.depth_refiner,
        mlp_ratio=cfg.mlp_ratio,
        patch_size=cfg.patch_size,
        patch_size_t=cfg.patch_size_t,
        guidance_embeds=cfg.guidance_embeds,
        text_embed_dim=cfg.text_dim,
        pooled_projection_dim=cfg.pooled_dim,
        rope_theta=cfg.rope_theta,
        rope_axes_dim=cfg.rope_axes_dim,
    ).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            fan_in = int(np.prod(p.shape[1:])) if p.ndim >= 2 else 4
            noise = torch.randn(p.shape, generator=g) / fan_in**0.5
            # Norm scales around 1 (random, but not so small that they hide the normalised values).
            p.copy_(noise + 1.0 if "norm" in name and name.endswith("weight") and p.ndim == 1 else noise)
    return m


def _load(cfg: HunyuanVideoConfig, sd: dict[str, np.ndarray]) -> HunyuanVideoTransformer3D:
    """A float32 model holding a diffusers state dict (test-local key table; every key must be used once)."""
    # Abstract construction: eager random initialisation of every parameter would dominate the test time.
    abstract = nnx.eval_shape(lambda: HunyuanVideoTransformer3D(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32))
    c, h, d = cfg.hidden, cfg.heads, cfg.head_dim
    used: set[str] = set()

    def get(k):
        used.add(k)
        return sd[k]

    def lin(k):  # Linear -> ([in, out] kernel, bias)
        return get(k + ".weight").T, get(k + ".bias")

    def qkv(ks):  # three [C, C] projections -> ([C, 3, H, D], [3, H, D])
        w = np.stack([get(k + ".weight").T.reshape(c, h, d) for k in ks], axis=1)
        return w, np.stack([get(k + ".bias").reshape(h, d) for k in ks])

    def heads_out(k):  # output projection [C, C] -> ([H, D, C], [C])
        return get(k + ".weight").T.reshape(h, d, c), get(k + ".bias")

    flat: dict[tuple, np.ndarray] = {}

    def put_lin(path, k):
        flat[(*path, "kernel")], flat[(*path, "bias")] = lin(k)

    def put_mlp2(path, k):
        put_lin((*path, "linear_1"), k + ".linear_1")
        put_lin((*path, "linear_2"), k + ".linear_2")

    w = get("x_embedder.proj.weight")
    flat[("x_embedder", "kernel")] = w.reshape(w.shape[0], -1).T
    flat[("x_embedder", "bias")] = get("x_embedder.proj.bias")
    put_mlp2(("time_embedder",), "time_text_embed.timestep_embedder")
    put_mlp2(("guidance_embedder",), "time_text_embed.guidance_embedder")
    put_mlp2(("text_embedder",), "time_text_embed.text_embedder")
    put_mlp2(("refiner", "time_embedder"), "context_embedder.time_text_embed.timestep_embedder")
    put_mlp2(("refiner", "text_embedder"), "context_embedder.time_text_embed.text_embedder")
    put_lin(("refiner", "proj_in"), "context_embedder.proj_in")
    put_lin(("final_mod",), "norm_out.linear")
    put_lin(("final_linear",), "proj_out")

    stacks: dict[tuple, list] = {}

    def add(path, value):
        stacks.setdefault(path, []).append(value)

    for i in range(cfg.depth_refiner):
        p = f"context_embedder.token_refiner.refiner_blocks.{i}."
        r = ("refiner", "blocks")
        add((*r, "norm1_scale"), get(p + "norm1.weight"))
        add((*r, "norm1_bias"), get(p + "norm1.bias"))
        add((*r, "norm2_scale"), get(p + "norm2.weight"))
        add((*r, "norm2_bias"), get(p + "norm2.bias"))
        for name, v in zip(("qkv_w", "qkv_b"), qkv([p + "attn.to_q", p + "attn.to_k", p + "attn.to_v"]), strict=True):
            add((*r, name), v)
        for name, v in zip(("proj_w", "proj_b"), heads_out(p + "attn.to_out.0"), strict=True):
            add((*r, name), v)
        add((*r, "w1"), get(p + "ff.net.0.proj.weight"))
        add((*r, "b1"), get(p + "ff.net.0.proj.bias"))
        add((*r, "w2"), get(p + "ff.net.2.weight").T)
        add((*r, "b2"), get(p + "ff.net.2.bias"))
        for name, v in zip(("ada_w", "ada_b"), lin(p + "norm_out.linear"), strict=True):
            add((*r, name), v)

    for i in range(cfg.depth_double):
        p = f"transformer_blocks.{i}."
        sides = {
            "img": ("norm1", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), "to_out.0", "ff"),
            "txt": (
                "norm1_context",
                ("add_q_proj", "add_k_proj", "add_v_proj"),
                ("norm_added_q", "norm_added_k"),
                "to_add_out",
                "ff_context",
            ),
        }
        for side, (norm, qkv_names, qk_norms, out, ff) in sides.items():
            r = ("double",)
            mw, mb = lin(p + norm + ".linear")
            add((*r, f"{side}_mod_w"), mw)
            add((*r, f"{side}_mod_b"), mb)
            w, b = qkv([p + "attn." + n for n in qkv_names])
            add((*r, f"{side}_qkv_w"), w)
            add((*r, f"{side}_qkv_b"), b)
            add((*r, f"{side}_q_norm"), get(p + f"attn.{qk_norms[0]}.weight"))
            add((*r, f"{side}_k_norm"), get(p + f"attn.{qk_norms[1]}.weight"))
            w, b = heads_out(p + "attn." + out)
            add((*r, f"{side}_proj_w"), w)
            add((*r, f"{side}_proj_b"), b)
            add((*r, f"{side}_w1"), get(p + ff + ".net.0.proj.weight"))
            add((*r, f"{side}_b1"), get(p + ff + ".net.0.proj.bias"))
            add((*r, f"{side}_w2"), get(p + ff + ".net.2.weight").T)
            add((*r, f"{side}_b2"), get(p + ff + ".net.2.bias"))

    for i in range(cfg.depth_single):
        p = f"single_transformer_blocks.{i}."
        r = ("single",)
        mw, mb = lin(p + "norm.linear")
        add((*r, "mod_w"), mw)
        add((*r, "mod_b"), mb)
        w, b = qkv([p + "attn.to_q", p + "attn.to_k", p + "attn.to_v"])
        add((*r, "qkv_w"), w)
        add((*r, "qkv_b"), b)
        add((*r, "q_norm"), get(p + "attn.norm_q.weight"))
        add((*r, "k_norm"), get(p + "attn.norm_k.weight"))
        add((*r, "w1"), get(p + "proj_mlp.weight"))
        add((*r, "b1"), get(p + "proj_mlp.bias"))
        po = get(p + "proj_out.weight")  # [C, C + F]: attention part, then MLP part
        add((*r, "proj_w"), po[:, :c].T.reshape(h, d, c))
        add((*r, "w2"), po[:, c:].T)
        add((*r, "b2"), get(p + "proj_out.bias"))

    flat.update({k: np.stack(v) for k, v in stacks.items()})
    assert used == set(sd), sorted(set(sd) - used)
    graphdef, state = nnx.split(abstract)
    targets = dict(nnx.to_flat_state(state))
    assert set(targets) == set(flat), (sorted(set(targets) ^ set(flat)))[:5]
    for k, var in targets.items():
        assert var.shape == flat[k].shape, (k, var.shape, flat[k].shape)
        targets[k] = var.replace(jnp.asarray(flat[k], jnp.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(targets))


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    tm = _torch_model(cfg, seed=0)
    sd = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
    return cfg, tm, _load(cfg, sd)


def _inputs(cfg: HunyuanVideoConfig, valid: list[int], latent=LATENT, seed=0):
    rs = np.random.RandomState(seed)
    b = len(valid)
    lat = rs.randn(b, cfg.in_channels, *latent).astype(np.float32)
    ts = rs.uniform(0, 1000, size=(b,)).astype(np.float32)
    txt = rs.randn(b, TEXT_LEN, cfg.text_dim).astype(np.float32)
    mask = (np.arange(TEXT_LEN)[None, :] < np.asarray(valid)[:, None]).astype(np.int64)
    pooled = rs.randn(b, cfg.pooled_dim).astype(np.float32)
    guidance = rs.uniform(1000, 8000, size=(b,)).astype(np.float32)
    return lat, ts, txt, mask, pooled, guidance


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _torch_out(tm, lat, ts, txt, mask, pooled, guidance) -> np.ndarray:
    with torch.no_grad():
        out = tm(
            torch.tensor(lat),
            torch.tensor(ts),
            torch.tensor(txt),
            torch.tensor(mask),
            torch.tensor(pooled),
            guidance=torch.tensor(guidance),
            return_dict=False,
        )[0]
    return out.numpy()


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers.


def test_matches_diffusers_with_padded_prompts(tiny):
    cfg, tm, model = tiny
    inputs = _inputs(cfg, valid=[TEXT_LEN - 3, 4])  # both prompts padded, by different amounts
    ref = _torch_out(tm, *inputs)
    graphdef, state = nnx.split(model)
    out, new = forward(graphdef, state, *(jnp.asarray(a) for a in inputs), _dense_cache(cfg, 2))
    assert out.shape == ref.shape == (2, cfg.out_channels, *LATENT)
    assert _rel(out, ref) <= 1e-5
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
    inputs = _inputs(cfg, valid=[VALID, VALID], seed=1)
    results, kinds, cache = _run(model, ck, inputs, static=False)
    assert kinds == [AttnKind.WARMUP, AttnKind.MASK, AttnKind.SPARSE, AttnKind.MASK, AttnKind.SPARSE]
    # One cache per sparsified layer (double, then single blocks) over [video; valid text] only.
    assert cache.attn.out.shape == (cfg.num_layers - 1, 2, cfg.heads, n, cfg.head_dim)
    assert np.asarray(unpack_bits(cache.attn.mask_bits, n)).all()
    for t, (out, dense) in enumerate(results):
        err = _rel(out, dense)
        assert err <= 1e-5, (t, kinds[t], err)


@pytest.mark.slow  # ~25 s of compilation on a loaded 2-core machine; `-m "not slow"` leaves it out
def test_chipmunk_sparse_with_static_mask_stays_close_to_dense(tiny):
    cfg, _, model = tiny
    # Sparse single blocks only (the double blocks' sparse path is covered above): one compiled sparse scan per kind.
    ck = _schedule_config(first_n_dense_layers=cfg.depth_double, top_keys=0.3, random_keys=0.01)
    inputs = _inputs(cfg, valid=[VALID, VALID], seed=4)
    results, kinds, cache = _run(model, ck, inputs, static=True)
    for t, (out, dense) in enumerate(results):
        err = _rel(out, dense)
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
    lat, ts, txt, mask, pooled, guidance = (jnp.asarray(a) for a in _inputs(cfg, valid=[VALID, 4]))
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
