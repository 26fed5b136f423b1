"""Llama decoder as a text encoder (HunyuanVideo's ``text_encoder``: the language model of llava-llama-3-8b).

HunyuanVideo conditions its transformer on a *hidden state* of a Llama-3 decoder, not on its output: diffusers'
``HunyuanVideoPipeline._get_llama_prompt_embeds`` wraps the prompt in a system/user chat template, runs
transformers' ``LlamaModel`` with ``output_hidden_states=True`` and keeps ``hidden_states[-3]``
(``num_hidden_layers_to_skip=2``), then drops the first ``crop_start = 95`` positions (the template prefix) of
the embeddings and of the attention mask. transformers' ``hidden_states`` tuple has ``num_layers + 1`` entries:
the token embeddings, the output of each layer but the last, and the *final-norm-applied* output of the last
layer. ``hidden_states[-3]`` is therefore the raw (un-normed) output of layer ``num_layers - 2``: the last two
layers and the final norm do not contribute, and this module does not run them.

Architecture (transformers ``LlamaModel``): token embedding; per layer a pre-RMS-norm grouped-query attention
(``num_kv_heads`` < ``num_heads``, head ``h`` reads key/value head ``h // (num_heads // num_kv_heads)``) with
rotate-half RoPE on positions ``0 .. N-1`` and a causal mask combined with the key padding mask, then a
pre-RMS-norm SwiGLU MLP (``down(silu(gate(x)) * up(x))``); no biases. RMS norm statistics are taken in float32
and the result cast back before the weight multiplies, as transformers does; softmax runs in float32.

The modules hold only weights. The layers are stacked on a leading layer axis and run with ``jax.lax.scan``
(one compiled layer for all 32). Parameter layouts: kernels ``[in, out]`` (torch ``weight.T``), per layer
``q [L, C, H*D]``, ``k, v [L, C, KV*D]``, ``o [L, H*D, C]``, ``gate, up [L, C, F]``, ``down [L, F, C]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

if TYPE_CHECKING:
    from models.text_encoders.llama_tokenizer import LlamaTokenizer

ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama decoder used as a text encoder.

    The defaults are HunyuanVideo's ``text_encoder`` (the text part of llava-llama-3-8b-v1_1, a Llama-3-8B):
    32 layers, width 4096, 32 query heads and 8 key/value heads of 128, SwiGLU width 14336, vocabulary 128320
    (128256 Llama-3 tokens + llava's added tokens), RoPE base 500000 without scaling, RMS norm epsilon 1e-5.

    Attributes:
        vocab_size: Token embedding rows.
        hidden_size: Residual width C.
        num_layers: Decoder layers L.
        num_heads: Query heads H.
        num_kv_heads: Key/value heads KV (grouped-query attention; must divide ``num_heads``).
        head_dim: Width D of one head (``num_heads * head_dim`` need not equal ``hidden_size``).
        intermediate_size: SwiGLU hidden width F.
        rms_eps: RMS norm epsilon.
        rope_theta: RoPE base.
        rope_type: ``"default"`` (plain RoPE) or ``"llama3"`` (Llama-3.1 frequency scaling, the four fields below).
        rope_factor: llama3: low frequencies are divided by this.
        rope_low_freq_factor: llama3: wavelengths above ``original_max_positions / low_freq_factor`` are scaled.
        rope_high_freq_factor: llama3: wavelengths below ``original_max_positions / high_freq_factor`` are kept.
        rope_original_max_positions: llama3: pre-training context length.
    """

    vocab_size: int = 128320
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 14336
    rms_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_type: str = "default"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(
                f"LlamaConfig.head_dim must be positive and even (RoPE rotates pairs), got {self.head_dim}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"LlamaConfig.rope_type={self.rope_type!r} is not supported; supported: {ROPE_TYPES} "
                "(HunyuanVideo's text encoder uses 'default')"
            )
        if self.rope_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError(
                f"llama3 RoPE needs high_freq_factor > low_freq_factor, got {self.rope_high_freq_factor} <= "
                f"{self.rope_low_freq_factor}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (stored in converted checkpoints' manifest.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Inverse of ``to_dict``; unknown keys are an error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields {unknown}; known: {sorted(fields)}")
        return cls(**d)

    @property
    def num_params(self) -> int:
        """Parameter count (embedding, layers, final norm), computed from the shapes."""
        c, h, kv, d, f = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
        per_layer = 2 * c + c * h * d * 2 + c * kv * d * 2 + 3 * c * f
        return self.vocab_size * c + self.num_layers * per_layer + c


def rope_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The RoPE fields of ``LlamaConfig`` from a transformers ``config.json`` dict.

    Reads ``rope_theta`` + ``rope_scaling`` (transformers 4) or ``rope_parameters`` (transformers 5).

    Raises:
        ValueError: For a RoPE scaling type other than default / llama3 (linear, dynamic, yarn, longrope, ... are
            not implemented), naming the type.
    """
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    params.update({k: v for k, v in scaling.items() if k not in params})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"RoPE scaling type {rope_type!r} is not supported (only {ROPE_TYPES}); HunyuanVideo's Llama uses none"
        )
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type == "llama3":
        out.update(
            rope_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_positions=int(params["original_max_position_embeddings"]),
        )
    return out


LLAMA3_8B = LlamaConfig()
"""HunyuanVideo ``text_encoder`` (llava-llama-3-8b-v1_1 language model)."""


def tiny_config(**overrides) -> LlamaConfig:
    """A test-sized config (2 query heads per key/value head), overridable field by field."""
    fields: dict[str, Any] = dict(
        vocab_size=97,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=48,
        rms_eps=1e-5,
        rope_theta=10000.0,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """A chat template around the user prompt and the number of leading tokens to drop after encoding.

    Attributes:
        template: Text with one ``{}`` where the prompt goes (``str.format``).
        crop_start: Tokens (beginning-of-text included) of the template before the prompt; those positions are
            cut from the embeddings and the mask, so the outputs start at the prompt.
    """

    template: str
    crop_start: int

    def __post_init__(self):
        if self.template.count("{}") != 1:
            raise ValueError(f"a prompt template needs exactly one '{{}}' placeholder, got {self.template!r}")
        if self.crop_start < 0:
            raise ValueError(f"crop_start must be >= 0, got {self.crop_start}")


HUNYUAN_VIDEO_TEMPLATE = PromptTemplate(
    template=(
        "<|start_header_id|>system<|end_header_id|>\n\n"
        "Describe the video by detailing the following aspects: "
        "1. The main content and theme of the video."
        "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
        "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
        "4. background environment, light, style and atmosphere."
        "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    ),
    crop_start=95,
)
"""HunyuanVideo's text-to-video template (diffusers ``DEFAULT_PROMPT_TEMPLATE``; the item list has no line
breaks between items, as released). 95 = Llama-3 tokens of the system block and the user header."""

HUNYUAN_MAX_LENGTH = 256
"""Prompt tokens kept after the crop (diffusers' ``max_sequence_length``); the encoder sees 256 + 95."""


# ---------------------------------------------------------------------------------------------------------
# Modules (weights only).


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype) -> nnx.Param:
    return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * fan_in**-0.5).astype(dtype))


class LlamaLayers(nnx.Module):
    """All decoder layers, each parameter stacked on a leading layer axis."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, param_dtype):
        n, c, f = config.num_layers, config.hidden_size, config.intermediate_size
        qd, kvd = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.attn_norm = nnx.Param(jnp.ones((n, c), param_dtype))  # input_layernorm
        self.q = _normal(rngs, (n, c, qd), c, param_dtype)
        self.k = _normal(rngs, (n, c, kvd), c, param_dtype)
        self.v = _normal(rngs, (n, c, kvd), c, param_dtype)
        self.o = _normal(rngs, (n, qd, c), qd, param_dtype)
        self.mlp_norm = nnx.Param(jnp.ones((n, c), param_dtype))  # post_attention_layernorm
        self.gate = _normal(rngs, (n, c, f), c, param_dtype)
        self.up = _normal(rngs, (n, c, f), c, param_dtype)
        self.down = _normal(rngs, (n, f, c), f, param_dtype)


class LlamaEncoder(nnx.Module):
    """Llama decoder returning hidden states (transformers ``LlamaModel`` with ``output_hidden_states``)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        """Creates randomly initialised weights (use ``nnx.eval_shape`` + a converter for real ones).

        Args:
            config: Architecture.
            rngs: Initialisation randomness.
            dtype: Compute dtype of the activations (RMS statistics and softmax always run in float32).
            param_dtype: Storage dtype of the weights.
        """
        self.config = config
        self.dtype = jnp.dtype(dtype)
        c = config.hidden_size
        self.embed_tokens = nnx.Param(
            jax.random.normal(rngs.params(), (config.vocab_size, c), jnp.float32).astype(param_dtype)
        )
        self.layers = LlamaLayers(config, rngs=rngs, param_dtype=param_dtype)
        self.norm = nnx.Param(jnp.ones((c,), param_dtype))

    def _check(self, input_ids: jax.Array, attention_mask: jax.Array | None) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, N], got {input_ids.shape=}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integers, got {input_ids.dtype=}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"{attention_mask.shape=} must equal {input_ids.shape=}")

    def _run(self, input_ids: jax.Array, attention_mask: jax.Array | None, num_layers: int, collect: bool):
        """Embeds and runs the first ``num_layers`` layers; returns (h, per-layer outputs [num_layers, B, N, C])."""
        cfg, dt = self.config, self.dtype
        b, n = input_ids.shape
        h = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(dt)  # [B, N, C]
        causal = jnp.tril(jnp.ones((n, n), jnp.bool_))[None]  # [1, Q, K]
        allowed = causal if attention_mask is None else causal & (attention_mask != 0)[:, None, :]  # [B, Q, K]
        cos, sin = rope_table(cfg, n)  # [N, D/2] float32
        if num_layers == 0:
            return h, None
        params = {
            name: getattr(self.layers, name)[...]
            for name in ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")
        }

        def body(h, i):
            # Indexing the full stacks inside the loop (rather than scanning over a [:num_layers] slice) keeps XLA
            # from copying the weights of the layers that run (14 GB in bf16 for the 8B model).
            p = {k: jax.lax.dynamic_index_in_dim(v, i, keepdims=False) for k, v in params.items()}
            h = decoder_layer(p, h, cos, sin, allowed, cfg, dt)
            return h, (h if collect else None)

        return jax.lax.scan(body, h, jnp.arange(num_layers, dtype=jnp.int32))

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, skip_layer: int = 2
    ) -> jax.Array:
        """One hidden state: transformers' ``hidden_states[-(skip_layer + 1)]``.

        Only the layers that state depends on run: ``num_layers - skip_layer`` of them, plus the final norm when
        ``skip_layer == 0`` (then this is ``last_hidden_state``).

        Args:
            input_ids: Token ids [B, N].
            attention_mask: Optional [B, N], nonzero for real tokens; combined with the causal mask as
                transformers does (padded keys are hidden from every query; padded queries still produce values).
            skip_layer: Layers skipped from the end, 0 .. num_layers (HunyuanVideo: 2).

        Returns:
            [B, N, C] in the compute dtype.
        """
        self._check(input_ids, attention_mask)
        if not 0 <= skip_layer <= self.config.num_layers:
            raise ValueError(f"skip_layer must be in [0, {self.config.num_layers}], got {skip_layer}")
        h, _ = self._run(input_ids, attention_mask, self.config.num_layers - skip_layer, collect=False)
        return rms_norm(h, self.norm[...], self.config.rms_eps, self.dtype) if skip_layer == 0 else h

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Every hidden state, stacked as transformers' ``output_hidden_states`` tuple.

        Returns:
            [num_layers + 1, B, N, C]: index 0 the embeddings, index i < num_layers the output of layer i - 1,
            index num_layers the final-norm output of the last layer (``last_hidden_state``).
        """
        self._check(input_ids, attention_mask)
        emb, _ = self._run(input_ids, attention_mask, 0, collect=False)
        last, outs = self._run(input_ids, attention_mask, self.config.num_layers, collect=True)
        final = rms_norm(last, self.norm[...], self.config.rms_eps, self.dtype)
        return jnp.concatenate([emb[None], outs[:-1], final[None]], axis=0)


# ---------------------------------------------------------------------------------------------------------
# Functional pieces.


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype) -> jax.Array:
    """``weight * (x / rms(x))`` with the statistics in float32 and the product in ``dtype`` (transformers)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + jnp.float32(eps))
    return weight.astype(dtype).reshape((1,) * (x.ndim - 1) + weight.shape) * normed.astype(dtype)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [D/2] (float32) of the configured RoPE type."""
    d = config.head_dim
    inv = (1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))).astype(np.float32)
    if config.rope_type == "default":
        return inv
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    old = config.rope_original_max_positions
    lo, hi, factor = config.rope_low_freq_factor, config.rope_high_freq_factor, config.rope_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    mixed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return np.where(medium, mixed, scaled).astype(np.float32)


def rope_table(config: LlamaConfig, n: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin [N, D/2] (float32) of positions 0 .. n-1."""
    angles = jnp.arange(n, dtype=jnp.float32)[:, None] * jnp.asarray(rope_inv_freq(config))[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE: dims i and i + D/2 form a pair. x [B, N, ..., D]; cos, sin [N, D/2]."""
    half = x.shape[-1] // 2
    extra = (None,) * (x.ndim - 3)
    c, s = cos[(None, slice(None), *extra)], sin[(None, slice(None), *extra)]  # [1, N, ..., D/2]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def decoder_layer(
    p: Mapping[str, jax.Array],
    h: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    allowed: jax.Array,
    cfg: LlamaConfig,
    dtype,
) -> jax.Array:
    """One pre-norm Llama layer on h [B, N, C]; ``allowed`` [B or 1, Q, K] marks the visible keys."""
    b, n, _ = h.shape
    kv, d = cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // kv
    w = {k: v.astype(dtype) for k, v in p.items()}
    x = rms_norm(h, w["attn_norm"], cfg.rms_eps, dtype)
    q = apply_rope((x @ w["q"]).reshape(b, n, kv, g, d), cos, sin)  # [B, N, KV, G, D]; head = kv * G + g
    k = apply_rope((x @ w["k"]).reshape(b, n, kv, d), cos, sin)  # [B, N, KV, D]
    v = (x @ w["v"]).reshape(b, n, kv, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * jnp.float32(d**-0.5)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)  # [B, KV, G, Q, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    o = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, n, kv * g * d)
    h = h + o @ w["o"]
    x = rms_norm(h, w["mlp_norm"], cfg.rms_eps, dtype)
    return h + (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]


# ---------------------------------------------------------------------------------------------------------
# Jitted entry points.


@functools.partial(jax.jit, static_argnames=("graphdef", "skip_layer"))
def _encode(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array, skip_layer: int) -> jax.Array:
    return nnx.merge(graphdef, state)(ids, mask, skip_layer=skip_layer)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _all_hidden(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).hidden_states(ids, mask)


def _ids_and_mask(model: LlamaEncoder, input_ids, attention_mask) -> tuple[jax.Array, jax.Array]:
    ids = np.asarray(input_ids) if not isinstance(input_ids, jax.Array) else input_ids
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, N], got shape {ids.shape}")
    if isinstance(ids, np.ndarray) and ids.size and (ids.min() < 0 or ids.max() >= model.config.vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {model.config.vocab_size}), got [{ids.min()}, {ids.max()}]: "
            "tokenizer and checkpoint do not match"
        )
    mask = jnp.ones(ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    return jnp.asarray(ids, jnp.int32), mask


def encode(model: LlamaEncoder, input_ids, attention_mask=None, skip_layer: int = 2) -> jax.Array:
    """Jitted ``model(input_ids, attention_mask, skip_layer=skip_layer)``: ``hidden_states[-(skip_layer + 1)]``.

    Compiles once per (model structure, input shape, skip_layer).

    Args:
        model: The encoder.
        input_ids: [B, N] token ids (numpy ids are range-checked against the vocabulary).
        attention_mask: [B, N], nonzero for real tokens; None means all real.
        skip_layer: Layers skipped from the end (HunyuanVideo: 2).

    Returns:
        [B, N, C] in the model's compute dtype.
    """
    ids, mask = _ids_and_mask(model, input_ids, attention_mask)
    graphdef, state = nnx.split(model)
    return _encode(graphdef, state, ids, mask, skip_layer)


def all_hidden_states(model: LlamaEncoder, input_ids, attention_mask=None) -> jax.Array:
    """Jitted ``model.hidden_states``: [num_layers + 1, B, N, C], transformers' ``hidden_states`` order."""
    ids, mask = _ids_and_mask(model, input_ids, attention_mask)
    graphdef, state = nnx.split(model)
    return _all_hidden(graphdef, state, ids, mask)


def hunyuan_prompt_embeds(
    model: LlamaEncoder,
    tokenizer: LlamaTokenizer,
    prompts: str | Sequence[str],
    max_length: int = HUNYUAN_MAX_LENGTH,
    *,
    template: PromptTemplate = HUNYUAN_VIDEO_TEMPLATE,
    skip_layer: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """HunyuanVideo's Llama prompt embeddings (diffusers ``_get_llama_prompt_embeds``).

    Each prompt is put into ``template``; the batch is tokenized (beginning-of-text added, right padding to and
    truncation at ``max_length + crop_start`` tokens); the encoder's ``hidden_states[-(skip_layer + 1)]`` is
    taken; the first ``crop_start`` positions are dropped from it and from the mask.

    Args:
        model: The Llama encoder.
        tokenizer: A right-padding ``LlamaTokenizer`` (``load_llama_tokenizer``) whose vocabulary the model has.
        prompts: One prompt or a non-empty sequence of prompts.
        max_length: Token positions kept after the crop (256 in HunyuanVideo).
        template: Chat template and its crop.
        skip_layer: Layers skipped from the end.

    Returns:
        ``(embeds [B, max_length, C], mask [B, max_length] int32)``; the mask is 1 on the prompt tokens and the
        closing ``<|eot_id|>``, 0 on padding.

    Raises:
        ValueError: For a left-padding tokenizer (the crop would then cut padding instead of the template), a
            non-positive ``max_length`` or invalid prompts.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if tokenizer.padding_side != "right":
        raise ValueError(
            f"the template crop needs right padding, the tokenizer pads on the {tokenizer.padding_side!r}: load it "
            "with load_llama_tokenizer(..., padding_side='right') (what HunyuanVideo's pipeline uses)"
        )
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a string or a non-empty sequence of strings, got {prompts!r}")
    batch = tokenizer([template.template.format(p) for p in prompts], max_length=max_length + template.crop_start)
    embeds = encode(model, batch.input_ids, batch.attention_mask, skip_layer=skip_layer)
    c = template.crop_start
    return embeds[:, c:], jnp.asarray(batch.attention_mask[:, c:], jnp.int32)
