"""Frozen, validated Chipmunk configuration.

The dataclasses mirror the keys of the reference implementation's ``chipmunk-config.yml`` (SPEC §8), so a
reference YAML file loads as it is. Unlike the reference there is no global config and no silent
deep-merge: ``load_config`` starts from the defaults (or a preset), applies the file's keys, and rejects any
key it does not know, naming the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from typing import Any

import yaml

DEFAULT_SKIP_STEPS: frozenset[int] = frozenset(
    {7, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26, 27, 29, 31, 33, 34, 35, 37, 38, 39, 41, 42, 43}
)


class ConfigError(ValueError):
    """A Chipmunk configuration is malformed or out of range."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _as_int_set(value: Any, name: str) -> frozenset[int] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):  # YAML `!!set` loads as {k: None}
        value = value.keys()
    try:
        out = frozenset(int(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} must be a set of non-negative integers, got {value!r}") from e
    _check(all(v >= 0 for v in out), f"{name} must hold non-negative integers, got {sorted(out)}")
    return out


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    """Sparse attention settings (SPEC §1).

    Attributes:
      is_enabled: sparsify attention at all.
      top_keys: fraction of keys selected per query group, in (0, 1].
      random_keys: probability of a static random key (compressed mode, static mask).
      local_voxels: side of the static local voxel window (0 = off; video models).
      local_1d_window: fraction of the video length for the static 1-D window (0 = off).
      first_n_dense_layers: layers below this index always run dense attention.
      full_step_every: a step t is full iff t < 2 or t % full_step_every == 0 (without a schedule).
      full_step_schedule: explicit set of full steps; overrides full_step_every. Must hold 0 and 1.
      recompute_mask: reselect keys at every full step (else only at step 1).
      should_compress_indices: boolean-mask mode with random keys and the static mask (video models).
      counts_multiple_of: key counts are multiples of this (the kernel's KV tile).
      pad_qkv_before_kernel: kept for compatibility with reference files; padding is always internal here.
      mbm: query group size (rows sharing one key selection).
    """

    is_enabled: bool = True
    top_keys: float = 0.05
    random_keys: float = 0.01
    local_voxels: int = 0
    local_1d_window: float = 0.0
    first_n_dense_layers: int = 2
    full_step_every: int = 10
    full_step_schedule: frozenset[int] | None = None
    recompute_mask: bool = True
    should_compress_indices: bool = True
    counts_multiple_of: int = 128
    pad_qkv_before_kernel: bool = True
    mbm: int = 192

    def __post_init__(self):
        object.__setattr__(self, "full_step_schedule", _as_int_set(self.full_step_schedule, "attn.full_step_schedule"))
        _check(0.0 < self.top_keys <= 1.0, f"attn.top_keys must be in (0, 1], got {self.top_keys}")
        _check(0.0 <= self.random_keys <= 1.0, f"attn.random_keys must be in [0, 1], got {self.random_keys}")
        _check(self.local_voxels >= 0, f"attn.local_voxels must be >= 0, got {self.local_voxels}")
        _check(
            0.0 <= self.local_1d_window <= 1.0,
            f"attn.local_1d_window must be in [0, 1], got {self.local_1d_window}",
        )
        _check(
            self.first_n_dense_layers >= 0,
            f"attn.first_n_dense_layers must be >= 0, got {self.first_n_dense_layers}",
        )
        _check(self.full_step_every > 0, f"attn.full_step_every must be > 0, got {self.full_step_every}")
        if self.full_step_schedule is not None:
            _check(
                {0, 1} <= self.full_step_schedule,
                "attn.full_step_schedule must contain steps 0 and 1 (warm-up and first mask step), "
                f"got {sorted(self.full_step_schedule)}",
            )
        _check(self.counts_multiple_of > 0, f"attn.counts_multiple_of must be > 0, got {self.counts_multiple_of}")
        _check(self.mbm > 0, f"attn.mbm must be > 0, got {self.mbm}")


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """Sparse MLP settings (SPEC §2).

    Attributes:
      is_enabled: sparsify the MLP.
      is_fp8: the reference's fp8 path; not supported (it is buggy there) and rejected when true.
      top_keys: fraction of neurons kept by the quantile rule, in (0, 1]; required when enabled.
      random_keys: probability of keeping each other neuron.
      full_step_every: a step t is a full MLP step iff t % full_step_every == 0.
      block_mask_cache: on steps >= 10, recompute neuron indices only when t % block_mask_cache == 0.
      first_n_dense_layers: layers below this index always run the dense MLP.
      counts_multiple_of: neuron counts are rounded up to a multiple of this.
      bm: token block size of the block-mean proxy (one neuron selection per block).
      mbm: kept for compatibility with reference files (kernel row tile).
    """

    is_enabled: bool = False
    is_fp8: bool = False
    top_keys: float | None = None
    random_keys: float = 0.05
    full_step_every: int = 10
    block_mask_cache: int = 2
    first_n_dense_layers: int = 2
    counts_multiple_of: int = 256
    bm: int = 128
    mbm: int = 128

    def __post_init__(self):
        _check(not self.is_fp8, "mlp.is_fp8 is not supported (the reference fp8 path is defective)")
        if self.is_enabled:
            _check(self.top_keys is not None, "mlp.top_keys must be set when mlp.is_enabled is true")
        if self.top_keys is not None:
            _check(0.0 < self.top_keys <= 1.0, f"mlp.top_keys must be in (0, 1], got {self.top_keys}")
        _check(0.0 <= self.random_keys <= 1.0, f"mlp.random_keys must be in [0, 1], got {self.random_keys}")
        _check(self.full_step_every > 0, f"mlp.full_step_every must be > 0, got {self.full_step_every}")
        _check(self.block_mask_cache > 0, f"mlp.block_mask_cache must be > 0, got {self.block_mask_cache}")
        _check(
            self.first_n_dense_layers >= 0,
            f"mlp.first_n_dense_layers must be >= 0, got {self.first_n_dense_layers}",
        )
        _check(self.counts_multiple_of > 0, f"mlp.counts_multiple_of must be > 0, got {self.counts_multiple_of}")
        _check(self.bm > 0 and self.mbm > 0, f"mlp.bm and mlp.mbm must be > 0, got {self.bm}, {self.mbm}")


@dataclasses.dataclass(frozen=True)
class PatchifyConfig:
    """Token reordering of image latents (SPEC §3.1): chunks of chunk_size_1, sub-chunks of chunk_size_2."""

    is_enabled: bool = True
    chunk_size_1: int = 8
    chunk_size_2: int = 4

    def __post_init__(self):
        _check(
            self.chunk_size_1 > 0 and self.chunk_size_2 > 0,
            f"patchify chunk sizes must be > 0, got {self.chunk_size_1}, {self.chunk_size_2}",
        )
        _check(
            self.chunk_size_1 % self.chunk_size_2 == 0,
            f"patchify.chunk_size_2 ({self.chunk_size_2}) must divide chunk_size_1 ({self.chunk_size_1})",
        )


@dataclasses.dataclass(frozen=True)
class StepCachingConfig:
    """Step caching (SPEC §4): on skipped steps only the final layer runs on cached hidden states."""

    is_enabled: bool = False
    skip_step_schedule: frozenset[int] = DEFAULT_SKIP_STEPS

    def __post_init__(self):
        object.__setattr__(
            self,
            "skip_step_schedule",
            _as_int_set(self.skip_step_schedule, "step_caching.skip_step_schedule") or frozenset(),
        )
        if self.is_enabled:
            _check(
                0 not in self.skip_step_schedule,
                "step_caching.skip_step_schedule must not contain step 0 (nothing is cached yet)",
            )


@dataclasses.dataclass(frozen=True)
class OffloadingConfig:
    """Which caches live in host memory. Field names are the reference keys with '.' replaced by '_'."""

    global_disable_offloading: bool = True
    mlp_out_cache: bool = False
    mlp_indices: bool = False
    mlp_counts: bool = False
    mlp_sparse_act_T: bool = False
    mlp_blockmean_mid_cache: bool = False
    attn_out_cache: bool = False
    attn_indices: bool = False
    attn_counts: bool = False
    attn_lse_constants: bool = False
    text_encoders: bool = False


@dataclasses.dataclass(frozen=True)
class UnsupportedFeatureConfig:
    """Sections of some reference files for other methods (tea_cache, token_cache); only 'off' is accepted."""

    is_enabled: bool = False
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        _check(not self.is_enabled, "tea_cache / token_cache are other methods and are not supported here")


@dataclasses.dataclass(frozen=True)
class ChipmunkConfig:
    """The whole Chipmunk configuration (SPEC §8)."""

    num_model_invocations_per_inference_step: int = 1
    steps: int = 50
    world_size: int = 1
    model_name: str | None = None
    attn: AttnConfig = dataclasses.field(default_factory=AttnConfig)
    mlp: MLPConfig = dataclasses.field(default_factory=MLPConfig)
    patchify: PatchifyConfig = dataclasses.field(default_factory=PatchifyConfig)
    step_caching: StepCachingConfig = dataclasses.field(default_factory=StepCachingConfig)
    offloading: OffloadingConfig = dataclasses.field(default_factory=OffloadingConfig)

    def __post_init__(self):
        _check(
            self.num_model_invocations_per_inference_step >= 1,
            "num_model_invocations_per_inference_step must be >= 1, "
            f"got {self.num_model_invocations_per_inference_step}",
        )
        _check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(self.world_size >= 1, f"world_size must be >= 1, got {self.world_size}")

    def replace(self, **kwargs) -> ChipmunkConfig:
        return dataclasses.replace(self, **kwargs)


_SECTIONS: dict[str, type] = {
    "attn": AttnConfig,
    "mlp": MLPConfig,
    "patchify": PatchifyConfig,
    "step_caching": StepCachingConfig,
    "offloading": OffloadingConfig,
}
_IGNORED_SECTIONS = ("tea_cache", "token_cache")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return ConfigError(f"unknown key {key!r} in {where}{hint} (valid keys: {', '.join(sorted(valid))})")


def _offloading_key(field: str) -> str:
    """The reference's spelling of an offloading field: 'attn.out_cache', but 'text_encoders' as it is."""
    for prefix in ("attn_", "mlp_"):
        if field.startswith(prefix):
            return prefix[:-1] + "." + field[len(prefix) :]
    return field


def _section(cls: type, base: Any, values: Any, where: str) -> Any:
    if values is None:
        return base
    if not isinstance(values, Mapping):
        raise ConfigError(f"section {where!r} must be a mapping, got {type(values).__name__}")
    valid = _field_names(cls)
    updates = {}
    for key, val in values.items():
        name = str(key).replace(".", "_") if cls is OffloadingConfig else str(key)
        if name not in valid:
            shown = valid if cls is not OffloadingConfig else [_offloading_key(v) for v in valid]
            raise _unknown(str(key), shown, where)
        updates[name] = val
    try:
        return dataclasses.replace(base, **updates)
    except TypeError as e:  # a value of the wrong type, met by a range check in __post_init__
        raise ConfigError(f"in section {where!r}: {e}") from e


def config_from_dict(data: Mapping[str, Any] | None, base: ChipmunkConfig | None = None) -> ChipmunkConfig:
    """Builds a config from a nested mapping with the reference's YAML keys, on top of ``base``."""
    base = base or ChipmunkConfig()
    data = dict(data or {})
    top_valid = [f for f in _field_names(ChipmunkConfig) if f not in _SECTIONS]
    updates: dict[str, Any] = {}
    for key, val in data.items():
        key = str(key)
        if key in _SECTIONS:
            updates[key] = _section(_SECTIONS[key], getattr(base, key), val, key)
        elif key in _IGNORED_SECTIONS:
            if val is not None and not isinstance(val, Mapping):
                raise ConfigError(f"section {key!r} must be a mapping, got {type(val).__name__}")
            val = dict(val or {})
            UnsupportedFeatureConfig(is_enabled=bool(val.pop("is_enabled", False)))
        elif key in top_valid:
            updates[key] = val
        else:
            raise _unknown(key, top_valid + list(_SECTIONS) + list(_IGNORED_SECTIONS), "the top level")
    try:
        return dataclasses.replace(base, **updates)
    except TypeError as e:  # wrong value types that dataclasses cannot catch by name
        raise ConfigError(str(e)) from e


def load_config(path: str | os.PathLike, base: ChipmunkConfig | str | None = None) -> ChipmunkConfig:
    """Loads a reference-format ``chipmunk-config.yml``.

    Args:
      path: YAML file. ``!!set`` values (skip and full-step schedules) are accepted.
      base: defaults to start from: a ChipmunkConfig, a preset name ('flux', 'hunyuan', 'wan', 'mochi'), or
        None for the reference's defaults.

    Returns:
      The validated, frozen config.

    Raises:
      ConfigError: unknown key (named, with the nearest valid key) or out-of-range value.
      FileNotFoundError: the file does not exist.
    """
    with open(path) as f:
        data = yaml.safe_load(f)
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping")
    if isinstance(base, str):
        base = preset(base)
    return config_from_dict(data, base)


def preset(name: str) -> ChipmunkConfig:
    """The per-model configurations of SPEC §6 ('flux', 'hunyuan', 'wan', 'mochi')."""
    name = name.lower()
    if name == "flux":
        return ChipmunkConfig(
            model_name="flux",
            attn=AttnConfig(
                top_keys=0.165,
                full_step_every=10,
                first_n_dense_layers=2,
                recompute_mask=False,
                should_compress_indices=False,
                pad_qkv_before_kernel=False,
                counts_multiple_of=112,
            ),
            mlp=MLPConfig(
                is_enabled=True,
                top_keys=0.3,
                random_keys=0.05,
                full_step_every=10,
                block_mask_cache=2,
                first_n_dense_layers=2,
            ),
            patchify=PatchifyConfig(is_enabled=True, chunk_size_1=8, chunk_size_2=4),
        )
    if name == "hunyuan":
        return ChipmunkConfig(
            model_name="hunyuan",
            attn=AttnConfig(
                top_keys=0.05,
                random_keys=0.01,
                full_step_schedule=frozenset({0, 1, 10, 40}),
                recompute_mask=True,
                should_compress_indices=True,
            ),
            mlp=MLPConfig(is_enabled=False),
            step_caching=StepCachingConfig(is_enabled=True),
        )
    if name == "wan":
        return ChipmunkConfig(
            model_name="wan",
            num_model_invocations_per_inference_step=2,
            attn=AttnConfig(
                top_keys=0.1,
                random_keys=0.01,
                local_voxels=5,
                full_step_schedule=frozenset({0, 1, 10, 40}),
                recompute_mask=True,
                should_compress_indices=True,
            ),
            mlp=MLPConfig(is_enabled=False),
            step_caching=StepCachingConfig(is_enabled=True),
        )
    if name == "mochi":
        return ChipmunkConfig(
            model_name="mochi",
            num_model_invocations_per_inference_step=2,
            steps=64,
            attn=AttnConfig(
                top_keys=0.15,
                local_voxels=1,
                full_step_schedule=frozenset({0, 1, 15, 30, 45, 60}),
                recompute_mask=True,
                should_compress_indices=True,
            ),
            mlp=MLPConfig(is_enabled=False),
        )
    raise ConfigError(f"unknown preset {name!r}; choose one of 'flux', 'hunyuan', 'wan', 'mochi'")
