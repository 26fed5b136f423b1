"""T5 v1.1 encoder (the Flux text encoder T5-XXL) in Flax NNX.

Architecture of the v1.1 / XXL family: RMS layer norm without bias or mean subtraction, gated FFN with tanh-GELU
("gelu_new"), no 1/sqrt(d) attention scaling (folded into the initialisation upstream), and a learned relative
position bias over log-spaced bidirectional buckets. T5 computes that bias in the first layer only and shares it;
UMT5 gives every layer its own table (``T5Config.per_layer_position_bias``).

The modules hold only weights; the parameter tree mirrors the upstream names so that the converter key table in
``convert_weights/t5.py`` stays a flat, readable list.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 encoder.

    Attributes:
        vocab_size: Rows of the token embedding table.
        d_model: Residual width.
        num_layers: Number of encoder blocks.
        num_heads: Attention heads.
        d_kv: Width of one head (``num_heads * d_kv`` need not equal ``d_model``).
        d_ff: Hidden width of the gated FFN.
        num_buckets: Relative position buckets (half per direction, as the encoder is bidirectional).
        max_distance: Distance at and beyond which all relative positions share one bucket.
        eps: RMS norm epsilon.
        per_layer_position_bias: False for T5 (bias table in layer 0, shared); True for UMT5 (one table per layer).
    """

    vocab_size: int = 32128
    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    per_layer_position_bias: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_kv", "d_ff", "max_distance"):
            if getattr(self, name) <= 0:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"T5Config.num_buckets must be even and >= 4, got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(f"T5Config.max_distance={self.max_distance} must exceed num_buckets // 4")


T5_XXL = T5Config()
"""google/t5-v1_1-xxl encoder, as shipped in the Flux checkpoints (text_encoder_2)."""

T5_TINY = T5Config(
    vocab_size=99, d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=48, num_buckets=8, max_distance=16
)
"""Test-sized config; the small bucket count makes short sequences reach the log-spaced buckets."""

UMT5_TINY = dataclasses.replace(T5_TINY, per_layer_position_bias=True)


def relative_position_buckets(query_len: int, key_len: int, num_buckets: int, max_distance: int) -> jax.Array:
    """Bidirectional T5 bucket index of ``key_position - query_position`` for every (query, key) pair.

    Half the buckets encode the sign. Within one sign, distances below ``num_buckets // 4`` get exact buckets and
    larger ones log-spaced buckets up to ``max_distance``.

    Args:
        query_len: Number of query positions.
        key_len: Number of key positions.
        num_buckets: Total bucket count (both directions).
        max_distance: Distance mapped to the last bucket of a direction.

    Returns:
        int32 bucket indices, shape [query_len, key_len].
    """
    rel = jnp.arange(key_len, dtype=jnp.int32)[None, :] - jnp.arange(query_len, dtype=jnp.int32)[:, None]  # [Q, K]
    half = num_buckets // 2
    sign_offset = jnp.where(rel > 0, half, 0)
    dist = jnp.abs(rel)
    max_exact = half // 2
    # The clamp keeps log() finite where the exact branch is taken anyway; truncation towards zero matches upstream.
    safe = jnp.maximum(dist, 1).astype(jnp.float32)
    log_bucket = max_exact + (
        jnp.log(safe / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).astype(jnp.int32)
    log_bucket = jnp.minimum(log_bucket, half - 1)
    return sign_offset + jnp.where(dist < max_exact, dist, log_bucket)


class RMSNorm(nnx.Module):
    """T5 layer norm: scale by the root mean square, learned per-channel weight, no bias; statistics in float32."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + jnp.float32(self.eps))
        w = self.weight[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        return (y * w).astype(x.dtype)


def _linear(din: int, dout: int, rngs: nnx.Rngs, dtype, param_dtype) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class T5Attention(nnx.Module):
    """Unscaled multi-head self-attention with an optional relative position bias table."""

    def __init__(self, config: T5Config, has_bias_table: bool, *, rngs: nnx.Rngs, dtype, param_dtype):
        inner = config.num_heads * config.d_kv
        self.config = config
        self.q = _linear(config.d_model, inner, rngs, dtype, param_dtype)
        self.k = _linear(config.d_model, inner, rngs, dtype, param_dtype)
        self.v = _linear(config.d_model, inner, rngs, dtype, param_dtype)
        self.o = _linear(inner, config.d_model, rngs, dtype, param_dtype)
        self.relative_attention_bias = (
            nnx.Embed(config.num_buckets, config.num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if has_bias_table
            else None
        )

    def position_bias(self, seq_len: int) -> jax.Array:
        """Relative position bias from this layer's table, float32, shape [H, N, N]."""
        if self.relative_attention_bias is None:
            raise ValueError("this attention layer has no relative position bias table")
        buckets = relative_position_buckets(seq_len, seq_len, self.config.num_buckets, self.config.max_distance)
        bias = self.relative_attention_bias.embedding[...][buckets]  # [N, N, H]
        return jnp.transpose(bias, (2, 0, 1)).astype(jnp.float32)

    def __call__(self, x: jax.Array, bias: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        b, n, _ = x.shape
        h, d = self.config.num_heads, self.config.d_kv
        q = self.q(x).reshape(b, n, h, d)  # [B, N, H, D]
        k = self.k(x).reshape(b, n, h, d)
        v = self.v(x).reshape(b, n, h, d)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias  # [B, H, Q, K]
        if key_mask is not None:
            scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, h * d)
        return self.o(out)


class T5GatedFFN(nnx.Module):
    """``wo(gelu_tanh(wi_0 x) * wi_1 x)``."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.wi_0 = _linear(config.d_model, config.d_ff, rngs, dtype, param_dtype)
        self.wi_1 = _linear(config.d_model, config.d_ff, rngs, dtype, param_dtype)
        self.wo = _linear(config.d_ff, config.d_model, rngs, dtype, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class T5Block(nnx.Module):
    """Pre-norm attention and FFN sublayers, each with a residual connection."""

    def __init__(self, config: T5Config, has_bias_table: bool, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.attn_norm = RMSNorm(config.d_model, config.eps, param_dtype=param_dtype)
        self.attn = T5Attention(config, has_bias_table, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ffn_norm = RMSNorm(config.d_model, config.eps, param_dtype=param_dtype)
        self.ffn = T5GatedFFN(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, bias, key_mask):
        x = x + self.attn(self.attn_norm(x), bias, key_mask)
        return x + self.ffn(self.ffn_norm(x))


class T5Encoder(nnx.Module):
    """T5 / UMT5 encoder stack: token embedding, blocks, final RMS norm.

    Build the full-size model without allocating through ``nnx.eval_shape(lambda: T5Encoder(T5_XXL, rngs=...))``
    and fill it with ``convert_weights.t5.convert_t5``.
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        """Creates randomly initialised weights.

        Args:
            config: Architecture.
            rngs: Initialisation randomness.
            dtype: Compute dtype of the linear layers (norms and softmax run in float32).
            param_dtype: Storage dtype of the weights.
        """
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.blocks = nnx.List(
            [
                T5Block(
                    config,
                    has_bias_table=(i == 0 or config.per_layer_position_bias),
                    rngs=rngs,
                    dtype=dtype,
                    param_dtype=param_dtype,
                )
                for i in range(config.num_layers)
            ]
        )
        self.final_norm = RMSNorm(config.d_model, config.eps, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Encodes token ids.

        Args:
            input_ids: Token ids, [B, N].
            attention_mask: Optional [B, N], nonzero for real tokens; padded keys get no attention weight. Flux
                runs T5 without a mask (padding tokens take part), so ``None`` is the Flux setting.

        Returns:
            Final hidden states, [B, N, d_model], in the compute dtype.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, N], got {input_ids.shape=}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"{attention_mask.shape=} must equal {input_ids.shape=}")
        n = input_ids.shape[1]
        key_mask = None if attention_mask is None else attention_mask != 0
        x = self.embed_tokens(input_ids)  # [B, N, C]
        shared_bias = self.blocks[0].attn.position_bias(n)[None]  # [1, H, N, N]
        for block in self.blocks:
            bias = block.attn.position_bias(n)[None] if self.config.per_layer_position_bias else shared_bias
            x = block(x, bias, key_mask)
        return self.final_norm(x)
