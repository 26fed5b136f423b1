"""Wan2.1 flow-matching solvers: UniPC multistep (as diffusers runs Wan) and flow Euler, as pure JAX functions.

The Wan pipelines sample with diffusers' ``UniPCMultistepScheduler`` configured with
``prediction_type='flow_prediction'``, ``use_flow_sigmas=True``, ``flow_shift`` (5.0 for 720p, 3.0 for 480p),
``solver_order=2``, ``solver_type='bh2'``, ``predict_x0=True``, ``lower_order_final=True`` and
``final_sigmas_type='zero'``. Every UniPC coefficient depends only on the sigma schedule and the step index, so
they are computed once on the host (float64, from the float32 sigmas diffusers stores) into ``FlowTables``; a
step is then a fixed linear combination of the current sample, the previous sample and the last few x0
predictions, indexed by a traced step number. The solver state (``UniPCState``) is a pytree of fixed shape, so
the update lives inside a jitted denoising step.

Notation (diffusers'): for flow matching alpha = 1 - sigma, lambda = log(alpha) - log(sigma); the model output
v is converted to the x0 prediction m = x - sigma * v before the UniP predictor / UniC corrector.

The solvers implement the ``solver`` interface of ``chipmunk_jax.sampler.EulerSampler``:
``model_time(tables, t)``, ``update(tables, t, latents, velocity, state)``, ``num_steps(tables)``,
``init_state(latents)``.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
# diffusers moves a first sigma of exactly 1 down by this much (log(alpha) would be -inf).
_FIRST_SIGMA_EPS = 1e-6


def flow_sigmas(
    num_steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmas and model timesteps of diffusers' UniPC scheduler with ``use_flow_sigmas`` (the Wan schedule).

    Args:
      num_steps: denoising steps n.
      shift: flow shift: s' = shift * s / (1 + (shift - 1) * s) (Wan: 5.0 at 720p, 3.0 at 480p).
      num_train_timesteps: the model's training timesteps (1000 for Wan).

    Returns:
      (sigmas float32 [n + 1] from ~1 down to a final 0, timesteps float32 [n]): the timesteps are the integers
      diffusers feeds the model (``int64(sigma * 1000)``, truncated, computed in float64).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    s = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)[:-1]
    s = shift * s / (1.0 + (shift - 1.0) * s)
    if abs(s[0] - 1.0) < _FIRST_SIGMA_EPS:
        s[0] -= _FIRST_SIGMA_EPS
    timesteps = np.trunc(s * num_train_timesteps).astype(np.float32)
    sigmas = np.concatenate([s, [0.0]]).astype(np.float32)
    return sigmas, timesteps


@flax.struct.dataclass
class FlowTables:
    """Per-generation solver tables (traced arrays: a new schedule does not recompile the step).

    Attributes:
      sigmas: float32 [n + 1], the last one 0.
      timesteps: float32 [n] model timesteps in [0, 1000].
      pred: float32 [n, 1 + K] UniPC predictor coefficients on (x_t, m_t, m_{t-1}, ..., m_{t-K+1}), or None.
      corr: float32 [n, 2 + K + 1] UniPC corrector coefficients on (x_t, x_{t-1}, m_t, m_{t-1}, ..., m_{t-K}),
        or None. x_{t-1} is the (corrected) sample the previous predictor started from.
    """

    sigmas: jax.Array
    timesteps: jax.Array
    pred: jax.Array | None = None
    corr: jax.Array | None = None


@flax.struct.dataclass
class UniPCState:
    """UniPC memory between steps (fixed shapes; zeros before the entries exist).

    Attributes:
      history: float32 [K, *latents.shape], the x0 predictions m_{t-1}, ..., m_{t-K}.
      last_sample: float32 [*latents.shape], the corrected sample the last predictor started from.
    """

    history: jax.Array
    last_sample: jax.Array


def _lambda(sigma: float) -> float:
    return float(np.log(1.0 - sigma) - np.log(sigma))


def _rhos(rks: list[float], hh: float, b_h: float, order: int) -> tuple[np.ndarray, np.ndarray]:
    """(R [order, order], b [order]) of the UniPC linear system; rks excludes the trailing 1."""
    r = np.asarray([*rks, 1.0])
    rows, b = [], []
    h_phi_k = np.expm1(hh) / hh - 1.0
    factorial = 1
    for i in range(1, order + 1):
        rows.append(r ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.stack(rows), np.asarray(b)


def _b_h(hh: float, solver_type: str) -> float:
    return hh if solver_type == "bh1" else float(np.expm1(hh))


@dataclasses.dataclass(frozen=True)
class UniPC:
    """UniPC multistep with flow sigmas and x0 prediction (diffusers ``UniPCMultistepScheduler``, Wan settings).

    Attributes:
      order: solver order K (``solver_order``; 2 for Wan).
      solver_type: 'bh2' (Wan) or 'bh1'.
      lower_order_final: use order 1 at the last step (and lower orders near the end), as Wan does.
      disable_corrector: steps t whose *following* corrector is skipped (diffusers ``disable_corrector``).
    """

    order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()

    def __post_init__(self):
        if self.order < 1:
            raise ValueError(f"order must be >= 1, got {self.order}")
        if self.solver_type not in ("bh1", "bh2"):
            raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {self.solver_type!r}")
        object.__setattr__(self, "disable_corrector", tuple(sorted(int(t) for t in self.disable_corrector)))

    def orders(self, num_steps: int) -> list[int]:
        """The predictor order of every step (warm-up from order 1; lower orders at the end if requested)."""
        out = []
        for t in range(num_steps):
            k = min(self.order, num_steps - t) if self.lower_order_final else self.order
            out.append(min(k, min(t, self.order) + 1))
        return out

    def tables(self, sigmas: np.ndarray, timesteps: np.ndarray) -> FlowTables:
        """Precomputes every step's predictor and corrector coefficients (host, float64).

        Args:
          sigmas: float32 [n + 1] (``flow_sigmas``); all but the last in (0, 1), the last in [0, 1).
          timesteps: [n] model timesteps.

        Returns:
          FlowTables with ``pred`` and ``corr`` filled.
        """
        sig = np.asarray(sigmas, np.float32).astype(np.float64)
        n, k_max = len(sig) - 1, self.order
        if np.shape(timesteps) != (n,):
            raise ValueError(f"need {n} timesteps for {n + 1} sigmas, got {np.shape(timesteps)}")
        if np.any(sig[:n] <= 0) or np.any(sig[:n] >= 1) or not 0 <= sig[n] < 1:
            raise ValueError("sigmas must lie in (0, 1) except a final sigma in [0, 1)")
        orders = self.orders(n)
        if sig[n] == 0 and orders[-1] > 1:
            raise ValueError("a final sigma of 0 needs order 1 at the last step (lower_order_final=True)")
        lam = [_lambda(s) for s in sig[:n]]
        pred = np.zeros((n, 1 + k_max))
        corr = np.zeros((n, 3 + k_max))
        for t in range(n):
            k = orders[t]
            # Predictor from sigma_t to sigma_{t+1} with x0 predictions m_t, ..., m_{t-k+1}.
            s0, s1 = sig[t], sig[t + 1]
            if s1 == 0:
                pred[t, 1] = 1.0  # alpha = 1, h = inf: the sample becomes the x0 prediction
            else:
                hh = -(_lambda(s1) - lam[t])
                b_h, phi1 = _b_h(hh, self.solver_type), np.expm1(hh)
                a1 = 1.0 - s1
                pred[t, 0] = s1 / s0
                pred[t, 1] = -a1 * phi1
                if k > 1:
                    rks = [(lam[t - j] - lam[t]) / -hh for j in range(1, k)]
                    if k == 2:
                        rhos = np.asarray([0.5])
                    else:
                        r, b = _rhos(rks, hh, b_h, k)
                        rhos = np.linalg.solve(r[:-1, :-1], b[:-1])
                    for j in range(1, k):
                        c = -a1 * b_h * rhos[j - 1] / rks[j - 1]
                        pred[t, 1 + j] += c
                        pred[t, 1] -= c
            # Corrector of x_t (predicted from x_{t-1} at order k_prev) with the new x0 prediction m_t.
            if t == 0 or (t - 1) in self.disable_corrector:
                corr[t, 0] = 1.0
                continue
            kc = orders[t - 1]
            s_prev, s_t = sig[t - 1], sig[t]
            hh = -(lam[t] - lam[t - 1])
            b_h, phi1 = _b_h(hh, self.solver_type), np.expm1(hh)
            a_t = 1.0 - s_t
            rks = [(lam[t - 1 - j] - lam[t - 1]) / -hh for j in range(1, kc)]
            if kc == 1:
                rhos = np.asarray([0.5])
            else:
                r, b = _rhos(rks, hh, b_h, kc)
                rhos = np.linalg.solve(r, b)
            corr[t, 1] = s_t / s_prev
            corr[t, 2] = -a_t * b_h * rhos[-1]  # m_t
            corr[t, 3] = -a_t * phi1 + a_t * b_h * rhos[-1]  # m_{t-1}
            for j in range(1, kc):
                c = -a_t * b_h * rhos[j - 1] / rks[j - 1]
                corr[t, 3 + j] += c
                corr[t, 3] -= c
        return FlowTables(
            sigmas=jnp.asarray(np.asarray(sigmas, np.float32)),
            timesteps=jnp.asarray(np.asarray(timesteps, np.float32)),
            pred=jnp.asarray(pred, jnp.float32),
            corr=jnp.asarray(corr, jnp.float32),
        )

    def init_state(self, latents: jax.Array) -> UniPCState:
        """The empty solver state for latents of this shape (float32)."""
        z = jnp.zeros(latents.shape, jnp.float32)
        return UniPCState(history=jnp.zeros((self.order, *latents.shape), jnp.float32), last_sample=z)

    def model_time(self, tables: FlowTables, t: jax.Array) -> jax.Array:
        """The timestep the model sees at step t."""
        return tables.timesteps[t]

    def num_steps(self, tables: FlowTables) -> int:
        return int(tables.timesteps.shape[0])

    def update(
        self, tables: FlowTables, t: jax.Array, latents: jax.Array, velocity: jax.Array, state: UniPCState
    ) -> tuple[jax.Array, UniPCState]:
        """One UniPC step (corrector of x_t, then predictor to x_{t+1}); pure, t may be traced.

        Args:
          tables: from ``tables``.
          t: step index.
          latents: x_t [...] (any shape).
          velocity: the (guided) flow-matching model output at (x_t, sigma_t), same shape.
          state: the UniPCState from the previous step (``init_state`` at t = 0).

        Returns:
          (x_{t+1} in the dtype of ``latents``, new state).
        """
        x = latents.astype(jnp.float32)
        m = x - tables.sigmas[t] * velocity.astype(jnp.float32)
        ms = [m] + [state.history[j] for j in range(self.order)]  # m_t, m_{t-1}, ..., m_{t-K}
        c, p = tables.corr[t], tables.pred[t]
        # Unrolled sums of scalar * array: a tensordot would run as a matmul, at TF32 precision on some GPUs.
        xc = c[0] * x + c[1] * state.last_sample
        for j, mj in enumerate(ms):
            xc = xc + c[2 + j] * mj
        nxt = p[0] * xc
        for j in range(self.order):
            nxt = nxt + p[1 + j] * ms[j]
        new = UniPCState(history=jnp.stack(ms[: self.order]), last_sample=xc)
        return nxt.astype(latents.dtype), new


@dataclasses.dataclass(frozen=True)
class FlowEuler:
    """First-order flow Euler x_{t+1} = x_t + (sigma_{t+1} - sigma_t) v on the same Wan sigma/timestep schedule.

    (UniPC with order 1 and no corrector is algebraically the same update.)
    """

    def tables(self, sigmas: np.ndarray, timesteps: np.ndarray) -> FlowTables:
        """Wraps the schedule (no coefficients needed)."""
        if np.shape(timesteps) != (len(sigmas) - 1,):
            raise ValueError(f"need {len(sigmas) - 1} timesteps for {len(sigmas)} sigmas, got {np.shape(timesteps)}")
        return FlowTables(
            sigmas=jnp.asarray(np.asarray(sigmas, np.float32)),
            timesteps=jnp.asarray(np.asarray(timesteps, np.float32)),
        )

    def init_state(self, latents: jax.Array) -> None:
        return None

    def model_time(self, tables: FlowTables, t: jax.Array) -> jax.Array:
        return tables.timesteps[t]

    def num_steps(self, tables: FlowTables) -> int:
        return int(tables.timesteps.shape[0])

    def update(self, tables: FlowTables, t, latents, velocity, state) -> tuple[jax.Array, None]:
        """One Euler step; returns (x_{t+1}, None)."""
        dt = tables.sigmas[t + 1] - tables.sigmas[t]
        return (latents.astype(jnp.float32) + dt * velocity.astype(jnp.float32)).astype(latents.dtype), None


SOLVERS = {"unipc": UniPC(), "euler": FlowEuler()}
