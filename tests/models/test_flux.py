"""FLUX.1 model: parity with diffusers.FluxTransformer2DModel through both checkpoint layouts, full-size shapes."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models.flux as mf
from convert_weights.__main__ import main as convert_main
from models.flux.model import apply_rope, timestep_embedding
from tests.models.test_flux_support import save_bfl, save_diffusers, tiny_diffusers, torch_forward

RTOL = 1e-5


@pytest.fixture(scope="module", params=["dev", "schnell"])
def converted(request, tmp_path_factory):
    """(torch model, {layout: loaded JAX model}) for one variant, converted with the CLI code path."""
    guidance = request.param == "dev"
    tmp = tmp_path_factory.mktemp(request.param)
    model = tiny_diffusers(guidance, seed=1 if guidance else 2)
    save_diffusers(model, tmp / "diffusers")
    save_bfl(model, tmp / "bfl.safetensors")
    assert convert_main(["flux", "--src", str(tmp / "diffusers"), "--dst", str(tmp / "c_diff"), "--dtype", "fp32"]) == 0
    args = ["--dtype", "fp32", "--axes-dim", "4,6,6"]
    assert convert_main(["flux", "--src", str(tmp / "bfl.safetensors"), "--dst", str(tmp / "c_bfl"), *args]) == 0
    return model, {"diffusers": mf.load(tmp / "c_diff"), "bfl": mf.load(tmp / "c_bfl")}


def _inputs(batch, txt_len, h, w, guidance, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((batch, h * w, 16)).astype(np.float32)
    txt = rng.standard_normal((batch, txt_len, 24)).astype(np.float32)
    y = rng.standard_normal((batch, 12)).astype(np.float32)
    t = rng.uniform(0.05, 1.0, batch).astype(np.float32)
    g = rng.uniform(1.0, 5.0, batch).astype(np.float32) if guidance else None
    return img, txt, y, t, g


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@functools.partial(jax.jit, static_argnums=(0, 7))
def _forward(graphdef, params, img, txt, y, t, g, shape):
    nt, h, w = shape
    model = nnx.merge(graphdef, params)
    rope = mf.rope_table(mf.position_ids(nt, h, w), model.cfg.axes_dim, model.cfg.theta)
    return model(img, txt, y, t, g, rope)[0]


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_forward_matches_diffusers(converted, layout):
    """Batch 2, non-square image (4 x 6 tokens), float32: relative error <= 1e-5."""
    torch_model, jax_models = converted
    model = jax_models[layout]
    batch, txt_len, h, w = 2, 7, 4, 6
    img, txt, y, t, g = _inputs(batch, txt_len, h, w, model.cfg.guidance_embed)
    ref = torch_forward(torch_model, img, txt, y, t, g, h, w)
    graphdef, params = nnx.split(model)
    out = _forward(graphdef, params, img, txt, y, t, g, (txt_len, h, w))
    assert out.shape == ref.shape
    assert _rel(out, ref) <= RTOL
    # Each sample of the batch is its own batch-1 result (no mixing across the batch axis).
    one = _forward(graphdef, params, img[1:], txt[1:], y[1:], t[1:], None if g is None else g[1:], (txt_len, h, w))
    np.testing.assert_allclose(np.asarray(one[0]), np.asarray(out[1]), rtol=1e-5, atol=1e-5)


def test_converted_config_is_inferred(converted):
    torch_model, jax_models = converted
    c = torch_model.config
    for model in jax_models.values():
        cfg = model.cfg
        assert (cfg.depth_double, cfg.depth_single) == (c.num_layers, c.num_single_layers)
        assert (cfg.heads, cfg.head_dim) == (c.num_attention_heads, c.attention_head_dim)
        assert cfg.guidance_embed == c.guidance_embeds
        assert cfg.axes_dim == tuple(c.axes_dims_rope)
        assert model.dtype == jnp.float32


def test_full_size_parameter_count():
    # Reference counts from diffusers.FluxTransformer2DModel on the meta device (guidance_embeds True / False).
    for cfg, expected in ((mf.FLUX_DEV, 11_901_408_320), (mf.FLUX_SCHNELL, 11_891_178_560)):
        abstract = nnx.eval_shape(lambda cfg=cfg: mf.Flux(cfg, rngs=nnx.Rngs(0)))
        n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
        assert n == expected
        assert abstract.double.img_w1.get_value().shape == (19, 12288, 3072)
        assert abstract.single.qkv_w.get_value().shape == (38, 3072, 3, 24, 128)


def test_rope_rotates_pairs():
    """Interleaved pairs rotate by the table's angles (a 90 degree rotation maps (1, 0) to (0, 1))."""
    x = jnp.zeros((1, 1, 1, 4), jnp.float32).at[..., 0].set(1.0).at[..., 2].set(2.0)
    cos = jnp.array([[0.0, 1.0]], jnp.float32)
    sin = jnp.array([[1.0, 0.0]], jnp.float32)
    np.testing.assert_allclose(np.asarray(apply_rope(x, cos, sin))[0, 0, 0], [0.0, 1.0, 2.0, 0.0], atol=1e-7)


def test_timestep_embedding_is_cos_then_sin():
    e = np.asarray(timestep_embedding(jnp.array([0.0, 500.0], jnp.float32), dim=8))
    np.testing.assert_allclose(e[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-7)
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    np.testing.assert_allclose(e[1], np.concatenate([np.cos(500 * freqs), np.sin(500 * freqs)]), atol=1e-4)
