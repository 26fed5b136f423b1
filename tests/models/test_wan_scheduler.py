"""Wan flow-matching solvers: parity with diffusers' UniPCMultistepScheduler over whole runs, flow Euler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from models.wan.scheduler import FlowEuler, UniPC, flow_sigmas


def _diffusers(steps: int, shift: float, **kw) -> UniPCMultistepScheduler:
    s = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        **kw,
    )
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize(
    "steps, shift, kw",
    [
        (50, 5.0, {}),  # Wan 720p
        (30, 3.0, {}),  # Wan 480p
        (10, 5.0, {}),
        (20, 5.0, {"solver_order": 3}),
        # bh1: diffusers' final step to sigma 0 divides by B(h) = -inf and returns NaN; ours returns the x0
        # prediction, so the comparison stops one step before the end.
        (15, 3.0, {"solver_type": "bh1"}),
        (12, 1.0, {"disable_corrector": [0, 4, 5]}),  # shift 1: the first sigma is exactly 1 before the eps
    ],
)
def test_unipc_matches_diffusers_over_a_whole_run(steps, shift, kw):
    """Timesteps, sigmas and every intermediate sample of a run with random model outputs."""
    ref = _diffusers(steps, shift, **kw)
    assert ref.config.solver_order == kw.get("solver_order", 2) and ref.config.lower_order_final
    sig, ts = flow_sigmas(steps, shift)
    np.testing.assert_array_equal(sig, ref.sigmas.numpy())
    np.testing.assert_array_equal(ts, ref.timesteps.numpy().astype(np.float32))
    assert sig[-1] == 0 and sig.dtype == np.float32

    solver = UniPC(
        order=kw.get("solver_order", 2),
        solver_type=kw.get("solver_type", "bh2"),
        disable_corrector=tuple(kw.get("disable_corrector", ())),
    )
    tables = solver.tables(sig, ts)
    rng = np.random.default_rng(steps)
    shape = (2, 4, 3, 5)
    x_ref = torch.tensor(rng.standard_normal(shape))  # float64 reference trajectory
    x = jnp.asarray(x_ref.numpy(), jnp.float32)
    state = solver.init_state(x)
    step = jax.jit(solver.update)
    compared = steps - 1 if kw.get("solver_type") == "bh1" else steps
    for t in range(compared):
        assert float(solver.model_time(tables, t)) == float(ref.timesteps[t])
        v = rng.standard_normal(shape)
        x_ref = ref.step(torch.tensor(v), ref.timesteps[t], x_ref).prev_sample
        x, state = step(tables, t, x, jnp.asarray(v, jnp.float32), state)
        want = x_ref.numpy()
        err = float(np.abs(np.asarray(x, np.float64) - want).max() / np.abs(want).max())
        assert err <= 5e-6, (t, err)


def test_unipc_order_one_without_corrector_is_flow_euler():
    sig, ts = flow_sigmas(8, 5.0)
    uni = UniPC(order=1, disable_corrector=tuple(range(8)))
    eul = FlowEuler()
    tu, te = uni.tables(sig, ts), eul.tables(sig, ts)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)
    xu, xe, su = x, x, uni.init_state(x)
    for t in range(8):
        v = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)
        xu, su = uni.update(tu, t, xu, v, su)
        xe, _ = eul.update(te, t, xe, v, None)
        np.testing.assert_allclose(np.asarray(xu), np.asarray(xe), rtol=1e-5, atol=1e-5)


def test_flow_euler_step():
    sig, ts = flow_sigmas(4, 3.0)
    tab = FlowEuler().tables(sig, ts)
    x, v = jnp.ones((2, 3)), jnp.full((2, 3), 2.0)
    y, _ = FlowEuler().update(tab, 1, x, v, None)
    np.testing.assert_allclose(np.asarray(y), 1.0 + 2.0 * (float(sig[2]) - float(sig[1])), rtol=1e-6)


def test_solver_argument_errors():
    sig, ts = flow_sigmas(6, 5.0)
    with pytest.raises(ValueError, match="lower_order_final"):
        UniPC(lower_order_final=False).tables(sig, ts)
    with pytest.raises(ValueError, match="timesteps"):
        UniPC().tables(sig, ts[:-1])
    with pytest.raises(ValueError, match="solver_type"):
        UniPC(solver_type="bh3")
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(0, 5.0)
    assert UniPC().orders(5) == [1, 2, 2, 2, 1]
    assert UniPC(order=3).orders(6) == [1, 2, 3, 3, 2, 1]
