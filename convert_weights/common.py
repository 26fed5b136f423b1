"""Shared machinery of the weight converters: reading safetensors into numpy, explicit key tables with named
transforms, a strict mapping engine, and atomic orbax checkpoint + manifest writing.

A converter is a table of ``Rule``s. Each rule names its source keys (patterns with ``{i}`` for a layer index),
its target parameter paths, and a named transform from ``TRANSFORMS``-style dictionaries. ``apply_rules``
refuses to produce a checkpoint when any source key is left unused, any target parameter (or layer of a stacked
parameter) is left unassigned, or any transformed tensor has the wrong shape; the error lists all of them.

The steps every converter's ``convert`` / ``run`` share live here too: sources (``open_safetensors``,
``ArraySource``, ``component_dir``), targets from ``nnx.eval_shape`` (``module_target_shapes``), the dtype names
(``numpy_dtype``), checkpoint + manifest writing (``write_converted``), filling a model (``module_from_params``)
and the CLI (``add_common_arguments``, ``convert_from_args``, ``size_text``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open

MANIFEST = "manifest.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1

DTYPES = {"bf16": ml_dtypes.bfloat16, "bfloat16": ml_dtypes.bfloat16, "fp16": np.float16, "float16": np.float16}
DTYPES.update({"fp32": np.float32, "float32": np.float32})

# safetensors dtype tags that numpy cannot represent natively; read from the raw buffer instead.
_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


class ConversionError(ValueError):
    """A conversion that cannot be done faithfully; the message lists every offending key."""


# ---------------------------------------------------------------------------------------------------------
# Reading sources.


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsSource:
    """Lazy read access to the tensors of one or more safetensors files, as numpy arrays."""

    def __init__(self, files: Sequence[Path], strip_prefix: str = ""):
        self.files = [Path(f) for f in files]
        self._where: dict[str, tuple[Path, str]] = {}
        self._headers: dict[Path, tuple[dict, int]] = {}
        for f in self.files:
            header, base = self._headers[f] = _header(f)
            for raw in header:
                key = raw.removeprefix(strip_prefix)
                if key in self._where:
                    raise ConversionError(f"tensor {key!r} appears in both {self._where[key][0]} and {f}")
                self._where[key] = (f, raw)

    def keys(self) -> list[str]:
        return sorted(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        f, raw = self._where[key]
        return tuple(self._headers[f][0][raw]["shape"])

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> np.ndarray:
        """The tensor as a numpy array (bf16 / fp8 through ml_dtypes, read from the file's raw bytes)."""
        f, raw = self._where[key]
        header, base = self._headers[f]
        info = header[raw]
        if info["dtype"] in _RAW_DTYPES:
            start, end = info["data_offsets"]
            dt = np.dtype(_RAW_DTYPES[info["dtype"]])
            data = np.fromfile(f, dtype=np.uint8, count=end - start, offset=base + start)
            return data.view(dt).reshape(info["shape"])
        with safe_open(str(f), framework="np") as sf:
            return sf.get_tensor(raw)


class ArraySource:
    """A flat ``name -> numpy array`` dict seen through the source interface of ``apply_rules`` (``keys``,
    ``shape``, ``in``, ``get``), so that library callers can convert in-memory state dicts like files."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._t = dict(tensors)

    def keys(self) -> list[str]:
        return sorted(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def __contains__(self, key: str) -> bool:
        return key in self._t

    def get(self, key: str) -> np.ndarray:
        return np.asarray(self._t[key])


def as_source(tensors):
    """A ``name -> array`` mapping wrapped as an ``ArraySource``; a source (anything else) is returned as is."""
    return ArraySource(tensors) if isinstance(tensors, Mapping) else tensors


def require_shape(source, key: str, what: str = "the architecture") -> tuple[int, ...]:
    """The shape of ``key``, or a ConversionError saying that ``what`` cannot be inferred without it."""
    if key not in source:
        raise ConversionError(f"cannot infer {what}: {key!r} is missing")
    return tuple(source.shape(key))


def open_safetensors(files: Sequence[Path], strip_common: Sequence[str] = ()) -> SafetensorsSource:
    """A source over ``files``; the first of ``strip_common`` that every key starts with (a ComfyUI
    ``model.diffusion_model.`` wrapper, say) is removed from the names."""
    source = SafetensorsSource(files)
    keys = source.keys()
    for prefix in strip_common:
        if keys and all(k.startswith(prefix) for k in keys):
            return SafetensorsSource(files, strip_prefix=prefix)
    return source


def component_dir(src: str | os.PathLike, component: str) -> Path:
    """``src``, or its ``component/`` subfolder when ``src`` is a pipeline directory (no safetensors of its own
    and a ``component/`` folder, e.g. ``text_encoder``)."""
    src = Path(src)
    if src.is_dir() and (src / component).is_dir() and not list(src.glob("*.safetensors")):
        return src / component
    return src


def read_json(path: Path) -> dict:
    """The contents of a JSON file, or {} when there is none."""
    return json.loads(path.read_text()) if path.exists() else {}


def read_diffusers_config(src_dir: Path | None) -> dict:
    """The diffusers ``config.json`` next to the weights (or in ``transformer/``), or {} when there is none."""
    if src_dir is None:
        return {}
    for f in (src_dir / "config.json", src_dir / "transformer" / "config.json"):
        if f.exists():
            return read_json(f)
    return {}


def find_source_files(src: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: one file, a directory with an ``*.index.json``, or a directory
    (optionally with a ``transformer/`` subfolder, as a diffusers pipeline) holding safetensors files."""
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"source {src} does not exist")
    if src.is_file():
        if src.suffix != ".safetensors":
            raise ConversionError(f"{src}: only .safetensors checkpoints are supported")
        return [src]
    if (src / "transformer").is_dir() and not list(src.glob("*.safetensors")):
        src = src / "transformer"
    indexes = sorted(src.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ConversionError(f"{src}: several index files {[i.name for i in indexes]}; pass one shard set")
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = sorted({src / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ConversionError(f"{indexes[0]} names shards that are missing: {missing}")
        return files
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{src}: no .safetensors files found")
    return files


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Key tables.

Transform = Callable[[Sequence[np.ndarray], Any], Sequence[np.ndarray]]


def conv3d_kernel(w: np.ndarray) -> np.ndarray:
    """Torch Conv3d weight [O, I, t, h, w] -> NNX kernel [t, h, w, I, O]."""
    if w.ndim != 5:
        raise ValueError(f"conv3d expects a [O, I, t, h, w] weight, got {w.shape}")
    return w.transpose(2, 3, 4, 1, 0)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Source keys -> target parameter paths through a named transform.

    Attributes:
      sources: source key patterns; ``{i}`` stands for a layer index.
      targets: target parameter paths ('double.img_qkv_w'); for layered rules the target has a leading
        layer axis and layer i is written.
      transform: a name in the converter's transform table.
    """

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    transform: str = "identity"

    @property
    def layered(self) -> bool:
        return "{i}" in self.sources[0]


def rule(sources: str | tuple[str, ...], targets: str | tuple[str, ...], transform: str = "identity") -> Rule:
    """A Rule from one or several source patterns and target paths."""
    as_tuple = lambda x: (x,) if isinstance(x, str) else tuple(x)
    return Rule(as_tuple(sources), as_tuple(targets), transform)


def layer_indices(keys: Sequence[str], pattern: str) -> list[int]:
    """Sorted layer indices i for which ``pattern.format(i=i)`` is a key."""
    rx = re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(\d+)") + "$")
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def apply_rules(
    source: SafetensorsSource,
    rules: Sequence[Rule],
    transforms: Mapping[str, Transform],
    targets: Mapping[str, tuple[tuple[int, ...], bool]],
    ctx: Any,
    dtype,
) -> dict[str, np.ndarray]:
    """Maps every source tensor onto the target parameters, strictly.

    Args:
      source: the checkpoint.
      rules: the key table.
      transforms: transform name -> function(source arrays, ctx) -> target arrays.
      targets: target path -> (shape, layered); layered targets have a leading layer axis.
      ctx: passed to the transforms (the model config).
      dtype: numpy dtype of the output arrays.

    Returns:
      target path -> array in ``dtype``.

    Raises:
      ConversionError: listing unknown source keys, unassigned targets (or layers) and shape mismatches.
    """
    keys = source.keys()
    used: set[str] = set()
    out: dict[str, np.ndarray] = {}
    assigned: dict[str, set[int]] = {}
    problems: list[str] = []
    for r in rules:
        if any(t not in targets for t in r.targets):
            continue  # a part this architecture does not have (its source keys, if any, stay unknown)
        if r.layered:
            expected = set(range(targets[r.targets[0]][0][0]))
            layers = sorted(expected.union(*(layer_indices(keys, s) for s in r.sources)))
        else:
            layers = [None]
        for i in layers:
            names = [s.format(i=i) for s in r.sources]
            absent = [n for n in names if n not in source]
            if absent:
                problems.append(f"missing source key(s) {absent}")
                continue
            used.update(names)
            try:
                arrays = transforms[r.transform]([source.get(n) for n in names], ctx)
            except (ValueError, IndexError) as e:
                problems.append(f"{names}: transform {r.transform!r} failed: {e}")
                continue
            for t, a in zip(r.targets, arrays, strict=True):
                shape, layered = targets[t]
                want = shape[1:] if layered else shape
                if tuple(a.shape) != tuple(want):
                    src_shapes = [tuple(source.shape(n)) for n in names]
                    problems.append(
                        f"shape mismatch: {names} {src_shapes} -> {t}{'' if i is None else f'[{i}]'} "
                        f"{tuple(a.shape)}, expected {tuple(want)}"
                    )
                    continue
                if layered:
                    if i is None or i >= shape[0]:
                        problems.append(f"{names}: layer {i} out of range for {t} with {shape[0]} layers")
                        continue
                    if t not in out:
                        out[t] = np.zeros(shape, dtype)
                    out[t][i] = a.astype(dtype)
                    assigned.setdefault(t, set()).add(i)
                else:
                    out[t] = np.asarray(a).astype(dtype)
                    assigned.setdefault(t, set()).add(-1)
    unknown = sorted(set(keys) - used)
    if unknown:
        problems.append(f"unknown source keys ({len(unknown)}): {unknown}")
    for t, (shape, layered) in sorted(targets.items()):
        if t not in assigned:
            problems.append(f"missing target parameter {t} {tuple(shape)}: no source key maps to it")
        elif layered and len(assigned[t]) != shape[0]:
            problems.append(f"target {t}: layers {sorted(set(range(shape[0])) - assigned[t])} not assigned")
    if problems:
        raise ConversionError("conversion failed:\n  " + "\n  ".join(problems))
    return out


# ---------------------------------------------------------------------------------------------------------
# Writing and reading converted checkpoints.


def _nest(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, path + "."))
        else:
            out[path] = v
    return out


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a ``--dtype`` name ('bf16', 'fp32', ...); ConversionError listing the choices."""
    if name not in DTYPES:
        raise ConversionError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return np.dtype(DTYPES[name])


@dataclasses.dataclass(frozen=True)
class DictConfig:
    """Gives a plain config dataclass the ``to_dict`` that ``make_manifest`` expects (tuples become lists)."""

    cfg: Any

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self.cfg)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def module_target_shapes(
    module_cls: Callable[..., Any], cfg: Any, layered: tuple[str, ...] = ()
) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Flat parameter path -> (shape, layered) of ``module_cls(cfg, rngs=...)``, built with ``nnx.eval_shape``
    (nothing is allocated): the ``targets`` of ``apply_rules``. Paths starting with one of ``layered`` carry a
    leading layer axis."""
    from flax import nnx

    abstract = nnx.eval_shape(lambda: module_cls(cfg, rngs=nnx.Rngs(0)))
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        name = ".".join(str(p) for p in path)
        out[name] = (tuple(var.get_value().shape), name.startswith(layered))
    return out


def module_param_count(module_cls: Callable[..., Any], cfg: Any) -> int:
    """Parameters of ``module_cls(cfg, rngs=...)`` (through ``nnx.eval_shape``; nothing is allocated)."""
    return sum(math.prod(shape) for shape, _ in module_target_shapes(module_cls, cfg).values())


def module_params(module, dtype) -> dict[str, np.ndarray]:
    """Flat ``"a.b.c"`` path -> numpy array in ``dtype`` of every parameter of an NNX module."""
    from flax import nnx

    return {
        ".".join(str(p) for p in path): np.asarray(var.get_value()).astype(dtype)
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))
    }


def make_manifest(
    *, model: str, variant: str, source_format: str, config: Any, dtype: np.dtype, params, files, hash_sources: bool
) -> dict[str, Any]:
    """The manifest written next to a converted checkpoint (``config`` has a ``to_dict()``)."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model,
        "variant": variant,
        "source_format": source_format,
        "config": config.to_dict(),
        "dtype": np.dtype(dtype).name,
        "num_params": int(sum(a.size for a in params.values())),
        "sources": [{"file": f.name, "sha256": file_sha256(f) if hash_sources else None} for f in files],
    }


def replace_dir(tmp: Path, dst: Path) -> None:
    """Moves the finished directory ``tmp`` to ``dst`` by renames, replacing an existing ``dst`` whole."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.rename(dst, old / "ckpt")
        os.rename(tmp, dst)
        shutil.rmtree(old)
    else:
        os.rename(tmp, dst)


def fill_module(abstract, arrays: Mapping[str, np.ndarray], *, where: str, dtype=None):
    """Fills a module built with ``nnx.eval_shape`` from flat ``"a.b.c"`` arrays (``read_checkpoint``), strictly.

    Args:
      abstract: the abstract module.
      arrays: stored arrays by dotted parameter path.
      where: named in the error (the checkpoint path).
      dtype: cast every parameter to this dtype; None keeps each parameter's own dtype.

    Raises:
      ConversionError (a ValueError): listing every missing, mis-shaped and unexpected array.
    """
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(abstract)
    flat, problems, seen = [], [], set()
    for p, var in nnx.to_flat_state(state):
        name = ".".join(str(x) for x in p)
        seen.add(name)
        if name not in arrays:
            problems.append(f"missing {name}")
            continue
        a = arrays[name]
        if tuple(a.shape) != tuple(var.get_value().shape):
            problems.append(f"{name}: stored {tuple(a.shape)}, model {tuple(var.get_value().shape)}")
            continue
        flat.append((p, var.replace(jnp.asarray(a, dtype if dtype is not None else var.get_value().dtype))))
    extra = sorted(set(arrays) - seen)
    if extra:
        problems.append(f"unexpected stored arrays {extra}")
    if problems:
        raise ConversionError(f"{where}: checkpoint does not match the model:\n  " + "\n  ".join(problems))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def module_from_params(
    make: Callable[[Any, Any], Any], params: Mapping[str, np.ndarray], *, dtype=None, where: str, cast: bool = False
):
    """An NNX module holding ``params`` (flat ``"a.b.c"`` path -> array), built without random initialisation.

    Args:
      make: ``make(dt, rngs)`` constructs the module for the dtype ``dt``; it runs under ``nnx.eval_shape``.
      params: the arrays, covering the module exactly (``fill_module`` checks it).
      dtype: the dtype handed to ``make``; None: that of the first array.
      where: named in the error.
      cast: cast every parameter to ``dt`` (else each keeps the dtype the module gives it).

    Raises:
      ConversionError (a ValueError): listing every missing, mis-shaped and unexpected array.
    """
    import jax.numpy as jnp
    from flax import nnx

    dt = jnp.dtype(dtype if dtype is not None else next(iter(params.values())).dtype)
    abstract = nnx.eval_shape(lambda: make(dt, nnx.Rngs(0)))
    return fill_module(abstract, params, where=where, dtype=dt if cast else None)


def expect_manifest(path: str | os.PathLike, model: str, what: str) -> dict:
    """The manifest of a converted checkpoint that must hold ``model``; ConversionError naming ``what`` (the
    expected content, e.g. 'a Wan transformer') when it holds another model."""
    manifest = read_manifest(path)
    if manifest.get("model") != model:
        raise ConversionError(f"{path} holds a {manifest.get('model')!r} checkpoint, not {what}")
    return manifest


def write_checkpoint(dst: str | os.PathLike, params: Mapping[str, np.ndarray], manifest: Mapping[str, Any]) -> Path:
    """Writes ``params`` (flat path -> array) as an orbax checkpoint plus ``manifest.json``, atomically.

    Everything is written into a temporary directory next to ``dst`` and renamed into place at the end; an
    existing ``dst`` is replaced only then.
    """
    import orbax.checkpoint as ocp

    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        tree = _nest({k: np.asarray(v) for k, v in params.items()})  # numpy: no second copy on a device
        ckpt = ocp.PyTreeCheckpointer()
        ckpt.save(tmp / PARAMS_DIR, tree)
        (tmp / MANIFEST).write_text(json.dumps(dict(manifest), indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def write_converted(
    dst: str | os.PathLike,
    params: Mapping[str, np.ndarray],
    *,
    model: str,
    variant: str,
    source_format: str,
    config: Any,
    dtype: np.dtype,
    files,
    hash_sources: bool,
    **extra: Any,
) -> dict[str, Any]:
    """Writes a converted checkpoint (``write_checkpoint``) with its manifest (``make_manifest`` plus the
    ``extra`` entries); returns the manifest."""
    manifest = make_manifest(
        model=model,
        variant=variant,
        source_format=source_format,
        config=config,
        dtype=dtype,
        params=params,
        files=files,
        hash_sources=hash_sources,
    )
    manifest.update(extra)
    write_checkpoint(dst, params, manifest)
    return manifest


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a converted checkpoint directory (raises FileNotFoundError with a hint)."""
    path = Path(path)
    m = path / MANIFEST
    if not m.exists():
        raise FileNotFoundError(
            f"{path} is not a converted checkpoint (no {MANIFEST}); convert one with `python -m convert_weights`"
        )
    return json.loads(m.read_text())


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Flat path -> array of a checkpoint written by ``write_checkpoint``."""
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(Path(path).absolute() / PARAMS_DIR)
    return _flatten(tree)


def add_common_arguments(parser, *, src_help: str, default_dtype: str = "bf16") -> None:
    """Adds the options every converter shares: --src, --dst, --dtype and --no-hash."""
    parser.add_argument("--src", required=True, help=src_help)
    parser.add_argument("--dst", required=True, help="output directory (replaced atomically)")
    parser.add_argument(
        "--dtype", default=default_dtype, choices=sorted(DTYPES), help=f"parameter dtype ({default_dtype})"
    )
    parser.add_argument("--no-hash", action="store_true", help="skip the sha256 of the source files")


def convert_from_args(convert: Callable[..., dict], args, **options: Any) -> dict:
    """Runs a converter's ``convert(src, dst, dtype=, hash_sources=, **options)`` on the options of
    ``add_common_arguments``; returns its manifest."""
    return convert(args.src, args.dst, dtype=args.dtype, hash_sources=not args.no_hash, **options)


def size_text(manifest: Mapping[str, Any], unit: str = "B") -> str:
    """'1.300 B params, bfloat16' (unit 'B') or '126.9 M params, float32' (unit 'M') for a CLI summary."""
    if unit == "B":
        return f"{manifest['num_params'] / 1e9:.3f} B params, {manifest['dtype']}"
    if unit == "M":
        return f"{manifest['num_params'] / 1e6:.1f} M params, {manifest['dtype']}"
    raise ValueError(f"unit must be 'B' or 'M', got {unit!r}")
