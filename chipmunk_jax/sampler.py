"""Flow-matching Euler sampler with Chipmunk step plans (model-agnostic).

The sampler state (step, latents, cache, rng) is one pytree. The driver holds only static, hashable fields:
the denoiser (a frozen dataclass wrapping a model's graphdef) and the step-kind schedule. One step function
is compiled per distinct ``StepPlan`` and reused for every step of that kind and across generations (the
compiled executables are kept in a process-wide table keyed by the static arguments and argument shapes).
The state is donated to each step; the parameters never are.

A denoiser provides:
  ``velocity(params, cond, latents, sigma, cache, rng, step, plan) -> (velocity, new_cache)``
  ``skip_velocity(params, cond, latents, sigma, cache) -> velocity`` (step caching, SPEC §4)
  ``stats(cache) -> dict[str, float]`` (achieved sparsity, for the report)

The update is flow-matching Euler on a sigma array unless the sampler is given a ``solver`` (static, hashable)
with per-generation ``tables`` (any pytree) in place of the sigmas:
  ``model_time(tables, t)`` (what the denoiser receives as ``sigma``),
  ``update(tables, t, latents, velocity, solver_state) -> (latents, solver_state)``,
  ``num_steps(tables) -> int``; the solver state lives in ``SamplerState.solver``.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax.cache import cache_nbytes
from chipmunk_jax.parallel import memory_nbytes
from chipmunk_jax.schedules import Schedule, StepPlan

# Number of times each step function was traced, by plan label (a bound on retraces in tests).
TRACE_COUNTS: collections.Counter = collections.Counter()
_COMPILED: dict[Any, Any] = {}


class Denoiser(Protocol):
    def velocity(self, params, cond, latents, sigma, cache, rng, step, plan: StepPlan): ...

    def skip_velocity(self, params, cond, latents, sigma, cache): ...

    def stats(self, cache) -> dict[str, float]: ...


@flax.struct.dataclass
class SamplerState:
    """Everything that changes from one denoising step to the next.

    Attributes:
      step: int32 [] index of the next step.
      latents: [B, N, C] float32 latents (in the model's token order).
      cache: the model's cache pytree (Chipmunk caches, step-caching hidden states).
      rng: the generation's key; per-(step, layer) keys are derived from it (``indices.layer_rng``).
      solver: the solver's state pytree (multistep history), or None (Euler).
    """

    step: jax.Array
    latents: jax.Array
    cache: Any
    rng: jax.Array
    solver: Any = None


def flow_match_sigmas(num_steps: int, *, shift: float = 1.0, mu: float | None = None) -> np.ndarray:
    """Sigmas of diffusers' FlowMatchEulerDiscreteScheduler for ``sigmas=linspace(1, 1/n, n)``, plus a final 0.

    Args:
      num_steps: denoising steps n.
      shift: static shift (used when ``mu`` is None): s' = shift*s / (1 + (shift - 1)*s).
      mu: dynamic (resolution-dependent) shift: s' = e^mu / (e^mu + (1/s - 1)).

    Returns:
      float32 [n + 1], decreasing from (shifted) 1 to 0. The model's timestep at step t is ``sigmas[t]``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if mu is not None:
        s = (math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0) ** 1.0)).astype(np.float32)
    else:
        s = (shift * s / (1 + (shift - 1) * s)).astype(np.float32)
    return np.concatenate([s, np.zeros(1, np.float32)])


def _euler_step(denoiser, plan: StepPlan, params, cond, sigmas, state: SamplerState, solver=None) -> SamplerState:
    TRACE_COUNTS[plan.label] += 1
    t = state.step
    sigma = sigmas[t] if solver is None else solver.model_time(sigmas, t)
    if plan.skip:
        v = denoiser.skip_velocity(params, cond, state.latents, sigma, state.cache)
        cache = state.cache
    else:
        v, cache = denoiser.velocity(params, cond, state.latents, sigma, state.cache, state.rng, t, plan)
    if solver is None:
        latents, solver_state = state.latents + (sigmas[t + 1] - sigma) * v.astype(jnp.float32), state.solver
    else:
        latents, solver_state = solver.update(sigmas, t, state.latents, v, state.solver)
    return SamplerState(
        step=t + 1, latents=latents.astype(state.latents.dtype), cache=cache, rng=state.rng, solver=solver_state
    )


_jitted_step = jax.jit(_euler_step, static_argnums=(0, 1), static_argnames=("solver",), donate_argnames=("state",))


def _abstract(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


def compiled_step(denoiser, plan: StepPlan, params, cond, sigmas, state, solver=None):
    """The compiled step for (denoiser, plan, solver, argument shapes), compiling it on first use.

    Returns:
      (executable, compile seconds; 0.0 when it was already compiled).
    """
    args = (params, cond, sigmas, state)
    key = (denoiser, plan, solver, jax.tree.structure(args), str(_abstract(args)))
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    exe = _jitted_step.lower(denoiser, plan, params, cond, sigmas, state, solver=solver).compile()
    _COMPILED[key] = exe
    return exe, time.perf_counter() - t0


@dataclasses.dataclass
class Report:
    """What a generation did: per-step times by kind, compile time, achieved sparsity, cache memory.

    ``cache_bytes`` is the whole cache; ``cache_host_bytes`` the part kept in host memory (offloading) and
    ``cache_device_bytes_per_device`` what one device holds of the rest (its shard, on a mesh).
    """

    step_times: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    compile_s: dict[str, float] = dataclasses.field(default_factory=dict)
    stats: dict[str, float] = dataclasses.field(default_factory=dict)
    cache_bytes: int = 0
    cache_host_bytes: int = 0
    cache_device_bytes_per_device: int = 0

    @property
    def total_s(self) -> float:
        return sum(sum(v) for v in self.step_times.values())

    def format(self) -> str:
        """A human-readable table."""
        lines = ["step kind                                   steps   mean ms   total s"]
        for label, ts in self.step_times.items():
            lines.append(f"{label:<42} {len(ts):>6} {1e3 * np.mean(ts):>9.2f} {sum(ts):>9.3f}")
        lines.append(f"denoising total: {self.total_s:.3f} s (compile excluded)")
        if self.compile_s:
            comp = ", ".join(f"{k}: {v:.2f}s" for k, v in self.compile_s.items())
            lines.append(f"compile: {sum(self.compile_s.values()):.2f} s ({comp})")
        else:
            lines.append("compile: 0 s (all step kinds already compiled)")
        for k, v in self.stats.items():
            lines.append(f"{k}: {v:.4f}")
        lines.append(
            f"cache memory: {self.cache_bytes / 2**20:.1f} MiB (host {self.cache_host_bytes / 2**20:.1f} MiB, "
            f"device {self.cache_device_bytes_per_device / 2**20:.1f} MiB per device)"
        )
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class EulerSampler:
    """Static driver of a generation: the denoiser, the step-kind schedule and the solver (all hashable).

    ``solver`` None is flow-matching Euler on ``sigmas``; see the module docstring for the solver interface.
    """

    denoiser: Any
    schedule: Schedule
    solver: Any = None

    def run(
        self, params, cond, sigmas, state: SamplerState, *, progress: bool = True, on_step=None
    ) -> tuple[SamplerState, Report]:
        """Runs every step of the schedule from ``state``.

        Args:
          params: the model parameters (an nnx.State); never donated.
          cond: conditioning pytree (text embeddings, RoPE tables, ...).
          sigmas: float32 [num_steps + 1] (``flow_match_sigmas``), or the solver's tables pytree.
          state: the initial SamplerState (donated: do not reuse it).
          progress: show a tqdm progress bar.
          on_step: optional ``on_step(state)`` called after every step (outside the timed region), e.g. to keep
            the intermediate latents; it must copy what it keeps (``np.array(state.latents)``): the state is
            donated to the next step.

        Returns:
          (final state, Report).
        """
        n = len(self.schedule.steps)
        if self.solver is None:
            sigmas = jnp.asarray(sigmas, jnp.float32)
            if sigmas.shape != (n + 1,):
                raise ValueError(f"need {n + 1} sigmas for {n} steps, got {sigmas.shape}")
        elif self.solver.num_steps(sigmas) != n:
            raise ValueError(f"the solver tables have {self.solver.num_steps(sigmas)} steps, the schedule {n}")
        report = Report()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="denoising", unit="step")
        for plan in self.schedule.steps:
            exe, comp = compiled_step(self.denoiser, plan, params, cond, sigmas, state, self.solver)
            if comp:
                report.compile_s[plan.label] = report.compile_s.get(plan.label, 0.0) + comp
            t0 = time.perf_counter()
            state = exe(params, cond, sigmas, state)
            jax.block_until_ready(state.latents)
            report.step_times.setdefault(plan.label, []).append(time.perf_counter() - t0)
            if on_step is not None:
                on_step(state)
            if bar is not None:
                bar.set_postfix_str(plan.label)
                bar.update(1)
        if bar is not None:
            bar.close()
        report.stats = dict(self.denoiser.stats(state.cache))
        report.cache_bytes = cache_nbytes(state.cache)
        mem = memory_nbytes(state.cache)
        report.cache_host_bytes = mem["host"]
        report.cache_device_bytes_per_device = mem["device_per_device"]
        return state, report


def clear_compiled() -> None:
    """Drops every compiled step function (frees their executables)."""
    _COMPILED.clear()
