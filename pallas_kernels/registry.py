"""Registry of primitive implementations: op name -> implementation name -> function.

Optional backends (the Mosaic GPU kernels) register themselves on import; ``load_optional_backends``
imports them once and leaves a note of why one could not load.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

_IMPLS: dict[str, dict[str, Callable]] = {}
_OPTIONAL_MODULES = ("pallas_kernels.mosaic_gpu_backend",)
_load_errors: dict[str, str] = {}
_loaded = False


def register(op: str, implementation: str, fn: Callable) -> None:
    _IMPLS.setdefault(op, {})[implementation] = fn


def load_optional_backends() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _OPTIONAL_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as e:  # the module is absent or its jax lacks Mosaic GPU
            _load_errors[mod] = f"{type(e).__name__}: {e}"


def available(op: str) -> tuple[str, ...]:
    load_optional_backends()
    return tuple(sorted(_IMPLS.get(op, {})))


def get(op: str, implementation: str) -> Callable:
    impls = _IMPLS.get(op, {})
    if implementation not in impls:
        why = "".join(f"\n  {m}: {e}" for m, e in _load_errors.items())
        raise ValueError(
            f"no implementation {implementation!r} of {op!r}; available: {sorted(impls)}"
            + (f"\noptional backends that failed to load:{why}" if why else "")
        )
    return impls[implementation]
