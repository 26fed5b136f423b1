"""The sparse MLP operator (SPEC §2): GELU(tanh) MLP with running activation/output caches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from chipmunk_jax import indices as ix
from chipmunk_jax.backends import resolve_backend
from chipmunk_jax.cache import MLPCache
from chipmunk_jax.config import ChipmunkConfig, MLPConfig
from chipmunk_jax.schedules import MLPKind, _kind
from pallas_kernels import mlp as ops
from pallas_kernels.common import slot_mask


def dense_mlp(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array) -> jax.Array:
    """gelu_tanh(x w1^T + b1) w2 + b2 with w1, w2 neuron-major [F, C]; x [B, N, C]."""
    h = jax.nn.gelu(jnp.einsum("bnc,fc->bnf", x, w1) + b1[None, None, :], approximate=True)
    return jnp.einsum("bnf,fc->bnc", h, w2) + b2[None, None, :]


def sparse_mlp(
    x: jax.Array,
    w1: jax.Array,
    b1: jax.Array,
    w2: jax.Array,
    b2: jax.Array,
    cache: MLPCache,
    *,
    kind: MLPKind,
    config: MLPConfig | ChipmunkConfig,
    backend: str = "auto",
    rng: jax.Array | None = None,
) -> tuple[jax.Array, MLPCache]:
    """Chipmunk MLP for one layer at one step.

    Args:
      x: [B, N, C] tokens (N need not be a multiple of bm: padded internally).
      w1: [F, C] fc1 weight (neuron-major, torch layout); b1: [F].
      w2: [F, C] fc2 weight transposed (neuron-major); b2: [C].
      cache: this layer's MLPCache (``init_mlp_cache``).
      kind: the static step kind.
      config: the MLP config (or the whole ChipmunkConfig).
      backend: 'auto', 'reference', 'xla' or 'mosaic_gpu'.
      rng: random key for the random neuron keep (SPARSE_RECOMPUTE with random_keys > 0).

    Returns:
      (out [B, N, C] in x.dtype, new cache). FULL and DENSE are exact; sparse steps return the running
      output cache after adding the delta of the selected neurons.
    """
    cfg = config.mlp if isinstance(config, ChipmunkConfig) else config
    kind = _kind(MLPKind, kind)
    if kind is MLPKind.DENSE:
        return dense_mlp(x, w1, b1, w2, b2).astype(x.dtype), cache
    impl = resolve_backend(backend, "sparse_mlp_delta")
    b, n, c = x.shape
    f = w1.shape[0]
    n_p = cache.act.shape[1]
    if cache.act.shape != (b, n_p, f) or cache.out.shape != (b, n_p, c) or n_p != ix.round_up(n, cfg.bm):
        raise ValueError(
            f"MLP cache act {cache.act.shape} / out {cache.out.shape} do not fit x {x.shape} with F={f}, bm={cfg.bm}"
        )
    xp = jnp.pad(x, ((0, 0), (0, n_p - n), (0, 0)))

    if kind is MLPKind.FULL:
        z = (
            jnp.einsum("bnc,fc->bnf", xp, w1, preferred_element_type=jnp.float32)
            + b1.astype(jnp.float32)[None, None, :]
        )
        a = jax.nn.gelu(z, approximate=True)
        y = jnp.einsum("bnf,fc->bnc", a.astype(w2.dtype), w2, preferred_element_type=jnp.float32)
        y = y + b2.astype(jnp.float32)[None, None, :]
        new = cache.replace(
            act=a.astype(cache.act.dtype),
            out=y.astype(cache.out.dtype),
            block_mean=ix.block_mean(z, cfg.bm, n),
        )
        return y[:, :n].astype(x.dtype), new

    if kind is MLPKind.SPARSE_RECOMPUTE:
        # Zhat = fc1(block mean of x) = block mean of Z, by linearity.
        zhat = jnp.einsum("bgc,fc->bgf", ix.block_mean(xp, cfg.bm, n), w1.astype(jnp.float32))
        zhat = zhat + b1.astype(jnp.float32)[None, None, :]
        score = jnp.abs(zhat - cache.block_mean)
        if rng is None and cfg.random_keys > 0:
            raise ValueError("a SPARSE_RECOMPUTE MLP step with random_keys > 0 needs rng")
        indices, counts = ix.mlp_select(score, cfg, rng)
        member = _members(indices, counts, f)
        cache = cache.replace(block_mean=jnp.where(member, zhat, cache.block_mean), indices=indices, counts=counts)

    def delta(indices):
        return ops.sparse_mlp_delta(
            xp, w1, b1, w2, indices, cache.counts, cache.act, cache.out, block=cfg.bm, implementation=impl
        )

    cap = selection_capacity(cfg, f)
    if cap < f:
        # The selection almost always fits the capacity the config implies; then only those slots are passed
        # (a static, smaller gather). The exact full-capacity path stays as the fallback.
        out, act = jax.lax.cond(
            jnp.max(cache.counts) <= cap, lambda: delta(cache.indices[..., :cap]), lambda: delta(cache.indices)
        )
    else:
        out, act = delta(cache.indices)
    return out[:, :n].astype(x.dtype), cache.replace(out=out, act=act)


def selection_capacity(cfg: MLPConfig, hidden: int) -> int:
    """A static bound on the neurons one token block selects, beyond which a selection is rare.

    The quantile rule keeps about top_keys * F neurons (more only with ties), the random keep adds a binomial
    count with mean random_keys * F * (1 - top_keys); the bound adds eight standard deviations and one tile.
    Selections above it are still handled exactly, by a slower path.
    """
    top = int(np.ceil(cfg.top_keys * hidden)) + 1
    rest = hidden - top
    mean = rest * cfg.random_keys
    std = float(np.sqrt(rest * cfg.random_keys * (1.0 - cfg.random_keys)))
    cap = ix.round_up(int(np.ceil(top + mean + 8 * std)) + cfg.counts_multiple_of, cfg.counts_multiple_of)
    return min(cap, hidden)


def _members(indices: jax.Array, counts: jax.Array, f: int) -> jax.Array:
    """[..., K] indices with counts -> boolean membership [..., F]."""
    valid = slot_mask(counts, indices.shape[-1])
    flat_i = indices.reshape(-1, indices.shape[-1])
    flat_v = valid.reshape(-1, indices.shape[-1])
    m = jax.vmap(lambda i, vv: jnp.zeros((f,), bool).at[i].max(vv))(flat_i, flat_v)
    return m.reshape(*indices.shape[:-1], f)
