"""Portable XLA implementation of the column-sparse MLP delta: per token block, gather the selected rows of
w1 and w2 and multiply by them.

On GPUs, index capacities up to ``one_shot_max_k`` are gathered and multiplied at once (one fused pass, no
loop; slots past a block's count are masked): there every trip of a data-dependent loop costs a host round trip,
which is also why ``chipmunk_jax.mlp`` trims the capacity to a bound derived from the config whenever the
selection fits it. Otherwise (and on CPUs, where loops are cheap and a one-pass gather of every block's weight
rows would not fit the caches) the rows are walked in neuron chunks with a ``while_loop`` that stops at the
block's count, so cost follows the selection.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_CHUNK = 256  # = the default counts_multiple_of, so a selection fills whole chunks
_ONE_SHOT_MAX_K_GPU = 8192


@functools.partial(jax.jit, static_argnames=("block", "chunk", "one_shot_max_k"))
def sparse_mlp_delta_xla(
    x,
    w1,
    b1,
    w2,
    indices,
    counts,
    act,
    out,
    *,
    block: int = 128,
    chunk: int = _CHUNK,
    one_shot_max_k: int | None = None,
):
    """Same contract as ``sparse_mlp_delta_reference``; f32 accumulation.

    ``one_shot_max_k``: capacities up to this are done in one pass (default: 8192 on GPU, 0 elsewhere);
    ``chunk``: neurons per loop trip otherwise.
    """
    if one_shot_max_k is None:
        one_shot_max_k = _ONE_SHOT_MAX_K_GPU if jax.default_backend() == "gpu" else 0
    b, n, c = x.shape
    f = w1.shape[0]
    g = n // block
    kcap = indices.shape[-1]
    if kcap <= one_shot_max_k:
        return _one_shot(x, w1, b1, w2, jnp.clip(indices, 0, f - 1), counts, act, out, block=block)
    chunk = min(chunk, kcap)
    padk = -(-kcap // chunk) * chunk
    idx = jnp.pad(jnp.clip(indices, 0, f - 1), ((0, 0), (0, 0), (0, padk - kcap)))

    xg = x.reshape(b, g, block, c)
    # Neuron-major activations per block ([F, block]): a neuron selection then moves whole rows, which XLA
    # gathers and scatters far faster than single elements.
    at = jnp.swapaxes(act.reshape(b, g, block, f), 2, 3)  # [B, G, F, block]
    og = out.reshape(b, g, block, c)

    def one_block(xb, ab, ob, ib, cb):
        # xb [block, C], ab [F, block], ob [block, C], ib [padK], cb []
        trips = (cb + chunk - 1) // chunk

        def body(carry):
            i, acc, ab_new = carry
            ii = jax.lax.dynamic_slice_in_dim(ib, i * chunk, chunk)
            valid = (i * chunk + jnp.arange(chunk)) < cb
            z = jnp.einsum("kc,mc->km", w1[ii], xb, preferred_element_type=jnp.float32)
            z = z + b1[ii].astype(jnp.float32)[:, None]
            p = jax.nn.gelu(z, approximate=True) - ab[ii].astype(jnp.float32)  # [chunk, block]
            p = jnp.where(valid[:, None], p, 0.0)
            acc = acc + jnp.einsum("km,kc->mc", p.astype(w2.dtype), w2[ii], preferred_element_type=jnp.float32)
            ab_new = ab_new.at[ii].add(p.astype(ab_new.dtype))
            return i + 1, acc, ab_new

        init = (jnp.int32(0), ob.astype(jnp.float32), ab)
        _, acc, ab_new = jax.lax.while_loop(lambda cr: cr[0] < trips, body, init)
        return acc.astype(out.dtype), ab_new

    fn = jax.vmap(jax.vmap(one_block))
    new_o, new_at = fn(xg, at, og, idx, counts)
    return new_o.reshape(b, n, c), jnp.swapaxes(new_at, 2, 3).reshape(b, n, f)


def _one_shot(x, w1, b1, w2, idx, counts, act, out, *, block: int):
    b, n, c = x.shape
    f = w1.shape[0]
    g = n // block
    kcap = idx.shape[-1]
    xg = x.reshape(b, g, block, c)
    at = jnp.swapaxes(act.reshape(b, g, block, f), 2, 3)  # [B, G, F, block], rows move whole (see above)
    valid = jax.lax.broadcasted_iota(jnp.int32, (b, g, kcap), 2) < counts[..., None]  # [B, G, K]
    z = jnp.einsum("bgkc,bgmc->bgkm", w1[idx], xg, preferred_element_type=jnp.float32)  # [B, G, K, block]
    z = z + b1[idx].astype(jnp.float32)[..., None]
    rows = jax.vmap(jax.vmap(lambda a, i: a[i]))(at, idx)  # [B, G, K, block]
    p = jnp.where(valid[..., None], jax.nn.gelu(z, approximate=True) - rows.astype(jnp.float32), 0.0)
    acc = out.reshape(b, g, block, c).astype(jnp.float32) + jnp.einsum(
        "bgkm,bgkc->bgmc", p.astype(w2.dtype), w2[idx], preferred_element_type=jnp.float32
    )
    new_at = jax.vmap(jax.vmap(lambda a, i, d: a.at[i].add(d)))(at, idx, p.astype(at.dtype))
    return acc.astype(out.dtype).reshape(b, n, c), jnp.swapaxes(new_at, 2, 3).reshape(b, n, f)
