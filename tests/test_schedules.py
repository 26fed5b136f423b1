"""Tests of chipmunk_jax.schedules.step_kinds against SPEC §1.1, §1.2, §2 and §4.

Expected kinds come from small loops written here from SPEC's text, never from the code under test.
"""

import dataclasses

import pytest

from chipmunk_jax.config import AttnConfig, ChipmunkConfig, ConfigError, MLPConfig, StepCachingConfig, preset
from chipmunk_jax.schedules import AttnKind, MLPKind, StepPlan, step_kinds

SPEC_SKIP = {7, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26, 27, 29, 31, 33, 34, 35, 37, 38, 39, 41, 42, 43}


def _expected_attn(t, layer, *, enabled, first_dense, every, schedule, recompute):
    """SPEC §1.1/§1.2 read literally."""
    if not enabled or layer < first_dense:
        return AttnKind.DENSE
    full = (t in schedule) if schedule is not None else (t < 2 or t % every == 0)
    if not full:
        return AttnKind.SPARSE
    if t == 0:
        return AttnKind.WARMUP
    if t == 1 or recompute:
        return AttnKind.MASK
    return AttnKind.FULL


def _expected_mlp(t, layer, has_indices, *, enabled, first_dense, every, bmc):
    """SPEC §2 / §2.2 step 1: recompute unless (t % bmc != 0 and indices exist and t >= 10)."""
    if not enabled or layer < first_dense:
        return MLPKind.DENSE
    if t % every == 0:
        return MLPKind.FULL
    if t % bmc != 0 and has_indices[layer] and t >= 10:
        return MLPKind.SPARSE_REUSE
    has_indices[layer] = True  # a full step keeps the last selection, as the reference does
    return MLPKind.SPARSE_RECOMPUTE


def _expected_schedule(cfg: ChipmunkConfig, num_steps: int, num_layers: int):
    a, m, sc = cfg.attn, cfg.mlp, cfg.step_caching
    out = []
    has_indices = [False] * num_layers
    for t in range(num_steps):
        if sc.is_enabled and t in sc.skip_step_schedule:
            out.append(("skip",))
            continue
        attn = tuple(
            _expected_attn(
                t,
                layer,
                enabled=a.is_enabled,
                first_dense=a.first_n_dense_layers,
                every=a.full_step_every,
                schedule=a.full_step_schedule,
                recompute=a.recompute_mask,
            )
            for layer in range(num_layers)
        )
        mlp = tuple(
            _expected_mlp(
                t,
                layer,
                has_indices,
                enabled=m.is_enabled,
                first_dense=m.first_n_dense_layers,
                every=m.full_step_every,
                bmc=m.block_mask_cache,
            )
            for layer in range(num_layers)
        )
        out.append(("run", attn, mlp))
    return out


def _check_against_expected(cfg, num_steps, num_layers):
    sched = step_kinds(cfg, num_steps, num_layers)
    expected = _expected_schedule(cfg, num_steps, num_layers)
    assert len(sched.steps) == num_steps
    for t, (plan, exp) in enumerate(zip(sched.steps, expected, strict=True)):
        assert isinstance(plan, StepPlan)
        if exp[0] == "skip":
            assert plan.skip, t
        else:
            assert not plan.skip, t
            assert plan.attn == exp[1], t
            assert plan.mlp == exp[2], t
    return sched, expected


def test_flux_preset_explicit_steps():
    cfg = preset("flux")
    layers = 5
    sched = step_kinds(cfg, 50, layers)
    for t, plan in enumerate(sched.steps):
        assert not plan.skip
        assert plan.attn[:2] == (AttnKind.DENSE, AttnKind.DENSE)
        assert plan.mlp[:2] == (MLPKind.DENSE, MLPKind.DENSE)
        if t == 0:
            want = AttnKind.WARMUP
        elif t == 1:
            want = AttnKind.MASK
        elif t in (10, 20, 30, 40):
            want = AttnKind.FULL  # recompute_mask false: rebuild C with the step-1 keys
        else:
            want = AttnKind.SPARSE
        assert plan.attn[2:] == (want,) * (layers - 2), t
        if t in (0, 10, 20, 30, 40):
            want_mlp = MLPKind.FULL
        elif t < 10 or t % 2 == 0:
            want_mlp = MLPKind.SPARSE_RECOMPUTE
        else:
            want_mlp = MLPKind.SPARSE_REUSE
        assert plan.mlp[2:] == (want_mlp,) * (layers - 2), t


@pytest.mark.parametrize("name", ["hunyuan", "wan"])
def test_video_presets_explicit_steps(name):
    cfg = preset(name)
    layers = 4
    sched = step_kinds(cfg, 50, layers)
    for t, plan in enumerate(sched.steps):
        assert plan.skip == (t in SPEC_SKIP), t
        if plan.skip:
            continue
        assert plan.attn[:2] == (AttnKind.DENSE, AttnKind.DENSE)
        if t == 0:
            want = AttnKind.WARMUP
        elif t in (1, 10, 40):
            want = AttnKind.MASK
        else:
            want = AttnKind.SPARSE
        assert plan.attn[2:] == (want,) * (layers - 2), t
        assert plan.mlp == (MLPKind.DENSE,) * layers  # MLP not sparsified for video models


@pytest.mark.parametrize("name", ["flux", "hunyuan", "wan", "mochi"])
@pytest.mark.parametrize("num_steps, num_layers", [(50, 6), (64, 3), (13, 1), (1, 4), (30, 0)])
def test_presets_match_spec_loop(name, num_steps, num_layers):
    _check_against_expected(preset(name), num_steps, num_layers)


@pytest.mark.parametrize(
    "attn, mlp",
    [
        (AttnConfig(full_step_every=3, first_n_dense_layers=0), MLPConfig(is_enabled=True, top_keys=0.2)),
        (
            AttnConfig(full_step_every=7, recompute_mask=False, first_n_dense_layers=1),
            MLPConfig(is_enabled=True, top_keys=0.2, full_step_every=4, block_mask_cache=3, first_n_dense_layers=3),
        ),
        (
            AttnConfig(full_step_schedule=frozenset({0, 1, 5, 6, 17}), recompute_mask=False),
            MLPConfig(is_enabled=True, top_keys=0.5, full_step_every=25, block_mask_cache=1, first_n_dense_layers=0),
        ),
        (AttnConfig(is_enabled=False), MLPConfig(is_enabled=True, top_keys=0.3, full_step_every=1)),
        (AttnConfig(first_n_dense_layers=10), MLPConfig(is_enabled=False)),
    ],
)
def test_other_configs_match_spec_loop(attn, mlp):
    cfg = ChipmunkConfig(attn=attn, mlp=mlp)
    _check_against_expected(cfg, 50, 5)


def test_step_caching_with_default_skip_set():
    cfg = preset("flux").replace(step_caching=StepCachingConfig(is_enabled=True))
    sched, _ = _check_against_expected(cfg, 50, 4)
    skipped = {t for t, p in enumerate(sched.steps) if p.skip}
    assert skipped == SPEC_SKIP
    assert len(skipped) == 25
    # Step caching off: the same set is ignored.
    off = preset("flux").replace(step_caching=StepCachingConfig(is_enabled=False))
    assert not any(p.skip for p in step_kinds(off, 50, 4).steps)


def test_skipped_steps_do_not_run_layers():
    sched = step_kinds(preset("hunyuan"), 50, 3)
    for t in SPEC_SKIP:
        plan = sched.steps[t]
        assert plan.skip
        assert plan.label == "skip"


def _plan_key(exp):
    return exp if exp[0] == "skip" else ("run", exp[1], exp[2])


@pytest.mark.parametrize("name, count", [("flux", 5), ("hunyuan", 4), ("wan", 4), ("mochi", 3)])
def test_distinct_plans(name, count):
    cfg = preset(name)
    sched = step_kinds(cfg, 50, 4)
    expected = _expected_schedule(cfg, 50, 4)
    first_use = list(dict.fromkeys(_plan_key(e) for e in expected))
    # flux: warm-up/full, mask/recompute, sparse/recompute, full/full, sparse/reuse;
    # hunyuan, wan: warm-up, mask, sparse, skip; mochi: warm-up, mask, sparse.
    assert len(first_use) == count
    distinct = sched.distinct()
    assert len(distinct) == count
    assert len(set(sched.steps)) == count
    for plan, exp in zip(distinct, first_use, strict=True):
        if exp[0] == "skip":
            assert plan.skip
        else:
            assert (plan.skip, plan.attn, plan.mlp) == (False, exp[1], exp[2])


def test_step_plans_are_hashable_static_values():
    a = step_kinds(preset("flux"), 20, 3)
    b = step_kinds(preset("flux"), 20, 3)
    assert a == b and hash(a.steps[11]) == hash(b.steps[11])
    assert a.steps[3] == a.steps[5] and a.steps[11] != a.steps[12]


def test_skipping_step_one_with_attention_raises():
    cfg = preset("hunyuan").replace(step_caching=StepCachingConfig(is_enabled=True, skip_step_schedule={1, 7}))
    with pytest.raises(ConfigError):
        step_kinds(cfg, 50, 4)


def test_skipping_step_zero_is_rejected():
    with pytest.raises(ConfigError):
        StepCachingConfig(is_enabled=True, skip_step_schedule=frozenset({0, 7}))


def test_attention_schedule_without_warmup_or_mask_step_is_rejected():
    for schedule in ({0, 10}, {1, 10}, {10, 40}):
        with pytest.raises(ConfigError):
            dataclasses.replace(preset("wan").attn, full_step_schedule=frozenset(schedule))


@pytest.mark.parametrize("num_steps, num_layers", [(0, 4), (-1, 4), (10, -1)])
def test_bad_sizes_raise(num_steps, num_layers):
    with pytest.raises(ConfigError):
        step_kinds(preset("flux"), num_steps, num_layers)


def test_mlp_recomputes_when_no_indices_exist_yet():
    # Attention off, so step 1 may be skipped; the first sparse MLP step is then 11 (odd, >= 10): it has no
    # indices to reuse and must select.
    cfg = ChipmunkConfig(
        attn=AttnConfig(is_enabled=False),
        mlp=MLPConfig(is_enabled=True, top_keys=0.3, first_n_dense_layers=1),
        step_caching=StepCachingConfig(is_enabled=True, skip_step_schedule=frozenset(range(1, 10))),
    )
    sched, _ = _check_against_expected(cfg, 20, 3)
    assert sched.steps[10].mlp == (MLPKind.DENSE, MLPKind.FULL, MLPKind.FULL)
    assert sched.steps[11].mlp == (MLPKind.DENSE, MLPKind.SPARSE_RECOMPUTE, MLPKind.SPARSE_RECOMPUTE)
    assert sched.steps[13].mlp == (MLPKind.DENSE, MLPKind.SPARSE_REUSE, MLPKind.SPARSE_REUSE)
    assert all(p.attn == (AttnKind.DENSE,) * 3 for p in sched.steps if not p.skip)
