"""The sparse MLP operator against SPEC §2, with a float64 numpy simulation as the independent oracle."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chipmunk_jax as cj
from chipmunk_jax.mlp import selection_capacity
from chipmunk_jax.schedules import MLPKind as M
from pallas_kernels.mlp import reference as ref_ops
from pallas_kernels.mlp import xla as xla_ops

B, C, F = 2, 12, 96
BACKENDS = ("reference", "xla")


def _weights(seed: int, c: int = C, f: int = F):
    ks = jax.random.split(jax.random.key(seed), 4)
    w1 = jax.random.normal(ks[0], (f, c), jnp.float32) / np.sqrt(c)
    b1 = 0.5 * jax.random.normal(ks[1], (f,), jnp.float32)
    w2 = jax.random.normal(ks[2], (f, c), jnp.float32) / np.sqrt(f)
    b2 = 0.5 * jax.random.normal(ks[3], (c,), jnp.float32)
    return w1, b1, w2, b2


def _gelu64(z):
    return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))


class NumpyMLP:
    """SPEC §2 written out in float64 numpy, one token block at a time."""

    def __init__(self, w1, b1, w2, b2, cfg: cj.MLPConfig, n: int):
        self.w1, self.b1, self.w2, self.b2 = (np.asarray(a, np.float64) for a in (w1, b1, w2, b2))
        self.cfg, self.n = cfg, n
        self.bm = cfg.bm
        self.sel: list | None = None

    def _blocks(self):
        return [(s, min(s + self.bm, self.n)) for s in range(0, self.n, self.bm)]

    def full(self, x):
        z = x @ self.w1.T + self.b1
        self.act = _gelu64(z)
        self.out = self.act @ self.w2 + self.b2
        self.m = np.stack([z[:, s:e].mean(1) for s, e in self._blocks()], axis=1)  # [B, G, F]
        return self.out.copy()

    def select(self, x, uniform):
        cfg = self.cfg
        zhat = np.stack([x[:, s:e].mean(1) for s, e in self._blocks()], 1) @ self.w1.T + self.b1
        score = np.abs(zhat - self.m)
        self.sel = {}
        for b in range(x.shape[0]):
            for g in range(score.shape[1]):
                thr = np.quantile(score[b, g], 1.0 - cfg.top_keys, method="linear")
                keep = (score[b, g] >= thr) | (uniform[b, g] < cfg.random_keys)
                on = np.flatnonzero(keep)
                count = min(-(-on.size // cfg.counts_multiple_of) * cfg.counts_multiple_of, score.shape[2])
                sel = np.concatenate([on, np.flatnonzero(~keep)])[:count]
                self.sel[b, g] = sel
                self.m[b, g, sel] = zhat[b, g, sel]

    def delta(self, x):
        for (b, g), sel in self.sel.items():
            s, e = self._blocks()[g]
            block = np.ix_(np.arange(s, e), sel)
            p = _gelu64(x[b, s:e] @ self.w1[sel].T + self.b1[sel]) - self.act[b][block]
            self.out[b, s:e] += p @ self.w2[sel]
            self.act[b][block] += p
        return self.out.copy()


def _flux_mlp_kinds(num_steps: int) -> list[M]:
    """SPEC §2/§2.2 for full_step_every 10, block_mask_cache 2, written out by hand."""
    kinds = []
    for t in range(num_steps):
        if t % 10 == 0:
            kinds.append(M.FULL)
        elif t < 10 or t % 2 == 0:
            kinds.append(M.SPARSE_RECOMPUTE)
        else:
            kinds.append(M.SPARSE_REUSE)
    return kinds


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_caches_match_float64_simulation_over_flux_schedule(backend):
    """(c) 14 steps of the Flux MLP schedule: outputs and all three running caches follow SPEC §2 exactly."""
    n = 56  # not a multiple of bm=16: the last block is partial
    cfg = cj.MLPConfig(
        is_enabled=True, top_keys=0.3, random_keys=0.05, counts_multiple_of=16, bm=16, first_n_dense_layers=0
    )
    kinds = _flux_mlp_kinds(14)
    sched = cj.step_kinds(cj.ChipmunkConfig(mlp=cfg), 14, 1)
    assert [p.mlp[0] for p in sched.steps] == kinds  # the schedule module agrees with the hand-written rule
    w1, b1, w2, b2 = _weights(0)
    sim = NumpyMLP(w1, b1, w2, b2, cfg, n)
    cache = cj.init_mlp_cache(cfg, batch=B, seq_len=n, width=C, hidden=F, dtype=jnp.float32)
    g = -(-n // cfg.bm)
    x = np.asarray(jax.random.normal(jax.random.key(1), (B, n, C)), np.float64)
    for t, kind in enumerate(kinds):
        x = x + 0.3 * np.asarray(jax.random.normal(jax.random.key(100 + t), (B, n, C)), np.float64)  # drifting input
        rng = jax.random.key(1000 + t)
        y, cache = cj.sparse_mlp(
            jnp.asarray(x, jnp.float32), w1, b1, w2, b2, cache, kind=kind, config=cfg, backend=backend, rng=rng
        )
        if kind is M.FULL:
            want = sim.full(x)
        else:
            if kind is M.SPARSE_RECOMPUTE:
                sim.select(x, np.asarray(jax.random.uniform(rng, (B, g, F))))
            want = sim.delta(x)
        np.testing.assert_allclose(np.asarray(y), want[:, :n], atol=2e-4, rtol=1e-4, err_msg=f"step {t} {kind}")
    np.testing.assert_allclose(np.asarray(cache.act)[:, :n], sim.act, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(cache.out)[:, :n], sim.out, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(cache.block_mean), sim.m, atol=2e-4, rtol=1e-4)
    for (b, gi), sel in sim.sel.items():
        assert int(cache.counts[b, gi]) == sel.size
        np.testing.assert_array_equal(np.sort(np.asarray(cache.indices[b, gi, : sel.size])), np.sort(sel))
    # The method must actually be sparse here, or this test would prove nothing about the delta algebra.
    assert 0 < int(cache.counts.max()) < F


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_selected_equals_dense_mlp(backend):
    """(a) With every neuron selected, every MLP kind equals the dense MLP, over changing inputs."""
    n = 40
    cfg = cj.MLPConfig(is_enabled=True, top_keys=1.0, random_keys=0.0, counts_multiple_of=32, bm=16)
    w1, b1, w2, b2 = _weights(3)
    cache = cj.init_mlp_cache(cfg, batch=B, seq_len=n, width=C, hidden=F, dtype=jnp.float32)
    for t, kind in enumerate([M.FULL, M.SPARSE_RECOMPUTE, M.SPARSE_REUSE, M.SPARSE_RECOMPUTE, M.FULL, M.DENSE]):
        x = jax.random.normal(jax.random.key(t), (B, n, C), jnp.float32)
        y, cache = cj.sparse_mlp(x, w1, b1, w2, b2, cache, kind=kind, config=cfg, backend=backend, rng=None)
        x64 = np.asarray(x, np.float64)
        want = _gelu64(x64 @ np.asarray(w1, np.float64).T + np.asarray(b1, np.float64)) @ np.asarray(
            w2, np.float64
        ) + np.asarray(b2, np.float64)
        np.testing.assert_allclose(np.asarray(y), want, atol=2e-5, rtol=1e-5, err_msg=f"step {t} {kind}")


def test_mlp_cache_structure_and_single_compilation_per_kind():
    """(d) + (e): shapes/dtypes preserved by every kind; one trace per kind under jit."""
    n = 48
    cfg = cj.MLPConfig(is_enabled=True, top_keys=0.3, random_keys=0.05, counts_multiple_of=16, bm=16)
    w1, b1, w2, b2 = (a.astype(jnp.bfloat16) for a in _weights(4))
    cache0 = cj.init_mlp_cache(cfg, batch=1, seq_len=n, width=C, hidden=F, dtype=jnp.bfloat16)
    traces = []

    @jax.jit(static_argnames=("kind",))
    def step(x, cache, rng, *, kind):
        traces.append(kind)
        return cj.sparse_mlp(x, w1, b1, w2, b2, cache, kind=kind, config=cfg, backend="xla", rng=rng)

    cache = cache0
    kinds = [M.FULL, M.SPARSE_RECOMPUTE, M.SPARSE_REUSE, M.SPARSE_RECOMPUTE, M.SPARSE_REUSE, M.FULL, M.DENSE]
    for t, kind in enumerate(kinds):
        x = jax.random.normal(jax.random.key(t), (1, n, C), jnp.bfloat16)
        y, cache = step(x, cache, jax.random.key(t), kind=kind)
        assert y.dtype == jnp.bfloat16 and y.shape == x.shape
        chex.assert_trees_all_equal_shapes_and_dtypes(cache, cache0)
    assert len(traces) == len(set(kinds))


@pytest.mark.parametrize("chunk,one_shot_max_k", [(16, 0), (40, 0), (512, 0), (16, 10_000)])
def test_xla_delta_primitive_matches_reference(chunk, one_shot_max_k):
    """(f) The XLA primitive (chunked neuron walk) equals the dense reference, incl. partial and empty counts."""
    n, block, kcap = 48, 16, 64
    w1, b1, w2, _ = _weights(5)
    rng = np.random.default_rng(0)
    idx = np.stack([np.stack([rng.permutation(F)[:kcap] for _ in range(n // block)]) for _ in range(B)])
    counts = rng.integers(0, kcap + 1, size=(B, n // block)).astype(np.int32)
    counts[0, 0] = 0
    x = jax.random.normal(jax.random.key(6), (B, n, C), jnp.float32)
    act = jax.random.normal(jax.random.key(7), (B, n, F), jnp.float32)
    out = jax.random.normal(jax.random.key(8), (B, n, C), jnp.float32)
    args = (x, w1, b1, w2, jnp.asarray(idx, jnp.int32), jnp.asarray(counts), act, out)
    want_o, want_a = ref_ops.sparse_mlp_delta_reference(*args, block=block)
    got_o, got_a = xla_ops.sparse_mlp_delta_xla(*args, block=block, chunk=chunk, one_shot_max_k=one_shot_max_k)
    np.testing.assert_allclose(np.asarray(got_o), np.asarray(want_o), atol=2e-5)
    np.testing.assert_allclose(np.asarray(got_a), np.asarray(want_a), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(got_o)[0, :block], np.asarray(out)[0, :block])  # count 0: untouched


def test_mlp_bad_inputs_raise():
    """(g) Mismatched caches, missing rng and unknown kinds are named."""
    cfg = cj.MLPConfig(is_enabled=True, top_keys=0.3, random_keys=0.05, counts_multiple_of=16, bm=16)
    w1, b1, w2, b2 = _weights(0)
    cache = cj.init_mlp_cache(cfg, batch=1, seq_len=32, width=C, hidden=F, dtype=jnp.float32)
    x = jnp.zeros((1, 64, C), jnp.float32)
    with pytest.raises(ValueError, match="do not fit"):
        cj.sparse_mlp(x, w1, b1, w2, b2, cache, kind=M.FULL, config=cfg, backend="xla")
    x = jnp.zeros((1, 32, C), jnp.float32)
    with pytest.raises(ValueError, match="needs rng"):
        cj.sparse_mlp(x, w1, b1, w2, b2, cache, kind=M.SPARSE_RECOMPUTE, config=cfg, backend="xla")
    with pytest.raises(ValueError, match="step kind"):
        cj.sparse_mlp(x, w1, b1, w2, b2, cache, kind="half", config=cfg, backend="xla")
    from pallas_kernels.mlp import api

    with pytest.raises(ValueError, match="multiple of block"):
        api.sparse_mlp_delta(x[:, :30], w1, b1, w2, cache.indices, cache.counts, cache.act, cache.out, block=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_trim_and_its_exact_fallback(backend):
    """The operator passes only the config's capacity of slots when the selection fits, and all slots when not;
    both equal the delta primitive applied to the full, untrimmed selection."""
    f, n, block = 256, 32, 16
    cfg = cj.MLPConfig(is_enabled=True, top_keys=0.1, random_keys=0.0, counts_multiple_of=16, bm=block)
    cap = selection_capacity(cfg, f)
    assert cap == 48  # ceil(25.6) + 1 = 27, + 16, rounded up to 16
    w1, b1, w2, b2 = _weights(9, f=f)
    cache = cj.init_mlp_cache(cfg, batch=1, seq_len=n, width=C, hidden=f, dtype=jnp.float32)
    x0 = jax.random.normal(jax.random.key(0), (1, n, C), jnp.float32)
    x1 = x0 + 0.5 * jax.random.normal(jax.random.key(1), (1, n, C), jnp.float32)
    _, cache = cj.sparse_mlp(x0, w1, b1, w2, b2, cache, kind=M.FULL, config=cfg, backend=backend)
    y1, sel_cache = cj.sparse_mlp(x1, w1, b1, w2, b2, cache, kind=M.SPARSE_RECOMPUTE, config=cfg, backend=backend)
    assert int(sel_cache.counts.max()) <= cap  # the trimmed path ran
    want, _ = ref_ops.sparse_mlp_delta_reference(
        x1, w1, b1, w2, sel_cache.indices, sel_cache.counts, cache.act, cache.out, block=block
    )
    np.testing.assert_allclose(np.asarray(y1), np.asarray(want), atol=1e-5)
    # A selection larger than the capacity (as ties or a random excess could give) takes the full path.
    rng = np.random.default_rng(4)
    big = jnp.asarray(np.stack([rng.permutation(f) for _ in range(n // block)])[None], jnp.int32)
    counts = jnp.asarray([[200, 64]], jnp.int32)
    forced = sel_cache.replace(indices=big, counts=counts)
    y2, c2 = cj.sparse_mlp(x1, w1, b1, w2, b2, forced, kind=M.SPARSE_REUSE, config=cfg, backend=backend)
    want_o, want_a = ref_ops.sparse_mlp_delta_reference(
        x1, w1, b1, w2, big, counts, forced.act, forced.out, block=block
    )
    np.testing.assert_allclose(np.asarray(y2), np.asarray(want_o), atol=1e-5)
    np.testing.assert_allclose(np.asarray(c2.act), np.asarray(want_a), atol=1e-5)
