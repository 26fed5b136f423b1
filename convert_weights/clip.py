"""CLIP text encoder weights (transformers names) -> ``models.text_encoders.clip.CLIPTextEncoder``.

Accepts checkpoint files as saved by transformers 4.x / shipped with Flux (``text_model.`` prefix, possibly with the
``position_ids`` buffer) and state dicts of transformers 5 (no prefix). A ``CLIPTextModelWithProjection``
checkpoint is rejected (its ``text_projection`` is not part of the text encoder).

Example::

    from safetensors.numpy import load_file
    from convert_weights.clip import convert_clip

    clip = convert_clip(load_file("text_encoder/model.safetensors"))
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert_weights.t5 import ConversionError, KeyTable, fill_strict, layer_indices
from models.text_encoders.clip import CLIPTextConfig, CLIPTextEncoder

_PREFIX = "text_model."
_BUFFERS = ("embeddings.position_ids",)


def clip_key_table(config: CLIPTextConfig) -> KeyTable:
    """Source key (without the ``text_model.`` prefix) -> (CLIPTextEncoder parameter path, transform)."""
    table: KeyTable = {
        "embeddings.token_embedding.weight": (("token_embedding", "embedding"), "identity"),
        "embeddings.position_embedding.weight": (("position_embedding",), "identity"),
        "final_layer_norm.weight": (("final_layer_norm", "scale"), "identity"),
        "final_layer_norm.bias": (("final_layer_norm", "bias"), "identity"),
    }
    for i in range(config.num_layers):
        src, dst = f"encoder.layers.{i}", ("layers", i)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            table[f"{src}.self_attn.{name}.weight"] = ((*dst, "self_attn", name, "kernel"), "linear_T")
            table[f"{src}.self_attn.{name}.bias"] = ((*dst, "self_attn", name, "bias"), "identity")
        for name in ("layer_norm1", "layer_norm2"):
            table[f"{src}.{name}.weight"] = ((*dst, name, "scale"), "identity")
            table[f"{src}.{name}.bias"] = ((*dst, name, "bias"), "identity")
        for name in ("fc1", "fc2"):
            table[f"{src}.mlp.{name}.weight"] = ((*dst, name, "kernel"), "linear_T")
            table[f"{src}.mlp.{name}.bias"] = ((*dst, name, "bias"), "identity")
    return table


def _strip_prefix(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    prefixed = [k.startswith(_PREFIX) for k in weights]
    if any(prefixed) and not all(prefixed):
        odd = sorted(k for k in weights if not k.startswith(_PREFIX))
        raise ConversionError(f"mixed key layout: these keys lack the {_PREFIX!r} prefix the others have: {odd}")
    return {k.removeprefix(_PREFIX): v for k, v in weights.items()}


def clip_config_from_weights(
    weights: Mapping[str, np.ndarray], *, head_dim: int = 64, eos_token_id: int = 2, activation: str = "quick_gelu"
) -> CLIPTextConfig:
    """Infers a CLIPTextConfig from tensor shapes.

    The head count is not recorded in the weights; it is ``width // head_dim`` (64 for every OpenAI / OpenCLIP text
    tower). ``eos_token_id`` and ``activation`` are likewise taken from the arguments.

    Args:
        weights: Flat CLIP text checkpoint, with or without the ``text_model.`` prefix.
        head_dim: Width of one attention head.
        eos_token_id: Pooling token id (2 = legacy argmax pooling, as in the Flux CLIP-L config).
        activation: MLP activation name.

    Returns:
        The inferred config.
    """
    w = _strip_prefix(weights)
    needed = [
        "embeddings.token_embedding.weight",
        "embeddings.position_embedding.weight",
        "encoder.layers.0.mlp.fc1.weight",
    ]
    missing = [k for k in needed if k not in w]
    if missing:
        raise ConversionError(f"cannot infer the CLIP text config, missing {missing}")
    vocab, width = w[needed[0]].shape
    if width % head_dim:
        raise ConversionError(f"width {width} is not a multiple of head_dim={head_dim}")
    return CLIPTextConfig(
        vocab_size=vocab,
        width=width,
        num_layers=len(layer_indices(w, r"encoder\.layers\.(\d+)\..*")),
        num_heads=width // head_dim,
        mlp_dim=w[needed[2]].shape[0],
        max_positions=w[needed[1]].shape[0],
        eos_token_id=eos_token_id,
        activation=activation,
    )


def convert_clip(
    weights: Mapping[str, np.ndarray],
    config: CLIPTextConfig | None = None,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
) -> CLIPTextEncoder:
    """Builds a CLIPTextEncoder from a transformers CLIPTextModel checkpoint.

    Args:
        weights: Flat ``name -> array``.
        config: Architecture; inferred from shapes (CLIP-L defaults for the rest) when None.
        dtype: Compute dtype.
        param_dtype: Storage dtype of the parameters.

    Returns:
        The filled encoder.

    Raises:
        ConversionError: On any unknown key, missing parameter or shape mismatch (all listed at once).
    """
    w = _strip_prefix(weights)
    if config is None:
        config = clip_config_from_weights(w)
    abstract = nnx.eval_shape(lambda: CLIPTextEncoder(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    return fill_strict(abstract, w, clip_key_table(config), ignored=_BUFFERS)
