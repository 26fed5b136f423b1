"""CLIP text encoder (CLIP-L/14 as used by Flux for the pooled text vector) in Flax NNX.

Pre-norm transformer with learned absolute positions, causal self-attention, quick-GELU MLP and a final layer
norm. The pooled output is the final hidden state at the end-of-text token, located the way transformers does it:
with the legacy ``eos_token_id == 2`` (the value in the released CLIP-L / Flux configs) it is the argmax of the
token ids, because the original vocabulary puts end-of-text at the largest id; otherwise it is the first position
holding ``eos_token_id``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text tower.

    Attributes:
        vocab_size: Token embedding rows.
        width: Residual width.
        num_layers: Transformer layers.
        num_heads: Attention heads (``width`` must be divisible by it).
        mlp_dim: MLP hidden width.
        max_positions: Learned position embeddings, i.e. the maximum sequence length (77 for CLIP).
        eps: Layer norm epsilon.
        eos_token_id: 2 selects the legacy argmax pooling; any other value pools at its first occurrence.
        activation: ``"quick_gelu"`` (OpenAI CLIP) or ``"gelu"`` (exact, OpenCLIP bigG).
    """

    vocab_size: int = 49408
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_positions: int = 77
    eps: float = 1e-5
    eos_token_id: int = 2
    activation: str = "quick_gelu"

    def __post_init__(self):
        for name in ("vocab_size", "width", "num_layers", "num_heads", "mlp_dim", "max_positions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CLIPTextConfig.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(f"CLIPTextConfig.width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"CLIPTextConfig.activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}"
            )


CLIP_L = CLIPTextConfig()
"""openai/clip-vit-large-patch14 text tower (Flux ``text_encoder``)."""

CLIP_TINY = CLIPTextConfig(vocab_size=99, width=32, num_layers=2, num_heads=4, mlp_dim=48, max_positions=16)
CLIP_TINY_EOS = dataclasses.replace(CLIP_TINY, eos_token_id=50)
"""Tiny config pooling at the first explicit end-of-text id (the post-2023 transformers convention)."""


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with 1/sqrt(d) scaling and biased projections."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        c = config.width
        self.num_heads = config.num_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(c, c, **kw)
        self.k_proj = nnx.Linear(c, c, **kw)
        self.v_proj = nnx.Linear(c, c, **kw)
        self.out_proj = nnx.Linear(c, c, **kw)

    def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
        """x: [B, N, C]; allowed: bool [B, 1, N, N] (query, key) pairs that may attend."""
        b, n, c = x.shape
        h = self.num_heads
        d = c // h
        q = self.q_proj(x).reshape(b, n, h, d)  # [B, N, H, D]
        k = self.k_proj(x).reshape(b, n, h, d)
        v = self.v_proj(x).reshape(b, n, h, d)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * jnp.float32(d**-0.5)
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)  # [B, H, Q, K]
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return self.out_proj(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, c))


class CLIPLayer(nnx.Module):
    """Pre-norm residual attention and MLP."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        c = config.width
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = nnx.LayerNorm(c, epsilon=config.eps, use_fast_variance=False, **kw)
        self.self_attn = CLIPAttention(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm2 = nnx.LayerNorm(c, epsilon=config.eps, use_fast_variance=False, **kw)
        self.fc1 = nnx.Linear(c, config.mlp_dim, **kw)
        self.fc2 = nnx.Linear(config.mlp_dim, c, **kw)
        self.activation = config.activation

    def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), allowed)
        return x + self.fc2(_ACTIVATIONS[self.activation](self.fc1(self.layer_norm2(x))))


class CLIPTextEncoder(nnx.Module):
    """CLIP text transformer returning (last hidden state, pooled end-of-text state)."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        """Creates randomly initialised weights.

        Args:
            config: Architecture.
            rngs: Initialisation randomness.
            dtype: Compute dtype.
            param_dtype: Storage dtype of the weights.
        """
        self.config = config
        c = config.width
        self.token_embedding = nnx.Embed(config.vocab_size, c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.position_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (config.max_positions, c), param_dtype) * jnp.asarray(0.01, param_dtype)
        )
        self.layers = nnx.List(
            [CLIPLayer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype) for _ in range(config.num_layers)]
        )
        self.final_layer_norm = nnx.LayerNorm(
            c, epsilon=config.eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Encodes token ids.

        Args:
            input_ids: Token ids [B, N] with N <= max_positions.
            attention_mask: Optional [B, N], nonzero for real tokens; combined with the causal mask. Flux passes
                none (padding tokens come after end-of-text, so causality already hides them from it).

        Returns:
            ``(last_hidden_state [B, N, C], pooled [B, C])``.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, N], got {input_ids.shape=}")
        b, n = input_ids.shape
        if n > self.config.max_positions:
            raise ValueError(f"sequence length {n} exceeds max_positions={self.config.max_positions}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"{attention_mask.shape=} must equal {input_ids.shape=}")
        pos = self.position_embedding[...][:n].astype(self.token_embedding.dtype)
        x = self.token_embedding(input_ids) + pos[None]  # [B, N, C]
        causal = jnp.tril(jnp.ones((n, n), jnp.bool_))[None, None]  # [1, 1, Q, K]
        allowed = causal if attention_mask is None else causal & (attention_mask != 0)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, allowed)
        x = self.final_layer_norm(x)
        if self.config.eos_token_id == 2:
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_pos = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, eos_pos[:, None, None], axis=1)[:, 0]  # [B, C]
        return x, pooled
