"""Float32 jnp reference of the column-sparse MLP delta (SPEC §2.2 step 5), dense and clear."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import slot_mask


def sparse_mlp_delta_reference(x, w1, b1, w2, indices, counts, act, out, *, block: int = 128):
    """Applies the sparse MLP delta for the selected neurons of every token block.

    For token m of block g and selected neuron j:
      P[m, j] = gelu_tanh(x_m . w1[j] + b1[j]) - act[m, j];  out[m] += sum_j P[m, j] w2[j];  act[m, j] += P[m, j].

    Args:
      x: [B, N, C] with N a multiple of ``block``.
      w1: [F, C] (neuron-major); b1: [F]; w2: [F, C] (neuron-major, i.e. fc2's weight transposed).
      indices: [B, G, K] int32 neuron indices per token block, G = N / block; counts: [B, G] int32.
      act: [B, N, F] cached activations; out: [B, N, C] cached outputs.

    Returns:
      (new out [B, N, C] in out.dtype, new act [B, N, F] in act.dtype).
    """
    b, n, _ = x.shape
    f = w1.shape[0]
    g = n // block
    valid = slot_mask(counts, indices.shape[-1])  # [B, G, K]
    onehot = jnp.where(valid[..., None], jax.nn.one_hot(jnp.clip(indices, 0, f - 1), f, dtype=jnp.float32), 0.0)
    member = jnp.minimum(onehot.sum(axis=2), 1.0)  # [B, G, F]
    member = jnp.repeat(member, block, axis=1)  # [B, N, F]
    z = x.astype(jnp.float32) @ w1.astype(jnp.float32).T + b1.astype(jnp.float32)[None, None, :]
    p = (jax.nn.gelu(z, approximate=True) - act.astype(jnp.float32)) * member
    assert g * block == n
    new_out = out.astype(jnp.float32) + p @ w2.astype(jnp.float32)
    new_act = act.astype(jnp.float32) + p
    return new_out.astype(out.dtype), new_act.astype(act.dtype)
