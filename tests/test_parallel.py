"""Multi-device sampling on 8 CPU devices: Ulysses attention, CFG/sequence-parallel Flux and Wan, host offload.

Each sharded result is compared with the same computation on one device. Float32 everywhere; the only
differences allowed are reduction-order ulps of XLA's partitioned matmuls, so tolerances are tight.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import chipmunk_jax as cj
from chipmunk_jax import indices as ix
from chipmunk_jax import parallel as par
from chipmunk_jax.schedules import AttnKind, step_kinds
from models.flux import Flux
from models.flux import tiny_config as flux_tiny
from models.flux.sampling import generate
from models.wan import ChipmunkRun, WanTransformer3D, forward, init_wan_cache, wan_static_mask
from models.wan import tiny_config as wan_tiny

K = AttnKind


def _randomised(make, seed: int, scale: float = 0.25) -> nnx.Module:
    """``make()`` with every parameter (norm scales and biases included) drawn at random.

    Drawn with numpy: compiling dozens of jax.random.normal programs would dominate these tests' run time.
    """
    graphdef, state = nnx.split(nnx.eval_shape(make))
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, new))


def _max_rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---------------------------------------------------------------------------------------------------------------
# Mesh and argument checks.


def test_make_mesh_shapes_and_errors():
    mesh = par.make_mesh(cfg=2, sp=4)
    assert mesh.axis_names == ("cfg", "sp") and par.mesh_sizes(mesh) == (2, 4)
    assert list(mesh.devices.reshape(-1)) == jax.devices()[:8]
    assert par.mesh_sizes(par.make_mesh(sp=2)) == (1, 2)
    with pytest.raises(ValueError, match="needs 16 devices but 8 are available"):
        par.make_mesh(cfg=2, sp=8)
    with pytest.raises(ValueError, match=">= 1"):
        par.make_mesh(cfg=0, sp=2)
    with pytest.raises(ValueError, match="axes"):
        par.mesh_sizes(jax.make_mesh((2,), ("x",)))


def test_shapes_that_do_not_split_give_clear_errors():
    mesh = par.make_mesh(cfg=2, sp=4)
    with pytest.raises(ValueError, match=r"6 attention heads are not divisible by the sp axis \(4\).*\[1, 2, 3, 6\]"):
        par.check_attention_shapes(mesh, 2, 6, 64)
    with pytest.raises(ValueError, match="batch 3 is not divisible by the cfg axis"):
        par.check_attention_shapes(mesh, 3, 8, 64)
    with pytest.raises(ValueError, match="sequence length 70 is not divisible"):
        par.check_attention_shapes(mesh, 2, 8, 70)
    q = jnp.zeros((2, 6, 64, 8), jnp.float32)
    with pytest.raises(ValueError, match="heads are not divisible"):
        par.ulysses_attention(lambda q, k, v, c, r, s: (q, c), q, q, q, mesh=mesh)
    # The models check before any compile.
    cfg = flux_tiny(depth_double=1, depth_single=1)  # 2 heads
    model = nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32))
    txt, y = jnp.zeros((2, 8, cfg.context_dim)), jnp.zeros((2, cfg.vec_dim))
    with pytest.raises(ValueError, match="2 attention heads are not divisible by the sp axis"):
        generate(model, txt, y, width=128, height=128, steps=2, mesh=par.make_mesh(sp=4), progress=False)


def test_key_slice_is_a_block_of_the_full_draw():
    key = jax.random.key(11)
    full = np.asarray(jax.random.uniform(key, (4, 6, 3, 5)))
    block = ix.random_uniform(ix.KeySlice(key=key, offset=(jnp.int32(2), jnp.int32(3)), full=(4, 6)), (2, 3, 3, 5))
    np.testing.assert_array_equal(np.asarray(block), full[2:4, 3:6])
    np.testing.assert_array_equal(np.asarray(ix.random_uniform(key, (4, 6, 3, 5))), full)


# ---------------------------------------------------------------------------------------------------------------
# Ulysses attention == one device.

B, H, D = 2, 8, 16


def _qkv(seed: int, n: int):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((B, H, n, D)), jnp.float32) for _ in range(3)]


@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_ulysses_dense_attention_matches(backend):
    n = 96
    q, k, v = _qkv(0, n)
    mesh = par.make_mesh(cfg=2, sp=4)

    def attend(q, k, v, cache, rng, sm):
        return cj.dense_attention(q, k, v, backend=backend), cache

    got, _ = jax.jit(lambda q, k, v: par.ulysses_attention(attend, q, k, v, mesh=mesh))(q, k, v)
    want = cj.dense_attention(q, k, v, backend=backend)
    assert got.sharding.spec == P("cfg", None, "sp")  # batch over 'cfg', tokens over 'sp' again
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6)


# One jitted run of WARMUP -> MASK -> FULL -> SPARSE on fresh q/k/v each step.
KINDS = (K.WARMUP, K.MASK, K.FULL, K.SPARSE)


def _chipmunk_run(cfg, backend, mesh, static, key, n):
    qkvs = [_qkv(10 + i, n) for i in range(len(KINDS))]
    cache = cj.init_attention_cache(cfg, batch=B, heads=H, seq_len=n, head_dim=D, dtype=jnp.float32)

    def run(qkvs, cache):
        outs = []
        for kind, (q, k, v) in zip(KINDS, qkvs, strict=True):

            def attend(q, k, v, c, rng, sm, kind=kind):
                return cj.sparse_attention(q, k, v, c, kind=kind, config=cfg, backend=backend, rng=rng, static_mask=sm)

            if mesh is None:
                o, cache = attend(q, k, v, cache, key, static)
            else:
                o, cache = par.ulysses_attention(attend, q, k, v, cache, mesh=mesh, rng=key, static_mask=static)
            outs.append(o)
        return outs, cache

    return jax.jit(run)(qkvs, cache)


@pytest.mark.parametrize(
    "backend, compressed, mesh_shape",
    [("xla", True, (2, 4)), ("reference", False, (1, 4))],
)
def test_ulysses_chipmunk_attention_matches(backend, compressed, mesh_shape):
    n, group = 256, 64
    g = ix.num_groups(n, group)
    cfg = cj.AttnConfig(top_keys=0.2, counts_multiple_of=16, mbm=group, should_compress_indices=compressed)
    rng = np.random.default_rng(3)
    static = None
    if compressed:  # per-head static rows: each device must get the rows of its own heads
        static = ix.StaticMask(mask=rng.random((H, g, n)) < 0.1, sparse_group=rng.random((H, g)) < 0.7)
    key = jax.random.key(5)
    mesh = par.make_mesh(*mesh_shape)
    got, got_cache = _chipmunk_run(cfg, backend, mesh, static, key, n)
    want, want_cache = _chipmunk_run(cfg, backend, None, static, key, n)
    for kind, a, b in zip(KINDS, got, want, strict=True):
        assert a.shape == (B, H, n, D)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6, err_msg=str(kind))
    # The same keys were selected (random keys included) and the cache is split by batch and heads.
    if compressed:
        bits = np.asarray(want_cache.mask_bits)
        np.testing.assert_array_equal(np.asarray(got_cache.mask_bits), bits)
        mask = np.asarray(ix.unpack_bits(want_cache.mask_bits, n))
        assert 0 < mask.mean() < 0.6  # a real selection (top-k + random + static), not all keys
    else:
        np.testing.assert_array_equal(np.asarray(got_cache.indices), np.asarray(want_cache.indices))
    np.testing.assert_allclose(np.asarray(got_cache.out), np.asarray(want_cache.out), rtol=0, atol=2e-6)
    assert got_cache.out.sharding.is_equivalent_to(NamedSharding(mesh, P("cfg", "sp")), 4)


# ---------------------------------------------------------------------------------------------------------------
# Flux: sharded generate == one-device generate.

W = HT = 128  # 8 x 8 latent tokens + 8 text tokens: 72 joint tokens


@pytest.fixture(scope="module")
def flux_setup():
    cfg = flux_tiny(depth_double=1, depth_single=1, heads=4, hidden=64)
    model = _randomised(lambda: Flux(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32), 0)
    rng = np.random.default_rng(0)
    txt = jnp.asarray(rng.standard_normal((2, 8, cfg.context_dim)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((2, cfg.vec_dim)), jnp.float32)
    flux = cj.preset("flux")
    # Layer 0 (the double block) dense, layer 1 sparse: both attention paths run inside the shard_map.
    chip = flux.replace(
        attn=dataclasses.replace(flux.attn, top_keys=0.3, counts_multiple_of=16, first_n_dense_layers=1),
        mlp=dataclasses.replace(flux.mlp, top_keys=0.3, counts_multiple_of=16, first_n_dense_layers=1),
    )
    return model, txt, y, chip


def _gen(setup, steps, **kw):
    model, txt, y, chip = setup
    kw.setdefault("chipmunk", chip)
    return generate(model, txt, y, width=W, height=HT, steps=steps, progress=False, **kw)


@pytest.fixture(scope="module")
def flux_chipmunk_single(flux_setup):
    return _gen(flux_setup, 3)


def test_flux_chipmunk_sharded_cfg_and_sp_matches(flux_setup, flux_chipmunk_single):
    want = flux_chipmunk_single
    assert set(want.report.step_times) == {
        "attn=warmup,mlp=full",
        "attn=mask,mlp=sparse_recompute",
        "attn=sparse,mlp=sparse_recompute",
    }
    assert want.report.stats["attention sparsity"] > 0.5
    got = _gen(flux_setup, 3, mesh=par.make_mesh(cfg=2, sp=2))
    assert _max_rel(got.tokens, want.tokens) <= 2e-6
    cache = got.state.cache
    assert cache.single_attn.out.sharding.spec == P(None, "cfg", "sp")
    assert cache.single_mlp.act.sharding.spec == P(None, "cfg", "sp")  # MLP cache split by tokens
    np.testing.assert_array_equal(
        np.asarray(cache.single_attn.indices), np.asarray(want.state.cache.single_attn.indices)
    )
    # One device holds a quarter of the attention cache.
    assert got.report.cache_device_bytes_per_device < want.report.cache_device_bytes_per_device / 2


# ---------------------------------------------------------------------------------------------------------------
# Host offload.


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("CHIPMUNK_SLOW_TESTS"),
    reason="3 more Flux step compiles (~15 s CPU); set CHIPMUNK_SLOW_TESTS=1. The Wan test covers offload by default",
)
def test_offloaded_caches_give_identical_results(flux_setup, flux_chipmunk_single):
    model, txt, y, chip = flux_setup
    off = chip.replace(
        offloading=cj.OffloadingConfig(
            global_disable_offloading=False, attn_out_cache=True, attn_indices=True, mlp_sparse_act_T=True
        )
    )
    assert par.offloaded_fields(off.offloading) == {"attn.out", "attn.indices", "attn.mask_bits", "mlp.act"}
    got = _gen(flux_setup, 3, chipmunk=off)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(flux_chipmunk_single.tokens))
    cache = got.state.cache
    host = par.host_memory_kind()
    assert cache.single_attn.out.sharding.memory_kind == host
    assert cache.double_mlp.act.sharding.memory_kind == host
    assert cache.single_attn.lse.sharding.memory_kind == "device"
    want_host = sum(x.nbytes for c in (cache.double_attn, cache.single_attn) for x in (c.out, c.indices)) + sum(
        c.act.nbytes for c in (cache.double_mlp, cache.single_mlp)
    )
    assert got.report.cache_host_bytes == want_host
    assert got.report.cache_host_bytes + got.report.cache_device_bytes_per_device == got.report.cache_bytes
    assert "host" in got.report.format()


def test_offload_disabled_by_default():
    assert par.offloaded_fields(cj.ChipmunkConfig().offloading) == frozenset()
    assert par.offloaded_fields(None) == frozenset()


# ---------------------------------------------------------------------------------------------------------------
# Wan: sharded forward over a few Chipmunk steps (CFG batch on 'cfg', tokens on 'sp').


def test_wan_forward_sharded_matches_over_chipmunk_steps():
    cfg = wan_tiny(heads=4, dim=64, num_layers=1)
    model = _randomised(lambda: WanTransformer3D(cfg, rngs=nnx.Rngs(1), dtype=jnp.float32), 1)
    graphdef, state = nnx.split(model)
    base = cj.preset("wan")
    chip = base.replace(
        attn=dataclasses.replace(
            base.attn, full_step_schedule=frozenset({0, 1}), first_n_dense_layers=0, top_keys=0.2, local_voxels=1
        ),
        offloading=cj.OffloadingConfig(global_disable_offloading=False, attn_out_cache=True),
    )
    base_chip = chip.replace(offloading=cj.OffloadingConfig())
    latent, grid = (4, 12, 32), (4, 6, 16)  # 384 tokens: two voxels
    rs = np.random.RandomState(0)
    lat = jnp.asarray(rs.randn(2, cfg.in_channels, *latent), jnp.float32)  # cond and uncond
    txt = jnp.asarray(rs.randn(2, 5, cfg.text_dim), jnp.float32)
    key = jax.random.key(7)
    sm = wan_static_mask(cfg, chip, grid, jax.random.fold_in(key, 1))
    mask = (jnp.asarray(sm.mask), jnp.asarray(sm.sparse_group))
    schedule = step_kinds(chip, 3, cfg.num_layers)
    assert [p.attn[-1] for p in schedule.steps] == [K.WARMUP, K.MASK, K.SPARSE]
    mesh = par.make_mesh(cfg=2, sp=4)
    outs = {}
    # One device without offload; the mesh with the attention output cache in host memory.
    for name, m, ck in (("one", None, base_chip), ("mesh", mesh, chip)):
        cache = init_wan_cache(cfg, ck, batch=2, grid=grid, dtype=jnp.float32)
        cache = par.place_cache(cache, mesh=m, offload=par.offloaded_fields(ck.offloading))
        st, x, t, c = state, lat, jnp.array([900.0, 900.0], jnp.float32), txt
        if m is not None:
            st = jax.device_put(state, par.replicated(m))
        res = []
        for s, plan in enumerate(schedule.steps):
            run = ChipmunkRun(ck, plan, "xla")
            out, cache = forward(
                graphdef, st, x, t - 100.0 * s, c, cache, chipmunk=run, rng=key, step=s, static_mask=mask, mesh=m
            )
            res.append(np.asarray(out))
        outs[name] = (res, cache)
    for s in range(3):
        assert _max_rel(outs["mesh"][0][s], outs["one"][0][s]) <= 2e-6, s
    got, want = outs["mesh"][1].attn, outs["one"][1].attn
    np.testing.assert_array_equal(np.asarray(got.mask_bits), np.asarray(want.mask_bits))
    assert got.out.sharding.memory_kind == par.host_memory_kind() and want.out.sharding.memory_kind == "device"
    assert got.out.sharding.spec == P(None, "cfg", "sp")


# ---------------------------------------------------------------------------------------------------------------
# Multi-host entry (argument handling only: one process here).


def test_initialize_distributed_from_env_and_flags():
    calls = []
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    args = par.initialize_distributed(environ=env, initialize=lambda **kw: calls.append(kw))
    assert args == par.DistributedArgs("10.0.0.1:1234", 4, 2)
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)]
    # Explicit arguments win over the environment; local device ids are passed through.
    calls.clear()
    par.initialize_distributed(
        process_id=3, local_device_ids=[0, 1], environ=env, initialize=lambda **kw: calls.append(kw)
    )
    assert calls[0]["process_id"] == 3 and calls[0]["local_device_ids"] == [0, 1]
    env_ids = dict(env, JAX_LOCAL_DEVICE_IDS="4,5")
    assert par.distributed_args(environ=env_ids).local_device_ids == (4, 5)
    # Single process: nothing to initialise.
    assert par.initialize_distributed(environ={}, initialize=lambda **kw: calls.append("no")) is None
    assert "no" not in calls


@pytest.mark.parametrize(
    "kwargs, env, message",
    [
        ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "needs num_processes and process_id"),
        ({"num_processes": 2, "process_id": 0}, {}, "need a coordinator address"),
        ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "not an integer"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, "0 <= process_id"),
        ({"coordinator_address": "host", "num_processes": 2, "process_id": 0}, {}, "host:port"),
        (
            {},
            {
                "JAX_COORDINATOR_ADDRESS": "h:1",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "0",
                "JAX_LOCAL_DEVICE_IDS": "0,x",
            },
            "JAX_LOCAL_DEVICE_IDS",
        ),
    ],
)
def test_initialize_distributed_rejects_bad_settings(kwargs, env, message):
    with pytest.raises(ValueError, match=message):
        par.initialize_distributed(**kwargs, environ=env, initialize=lambda **kw: pytest.fail("must not initialise"))


def test_memory_nbytes_splits_host_and_device():
    mesh = par.make_mesh(sp=4)
    cache = cj.init_attention_cache(cj.AttnConfig(), batch=2, heads=4, seq_len=64, head_dim=8, dtype=jnp.float32)
    placed = par.place_cache(cache, mesh=mesh, offload=frozenset({"attn.out"}))
    mem = par.memory_nbytes(placed)
    assert mem["host"] == 2 * 4 * 64 * 8 * 4
    assert mem["device"] == cj.cache_nbytes(cache) - mem["host"]
    assert mem["device_per_device"] == mem["device"] // 4


def test_ulysses_with_the_mosaic_gpu_kernel_lowers_for_cuda():
    """backend mosaic_gpu is the same call inside the shard_map: the whole sharded program cross-lowers for
    sm_90 (all-to-alls around the Pallas kernel). Running it needs GPUs ([multi-gpu-run])."""
    from pallas_kernels.attention import api

    if "mosaic_gpu" not in api.registry.available("sparse_attention"):
        pytest.skip("Mosaic GPU not importable in this jax")
    b, h, n, d, group, kcap = 1, 4, 256, 128, 128, 128
    mesh = par.make_mesh(cfg=1, sp=2)

    def attend(q, k, v, cache, rng, sm):
        i, c = cache  # per-head index lists travel with their heads through the map
        return api.sparse_attention(q, k, v, i, c, group=group, implementation="mosaic_gpu"), cache

    fn = jax.jit(lambda q, k, v, c: par.ulysses_attention(attend, q, k, v, c, mesh=mesh))
    qkv = jax.ShapeDtypeStruct((b, h, n, d), jnp.bfloat16)
    sel = (jax.ShapeDtypeStruct((b, h, 2, kcap), jnp.int32), jax.ShapeDtypeStruct((b, h, 2), jnp.int32))
    txt = fn.trace(qkv, qkv, qkv, sel).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in txt and "all_to_all" in txt
