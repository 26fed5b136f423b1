"""T5 / UMT5 encoder weights (transformers names) -> ``models.text_encoders.t5.T5Encoder``.

Also home of the strict table-driven filler shared by the CLIP and Flux autoencoder converters: a key table maps
every source key to a target parameter path and a named transform; the target is built with ``nnx.eval_shape`` (no
random init) and every unknown key, unfilled parameter and shape mismatch is collected and raised together.

Example::

    from safetensors.numpy import load_file
    from convert_weights.t5 import convert_t5

    encoder = convert_t5(load_file("text_encoder_2/model.safetensors"), param_dtype=jnp.bfloat16)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert_weights.common import ConversionError  # one error type for the CLI to report
from models.text_encoders.t5 import T5Config, T5Encoder

TargetPath = tuple[str | int, ...]
KeyTable = dict[str, tuple[TargetPath, str]]


def _linear_t(a: np.ndarray) -> np.ndarray:
    if a.ndim != 2:
        raise ValueError(f"linear_T expects a 2-D [out, in] weight, got {a.shape=}")
    return a.T


def _conv_oihw_to_hwio(a: np.ndarray) -> np.ndarray:
    if a.ndim != 4:
        raise ValueError(f"conv_OIHW_to_HWIO expects a 4-D weight, got {a.shape=}")
    return a.transpose(2, 3, 1, 0)


def _conv1x1_to_linear(a: np.ndarray) -> np.ndarray:
    if a.ndim != 4 or a.shape[2:] != (1, 1):
        raise ValueError(f"conv1x1_to_linear expects a [out, in, 1, 1] weight, got {a.shape=}")
    return a[:, :, 0, 0].T


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda a: a,
    "linear_T": _linear_t,  # torch Linear [out, in] -> [in, out]
    "conv_OIHW_to_HWIO": _conv_oihw_to_hwio,  # torch Conv2d -> flax NHWC Conv
    "conv1x1_to_linear": _conv1x1_to_linear,  # 1x1 Conv2d used as a linear map (BFL autoencoder attention)
}


def fill_strict(
    abstract_model: nnx.Module,
    weights: Mapping[str, np.ndarray],
    table: Mapping[str, tuple[TargetPath, str]],
    *,
    ignored: Iterable[str] = (),
) -> nnx.Module:
    """Fills an abstract NNX model from a flat checkpoint through an explicit key table.

    Args:
        abstract_model: Model from ``nnx.eval_shape`` (its parameters are shape/dtype placeholders).
        weights: Flat ``name -> array`` checkpoint, e.g. from ``safetensors.numpy.load_file``.
        table: ``source key -> (target parameter path, transform name)``; transform names are keys of TRANSFORMS.
        ignored: Source keys that are known non-parameters (buffers) and are dropped silently.

    Returns:
        The concrete model, every parameter cast to the dtype of its placeholder.

    Raises:
        ConversionError: Listing every unknown source key, table entry whose key is absent from ``weights``, table
            target that is not a model parameter, shape mismatch after the transform, and parameter left unfilled.
    """
    graphdef, abstract_state = nnx.split(abstract_model)
    targets = {path: var for path, var in nnx.to_flat_state(abstract_state)}
    ignored = set(ignored)
    errors: list[str] = []
    filled: dict[TargetPath, object] = {}

    unknown = sorted(k for k in weights if k not in table and k not in ignored)
    errors += [f"unknown source key {k!r} {tuple(weights[k].shape)}" for k in unknown]
    for key, (path, transform) in table.items():
        if transform not in TRANSFORMS:
            errors.append(f"{key!r}: unknown transform {transform!r}")
            continue
        if path not in targets:
            errors.append(f"{key!r}: target {'.'.join(map(str, path))} is not a model parameter")
            continue
        if key not in weights:
            errors.append(f"missing source key {key!r} for {'.'.join(map(str, path))}")
            continue
        if path in filled:
            errors.append(f"{key!r}: target {'.'.join(map(str, path))} is filled twice")
            continue
        try:
            value = TRANSFORMS[transform](np.asarray(weights[key]))
        except ValueError as e:
            errors.append(f"{key!r}: {e}")
            continue
        target = targets[path]
        if tuple(value.shape) != tuple(target.shape):
            errors.append(
                f"shape mismatch {key!r} {tuple(weights[key].shape)} --{transform}--> {tuple(value.shape)}, "
                f"target {'.'.join(map(str, path))} expects {tuple(target.shape)}"
            )
            continue
        filled[path] = target.replace(jnp.asarray(value, dtype=target.dtype))
    unfilled = [p for p in targets if p not in filled]
    errors += [f"model parameter {'.'.join(map(str, p))} was not filled" for p in unfilled if not _reported(p, table)]
    if errors:
        raise ConversionError(f"{len(errors)} problem(s) converting checkpoint:\n  " + "\n  ".join(errors))
    return nnx.merge(graphdef, nnx.from_flat_state(list(filled.items())))


def _reported(path: TargetPath, table: Mapping[str, tuple[TargetPath, str]]) -> bool:
    # A parameter with a table entry already produced a more specific error (missing key, bad shape).
    return any(p == path for p, _ in table.values())


def layer_indices(weights: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` over the keys, e.g. block numbers.

    Args:
        weights: Source key names.
        pattern: Regex with one integer group, matched against whole keys.

    Returns:
        The distinct captured integers, ascending.
    """
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in weights if (m := rx.fullmatch(k))})


# --------------------------------------------------------------------------------------------------------------------
# T5

_EMBED_ALIASES = ("shared.weight", "encoder.embed_tokens.weight")


def t5_key_table(config: T5Config) -> KeyTable:
    """Source key -> (T5Encoder parameter path, transform) for the transformers T5/UMT5 encoder layout."""
    table: KeyTable = {
        "shared.weight": (("embed_tokens", "embedding"), "identity"),
        "encoder.final_layer_norm.weight": (("final_norm", "weight"), "identity"),
    }
    for i in range(config.num_layers):
        src, dst = f"encoder.block.{i}.layer", ("blocks", i)
        for name in "qkvo":
            table[f"{src}.0.SelfAttention.{name}.weight"] = ((*dst, "attn", name, "kernel"), "linear_T")
        if i == 0 or config.per_layer_position_bias:
            table[f"{src}.0.SelfAttention.relative_attention_bias.weight"] = (
                (*dst, "attn", "relative_attention_bias", "embedding"),
                "identity",
            )
        table[f"{src}.0.layer_norm.weight"] = ((*dst, "attn_norm", "weight"), "identity")
        for name in ("wi_0", "wi_1", "wo"):
            table[f"{src}.1.DenseReluDense.{name}.weight"] = ((*dst, "ffn", name, "kernel"), "linear_T")
        table[f"{src}.1.layer_norm.weight"] = ((*dst, "ffn_norm", "weight"), "identity")
    return table


def _canonical_t5(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Folds the tied embedding aliases into ``shared.weight``, refusing two different tables."""
    out = dict(weights)
    present = [k for k in _EMBED_ALIASES if k in out]
    if len(present) == 2:
        if out[present[0]].shape != out[present[1]].shape or not np.array_equal(out[present[0]], out[present[1]]):
            raise ConversionError(f"{_EMBED_ALIASES[0]!r} and {_EMBED_ALIASES[1]!r} differ; expected tied embeddings")
        del out["encoder.embed_tokens.weight"]
    elif present == ["encoder.embed_tokens.weight"]:
        out["shared.weight"] = out.pop("encoder.embed_tokens.weight")
    return out


def t5_config_from_weights(
    weights: Mapping[str, np.ndarray], *, max_distance: int = 128, eps: float = 1e-6
) -> T5Config:
    """Infers a T5Config from tensor shapes.

    ``max_distance`` and ``eps`` leave no trace in the weights and are taken from the arguments (128 and 1e-6 for
    every released T5 v1.1 / UMT5).

    Args:
        weights: Flat transformers-style T5 encoder checkpoint.
        max_distance: Relative attention max distance.
        eps: RMS norm epsilon.

    Returns:
        The inferred config.

    Raises:
        ConversionError: When a tensor needed for inference is absent.
    """
    w = _canonical_t5(weights)
    needed = [
        "shared.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
    ]
    missing = [k for k in needed if k not in w]
    if missing:
        raise ConversionError(f"cannot infer the T5 config, missing {missing} (is this a gated v1.1 T5 encoder?)")
    vocab, d_model = w["shared.weight"].shape
    num_buckets, num_heads = w[needed[1]].shape
    inner = w[needed[2]].shape[0]
    if inner % num_heads:
        raise ConversionError(f"q projection width {inner} is not a multiple of {num_heads} heads")
    layers = layer_indices(w, r"encoder\.block\.(\d+)\..*")
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        num_layers=len(layers),
        num_heads=num_heads,
        d_kv=inner // num_heads,
        d_ff=w[needed[3]].shape[0],
        num_buckets=num_buckets,
        max_distance=max_distance,
        eps=eps,
        per_layer_position_bias="encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in w,
    )


def convert_t5(
    weights: Mapping[str, np.ndarray],
    config: T5Config | None = None,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
) -> T5Encoder:
    """Builds a T5Encoder from a transformers T5EncoderModel / UMT5EncoderModel checkpoint.

    Args:
        weights: Flat ``name -> array``; ``shared.weight`` and/or ``encoder.embed_tokens.weight`` (tied) accepted.
        config: Architecture; inferred from shapes when None.
        dtype: Compute dtype of the model.
        param_dtype: Storage dtype of the parameters.

    Returns:
        The filled encoder.

    Raises:
        ConversionError: On any unknown key, missing parameter or shape mismatch (all listed at once).
    """
    w = _canonical_t5(weights)
    if config is None:
        config = t5_config_from_weights(w)
    abstract = nnx.eval_shape(lambda: T5Encoder(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    return fill_strict(abstract, w, t5_key_table(config))


__all__ = [
    "TRANSFORMS",
    "ConversionError",
    "KeyTable",
    "convert_t5",
    "fill_strict",
    "layer_indices",
    "t5_config_from_weights",
    "t5_key_table",
]
