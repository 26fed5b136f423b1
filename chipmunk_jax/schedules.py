"""Step-kind schedules: pure functions of (config, num_steps, num_layers).

Every decision the reference takes at run time from a global layer counter is taken here, ahead of time, as
a static tuple. The sampler compiles one step function per distinct ``StepPlan`` and reuses it.
"""

from __future__ import annotations

import dataclasses
import enum

from chipmunk_jax.config import ChipmunkConfig, ConfigError

# MLP indices are recomputed every sparse step before this step, whatever block_mask_cache says (SPEC §2.2).
MLP_REUSE_FROM_STEP = 10


class AttnKind(enum.Enum):
    """What a sparsified attention layer does at one step (SPEC §1.2)."""

    DENSE = "dense"  # plain dense attention, cache untouched (dense layer or chipmunk off)
    WARMUP = "warmup"  # step 0: dense attention + normaliser
    MASK = "mask"  # dense + column sums with the previous normaliser -> new keys, C = o - A_S
    FULL = "full"  # dense, stored keys reused, C = o - A_S rebuilt
    SPARSE = "sparse"  # o = C + A_S(q, k, v)


class MLPKind(enum.Enum):
    """What a sparsified MLP layer does at one step (SPEC §2)."""

    DENSE = "dense"
    FULL = "full"
    SPARSE_RECOMPUTE = "sparse_recompute"  # select neurons again, then the sparse delta
    SPARSE_REUSE = "sparse_reuse"  # reuse the previous step's neurons


def _kind(enum_cls, kind):
    """Coerces a kind (enum member or its value) and names the valid ones otherwise."""
    try:
        return enum_cls(kind)
    except ValueError:
        valid = ", ".join(k.value for k in enum_cls)
        raise ValueError(f"unknown {enum_cls.__name__} step kind {kind!r}; valid kinds: {valid}") from None


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The static kind of one denoising step: one entry per layer, and whether the step is skipped."""

    skip: bool
    attn: tuple[AttnKind, ...]
    mlp: tuple[MLPKind, ...]

    @property
    def label(self) -> str:
        if self.skip:
            return "skip"
        sparse_attn = [k for k in self.attn if k is not AttnKind.DENSE]
        sparse_mlp = [k for k in self.mlp if k is not MLPKind.DENSE]
        a = sparse_attn[0].value if sparse_attn else "dense"
        m = sparse_mlp[0].value if sparse_mlp else "dense"
        return f"attn={a},mlp={m}"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Step kinds for a whole generation; ``steps[t]`` is the plan of step t."""

    steps: tuple[StepPlan, ...]

    def distinct(self) -> tuple[StepPlan, ...]:
        """Distinct plans in order of first use (each is one compilation)."""
        seen: dict[StepPlan, None] = {}
        for p in self.steps:
            seen.setdefault(p, None)
        return tuple(seen)


def attn_is_full_step(config: ChipmunkConfig, t: int) -> bool:
    a = config.attn
    if a.full_step_schedule is not None:
        return t in a.full_step_schedule
    return t < 2 or t % a.full_step_every == 0


def attn_kind(config: ChipmunkConfig, t: int, layer: int) -> AttnKind:
    """Attention kind of (step t, layer) for a computed (not skipped) step."""
    a = config.attn
    if not a.is_enabled or layer < a.first_n_dense_layers:
        return AttnKind.DENSE
    if not attn_is_full_step(config, t):
        return AttnKind.SPARSE
    if t == 0:
        return AttnKind.WARMUP
    if t == 1 or a.recompute_mask:
        return AttnKind.MASK
    return AttnKind.FULL


def step_is_skipped(config: ChipmunkConfig, t: int) -> bool:
    sc = config.step_caching
    return sc.is_enabled and t in sc.skip_step_schedule


def step_kinds(config: ChipmunkConfig, num_steps: int, num_layers: int) -> Schedule:
    """The kind of every (step, layer) for attention and MLP, and which steps are skipped.

    Args:
      config: the Chipmunk config.
      num_steps: denoising steps of the generation.
      num_layers: sparsifiable layers (attention and MLP share the layer index).

    Returns:
      A Schedule whose ``steps[t].attn[l]`` / ``.mlp[l]`` give the kinds; skipped steps carry DENSE
      placeholders and ``skip=True`` (attention and MLP are not called on them).

    Raises:
      ConfigError: a schedule that would run a sparse step without a cache (a skipped or sparse step 0/1).
    """
    if num_steps < 1 or num_layers < 0:
        raise ConfigError(f"need num_steps >= 1 and num_layers >= 0, got {num_steps=}, {num_layers=}")
    if config.step_caching.is_enabled and config.attn.is_enabled and 1 in config.step_caching.skip_step_schedule:
        raise ConfigError("step 1 is the first mask step and cannot be skipped by step caching")

    mlp_has_indices = [False] * num_layers
    plans = []
    for t in range(num_steps):
        if step_is_skipped(config, t):
            plans.append(StepPlan(True, (AttnKind.DENSE,) * num_layers, (MLPKind.DENSE,) * num_layers))
            continue
        attn = tuple(attn_kind(config, t, layer) for layer in range(num_layers))
        mlp = []
        m = config.mlp
        for layer in range(num_layers):
            if not m.is_enabled or layer < m.first_n_dense_layers:
                mlp.append(MLPKind.DENSE)
            elif t % m.full_step_every == 0:
                mlp.append(MLPKind.FULL)
            elif t % m.block_mask_cache != 0 and mlp_has_indices[layer] and t >= MLP_REUSE_FROM_STEP:
                mlp.append(MLPKind.SPARSE_REUSE)
            else:
                mlp.append(MLPKind.SPARSE_RECOMPUTE)
                mlp_has_indices[layer] = True
        plans.append(StepPlan(False, attn, tuple(mlp)))
    return Schedule(tuple(plans))


def kind_runs(kinds) -> list[tuple[int, int]]:
    """Contiguous [a, b) runs of equal entries of ``kinds`` (one per layer): each run is one ``lax.scan``."""
    out, a = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[a]:
            out.append((a, i))
            a = i
    return out
