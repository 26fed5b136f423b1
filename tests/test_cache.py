"""Cache constructors: fixed shapes with batch and layer axes, and byte counts that follow the formula."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import chipmunk_jax as cj


@pytest.mark.parametrize("compress", [False, True])
def test_attention_cache_shapes_and_bytes(compress):
    cfg = cj.AttnConfig(top_keys=0.165, counts_multiple_of=112, mbm=192, should_compress_indices=compress)
    b, h, n, d, layers = 2, 3, 4352, 128, 4
    cache = cj.init_attention_cache(cfg, batch=b, heads=h, seq_len=n, head_dim=d, dtype=jnp.bfloat16, num_layers=layers)
    g = -(-n // 192)  # 23 query groups
    assert cache.out.shape == (layers, b, h, n, d) and cache.out.dtype == jnp.bfloat16
    assert cache.lse.shape == (layers, b, h, n) and cache.lse.dtype == jnp.float32
    if compress:
        assert cache.indices is None and cache.counts is None
        assert cache.mask_bits.shape == (layers, b, h, g, -(-n // 32)) and cache.mask_bits.dtype == jnp.uint32
        sel_bytes = b * h * g * (-(-n // 32)) * 4
    else:
        tk = 112 * round(0.165 * n / 112)  # 672 keys
        assert cache.indices.shape == (layers, b, h, g, tk) and cache.counts.shape == (layers, b, h, g)
        sel_bytes = b * h * g * tk * 4 + b * h * g * 4
    want = layers * (b * h * n * d * 2 + b * h * n * 4 + sel_bytes)
    assert cj.cache_nbytes(cache) == want
    per_layer = cj.attention_cache_nbytes(cfg, batch=b, heads=h, seq_len=n, head_dim=d, dtype=jnp.bfloat16)
    assert per_layer * layers == want


def test_mlp_cache_shapes_and_bytes():
    cfg = cj.MLPConfig(is_enabled=True, top_keys=0.3)
    b, n, c, f = 2, 4300, 64, 256  # n padded up to 4352 = 34 blocks of 128
    cache = cj.init_mlp_cache(cfg, batch=b, seq_len=n, width=c, hidden=f, dtype=jnp.bfloat16)
    assert cache.act.shape == (b, 4352, f) and cache.out.shape == (b, 4352, c)
    assert cache.block_mean.shape == (b, 34, f) and cache.block_mean.dtype == jnp.float32
    assert cache.indices.shape == (b, 34, f) and cache.counts.shape == (b, 34)
    want = b * 4352 * (f + c) * 2 + b * 34 * f * 4 * 2 + b * 34 * 4
    assert cj.cache_nbytes(cache) == want == cj.mlp_cache_nbytes(cfg, batch=b, seq_len=n, width=c, hidden=f)


def test_flux_full_size_cache_memory_per_layer():
    """SPEC §5 says Flux caches are small (~27 MB per layer); ours at 1280x768 (N = 4352), batch 1, bf16."""
    cfg = cj.preset("flux")
    attn = cj.attention_cache_nbytes(cfg.attn, batch=1, heads=24, seq_len=4352, head_dim=128, dtype=jnp.bfloat16)
    assert 26e6 < attn < 30e6


def test_hunyuan_cache_sizes_match_the_reference_figures():
    """SPEC §5: HunyuanVideo 720p 129f (N ~ 119k) has ~0.73 GB of attention out-cache and ~0.22 GB of bit-packed
    masks per layer (bf16, batch 1); 58 sparsified layers of 60 give ~43 GB of out-cache."""
    cfg = cj.preset("hunyuan")
    n = 33 * 45 * 80 + 256  # video tokens of 129 frames at 720x1280 after the VAE and 1x2x2 patches, + text
    per = cj.attention_cache_nbytes(cfg.attn, batch=1, heads=24, seq_len=n, head_dim=128)
    out_bytes = 24 * n * 128 * 2
    mask_bytes = 24 * (-(-n // 192)) * (-(-n // 32)) * 4
    assert per == out_bytes + mask_bytes + 24 * n * 4  # + the float32 normaliser
    assert abs(out_bytes / 1e9 - 0.73) < 0.01 and abs(mask_bytes / 1e9 - 0.22) < 0.01
    total = cj.model_cache_nbytes(cfg, num_layers=60, batch=1, seq_len=n, heads=24, head_dim=128)
    assert total["mlp"] == 0 and total["attention"] == 58 * per
    assert 42e9 < 58 * out_bytes < 44e9


def test_model_cache_nbytes_counts_only_sparsified_layers_and_needs_mlp_sizes():
    cfg = cj.preset("flux")
    kw = dict(num_layers=57, batch=1, seq_len=4352, heads=24, head_dim=128)
    with pytest.raises(ValueError, match="width and hidden"):
        cj.model_cache_nbytes(cfg, **kw)
    sizes = cj.model_cache_nbytes(cfg, width=3072, hidden=12288, **kw)
    attn = cj.attention_cache_nbytes(cfg.attn, batch=1, heads=24, seq_len=4352, head_dim=128)
    mlp = cj.mlp_cache_nbytes(cfg.mlp, batch=1, seq_len=4352, width=3072, hidden=12288)
    assert sizes == {"attention": 55 * attn, "mlp": 55 * mlp, "total": 55 * (attn + mlp)}
