"""Every shipped Mosaic GPU TuningConfig cross-lowers for sm_90a on this CPU-only machine.

``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`` runs the whole Pallas -> Mosaic GPU lowering (the
hardware path, with its SMEM budget and layout checks) without a GPU. Shapes are production-like but abstract.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import registry

pytestmark = pytest.mark.timeout(120)


def _sds(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _lower(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _mosaic_attention():
    if "mosaic_gpu" not in registry.available("sparse_attention"):
        pytest.skip(f"Mosaic GPU backend not importable: {registry._load_errors}")
    from pallas_kernels.attention import mosaic_gpu

    return mosaic_gpu


def _mosaic_mlp():
    if "mosaic_gpu" not in registry.available("sparse_mlp_delta"):
        pytest.skip(f"Mosaic GPU backend not importable: {registry._load_errors}")
    from pallas_kernels.mlp import mosaic_gpu

    return mosaic_gpu


def _attention_configs(kind):
    try:
        from pallas_kernels.attention import mosaic_gpu
    except ImportError:  # reported by the tests through the registry's load errors
        return []
    return [pytest.param(c, id=f"g{c.group}-bk{c.block_kv}-{c.gather}") for c in mosaic_gpu.SHIPPED_CONFIGS[kind]]


B, H, N, NK, D = 1, 2, 4352, 4300, 128  # Flux-like length, N and Nk not multiples of the tiles


@pytest.mark.parametrize("config", _attention_configs("dense"))
def test_dense_configs_lower(config):
    mg = _mosaic_attention()
    q, kv = _sds(B, H, N, D), _sds(B, H, NK, D)
    txt = _lower(functools.partial(mg.dense_attention, config=config), q, kv, kv)
    assert "mosaic_gpu" in txt
    prev = _sds(B, H, N, dtype=jnp.float32)
    txt = _lower(functools.partial(mg.dense_attention_colsum, config=config), q, kv, kv, prev)
    assert "mosaic_gpu" in txt


@pytest.mark.parametrize("config", _attention_configs("sparse"))
def test_sparse_configs_lower(config):
    mg = _mosaic_attention()
    g = -(-N // config.group)
    args = (_sds(B, H, N, D), _sds(B, H, NK, D), _sds(B, H, NK, D))
    idx, counts = _sds(B, H, g, 728, dtype=jnp.int32), _sds(B, H, g, dtype=jnp.int32)
    txt = _lower(functools.partial(mg.sparse_attention, config=config), *args, idx, counts)
    assert "mosaic_gpu" in txt


def test_f32_inputs_lower_through_registry():
    _mosaic_attention()
    fn = registry.get("sparse_attention", "mosaic_gpu")
    q = _sds(1, 1, 500, D, dtype=jnp.float32)
    txt = _lower(
        functools.partial(fn, group=128), q, q, q, _sds(1, 1, 4, 256, dtype=jnp.int32), _sds(1, 1, 4, dtype=jnp.int32)
    )
    assert "mosaic_gpu" in txt


def test_rows_staged_at_block_kv_128_exceeds_smem():
    """The SMEM budget is enforced by the lowering: this is why the sparse configs use block_kv 64."""
    mg = _mosaic_attention()
    cfg = mg.TuningConfig(block_kv=128)
    args = (_sds(B, H, N, D), _sds(B, H, NK, D), _sds(B, H, NK, D))
    g = -(-N // cfg.group)
    with pytest.raises(ValueError, match="shared memory"):
        _lower(
            functools.partial(mg.sparse_attention, config=cfg),
            *args,
            _sds(B, H, g, 256, dtype=jnp.int32),
            _sds(B, H, g, dtype=jnp.int32),
        )


def _mlp_configs():
    try:
        from pallas_kernels.mlp import mosaic_gpu
    except ImportError:
        return []
    return [
        pytest.param(c, id=f"n{c.block_n}-o{c.block_out}-s{c.max_concurrent_steps}") for c in mosaic_gpu.SHIPPED_CONFIGS
    ]


@pytest.mark.parametrize("config", _mlp_configs())
def test_mlp_configs_lower(config):
    mm = _mosaic_mlp()
    b, n, c, f, k = 1, 4352, 3072, 12288, 3840  # Flux MLP at 70% sparsity
    args = (
        _sds(b, n, c),
        _sds(f, c),
        _sds(f, dtype=jnp.float32),
        _sds(f, c),
        _sds(b, n // 128, k, dtype=jnp.int32),
        _sds(b, n // 128, dtype=jnp.int32),
        _sds(b, n, f),
        _sds(b, n, c),
    )
    txt = _lower(functools.partial(mm.sparse_mlp_delta, config=config), *args)
    assert txt.count("mosaic_gpu") >= 2  # mm1 and mm2


def test_backend_registers_both_paths_for_every_op():
    _mosaic_attention()
    for op in ("dense_attention", "dense_attention_colsum", "sparse_attention", "sparse_mlp_delta"):
        assert {"mosaic_gpu", "mosaic_gpu_interpret"} <= set(registry.available(op)), op


def test_benchmark_variants_lower(capsys):
    _mosaic_attention()
    from benchmarks import kernels

    assert kernels.main(["--lower-only", "--models", "flux"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ours = [ln for ln in lines if "mosaic_gpu" in ln or "sparse" in ln]
    assert len(ours) == 4 and all("lowers for cuda" in ln for ln in ours), lines


def _tuned_cases():
    try:
        from pallas_kernels.attention import mosaic_gpu
    except ImportError:
        return []
    ops = {"dense": ("dense_attention", "dense_attention_colsum"), "sparse": ("sparse_attention",)}
    return [
        pytest.param(e, op, id=f"{op}-{e['model']}-g{e['group']}")
        for e in mosaic_gpu._tuned_table()
        for op in ops[e["mode"]]
    ]


def test_tuned_table_is_present_and_picks_by_length():
    mg = _mosaic_attention()
    entries = mg._tuned_table()
    assert {e["mode"] for e in entries} == {"dense", "sparse"}
    for e in entries:
        assert mg.tuned_config(e["mode"], e["group"], e["n"]) == mg.TuningConfig(**e["config"])
    # No entry for this group: the hand-written default.
    assert mg.tuned_config("sparse", 128, 4352) == mg.default_config(128, sparse=True)


@pytest.mark.parametrize(("entry", "op"), _tuned_cases())
def test_registry_adapters_lower_at_tuned_shapes(entry, op):
    """What backend='auto' runs on Hopper: the adapters with the tuned configs (colsum included), per shape."""
    _mosaic_attention()
    n, group = min(entry["n"], 8192), entry["group"]  # the tiling, not the length, decides what lowers
    fn = functools.partial(registry.get(op, "mosaic_gpu"), group=group)
    q = _sds(1, 2, n, D)
    if op == "sparse_attention":
        g = -(-n // group)
        args = (q, q, q, _sds(1, 2, g, 640, dtype=jnp.int32), _sds(1, 2, g, dtype=jnp.int32))
    elif op == "dense_attention_colsum":
        args = (q, q, q, _sds(1, 2, n, dtype=jnp.float32))
    else:
        args = (q, q, q)
    assert "mosaic_gpu" in _lower(fn, *args)


def test_sparse_adapter_avoids_huge_pregathers(monkeypatch):
    """At long sequences with many kept keys the [B, H, G, K, D] pre-gather would not fit: rows_staged instead."""
    _mosaic_attention()
    from pallas_kernels import mosaic_gpu_backend as mb

    seen = []
    monkeypatch.setattr(mb.attn, "sparse_attention", lambda *a, config, **kw: seen.append(config.gather))
    q = jnp.zeros((2, 12, 75_600, D), jnp.bfloat16)  # Wan2.1 720p with CFG; only shapes are read
    small, large = (jax.ShapeDtypeStruct((2, 12, 394, k), jnp.int32) for k in (512, 30_208))
    counts = jax.ShapeDtypeStruct((2, 12, 394), jnp.int32)
    mb.sparse_attention(q, q, q, small, counts, group=192)
    mb.sparse_attention(q, q, q, large, counts, group=192)
    assert seen == ["pregathered", "rows_staged"]
