"""CLIP vision tower: parity with transformers ``CLIPVisionModel`` (tiny random config, every parameter randomised),
preprocessing against ``CLIPImageProcessorPil``, the converter (CLI round trip, strictness, config inference)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import CLIPVisionConfig as HFVisionConfig
from transformers import CLIPVisionModel, CLIPVisionModelWithProjection
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from convert_weights import clip_vision as conv
from convert_weights.__main__ import main as convert_main
from convert_weights.common import ConversionError
from models.image_encoders.clip_vision import (
    CLIP_VIT_H_14,
    CLIPVisionConfig,
    CLIPVisionEncoder,
    encode,
    preprocess,
)

REL_TOL = 1e-5


def _hf_config(act: str = "gelu", projection: int = 12) -> HFVisionConfig:
    return HFVisionConfig(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=42,
        patch_size=14,
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=projection,
    )


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random: norm weights 1 + 0.1 randn, everything else randn / sqrt(fan-in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def pair():
    """(transformers CLIPVisionModelWithProjection, state dict as saved, our converted encoder)."""
    torch.manual_seed(0)
    model = _randomise(CLIPVisionModelWithProjection(_hf_config()), 0)
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    cfg = conv.infer_config(sd, num_heads=4)
    return model, sd, conv.to_model(cfg, conv.convert_tensors(sd, cfg))


def test_config_is_inferred_from_the_shapes(pair):
    _, sd, ours = pair
    cfg = ours.config
    assert (cfg.image_size, cfg.patch_size, cfg.width, cfg.num_layers, cfg.mlp_dim) == (42, 14, 24, 3, 40)
    assert cfg.projection_dim == 12 and cfg.num_tokens == 10 and cfg.activation == "gelu"


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_hidden_states_match_transformers(act):
    """Every hidden state (embeddings after pre-layernorm, each layer) and the pooled / projected embedding."""
    model = _randomise(CLIPVisionModelWithProjection(_hf_config(act)), 1)
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    cfg = conv.infer_config(sd, num_heads=4, activation=act)
    ours = conv.to_model(cfg, conv.convert_tensors(sd, cfg))
    pixels = np.random.default_rng(1).standard_normal((2, 3, 42, 42)).astype(np.float32)
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(pixels), output_hidden_states=True)
    want = np.stack([h.numpy() for h in out.hidden_states])  # [L + 1, B, N, W]
    got = np.asarray(ours.hidden_states(jnp.asarray(pixels)))
    assert got.shape == want.shape == (4, 2, 10, 24)
    errs = [_rel(got[i], want[i]) for i in range(4)]
    assert max(errs) <= REL_TOL, errs
    assert _rel(ours.pooled(jnp.asarray(pixels)), out.image_embeds.numpy()) <= REL_TOL


def test_penultimate_hidden_state_as_wan_uses_it(pair):
    """Wan I2V: CLIPVisionModel(..., output_hidden_states=True).hidden_states[-2], through the jitted encode."""
    model, sd, ours = pair
    plain = CLIPVisionModel(_hf_config())
    missing, unexpected = plain.load_state_dict(
        {k.removeprefix("vision_model."): torch.tensor(v) for k, v in sd.items() if k != "visual_projection.weight"},
        strict=False,
    )
    assert not unexpected and all("position_ids" in k for k in missing)
    pixels = np.random.default_rng(2).standard_normal((3, 3, 42, 42)).astype(np.float32)
    with torch.no_grad():
        states = plain.eval()(pixel_values=torch.tensor(pixels), output_hidden_states=True).hidden_states
    got = np.asarray(encode(ours, jnp.asarray(pixels)))
    assert got.shape == (3, 10, 24)
    assert _rel(got, states[-2].numpy()) <= REL_TOL
    assert _rel(encode(ours, jnp.asarray(pixels), hidden_state=0), states[0].numpy()) <= REL_TOL
    with pytest.raises(ValueError, match="out of range"):
        ours(jnp.asarray(pixels), hidden_state=4)
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3, 42, 42\]"):
        ours(jnp.zeros((1, 3, 28, 28), jnp.float32))


@pytest.mark.parametrize("size", [(300, 200), (150, 420), (224, 224), (97, 231)])
def test_preprocess_matches_clip_image_processor_pil(size):
    """Random RGB images of several aspect ratios: bit-identical to transformers' Pillow backend."""
    from PIL import Image

    w, h = size
    img = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    want = CLIPImageProcessorPil()(images=img, return_tensors="np")["pixel_values"]
    got = preprocess(img, CLIP_VIT_H_14)
    assert got.shape == want.shape == (1, 3, 224, 224) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    # RGBA PNGs and uint8 arrays go through the same path (converted to RGB).
    rgba = np.concatenate([np.asarray(img), np.full((h, w, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(preprocess([rgba], CLIP_VIT_H_14), want)


def test_converter_cli_round_trip_and_pipeline_layout(pair, tmp_path):
    """A diffusers I2V pipeline layout (image_encoder/ + image_processor/) through `python -m convert_weights`."""
    model, sd, ours = pair
    pipe = tmp_path / "pipe"
    (pipe / "image_encoder").mkdir(parents=True)
    (pipe / "image_processor").mkdir()
    save_file(sd, str(pipe / "image_encoder" / "model.safetensors"))
    (pipe / "image_encoder" / "config.json").write_text(json.dumps(model.config.to_dict()))
    stats = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0]}
    (pipe / "image_processor" / "preprocessor_config.json").write_text(json.dumps(stats))
    dst = tmp_path / "ckpt"
    assert convert_main(["clip-vision", "--src", str(pipe), "--dst", str(dst), "--no-hash"]) == 0
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["model"] == "clip_vision" and manifest["variant"] == "with_projection"
    loaded = conv.load(dst)
    assert loaded.config.num_heads == 4 and loaded.config.image_std == (0.25, 0.5, 1.0)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 3, 42, 42)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(ours(x)))


def test_converter_is_strict(pair):
    _, sd, _ = pair
    cfg = conv.infer_config(sd, num_heads=4)
    bad = dict(sd)
    bad["vision_model.encoder.layers.0.extra.weight"] = np.zeros(3, np.float32)
    del bad["vision_model.encoder.layers.2.mlp.fc1.bias"]
    bad["vision_model.post_layernorm.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ConversionError) as e:
        conv.convert_tensors(bad, cfg)
    msg = str(e.value)
    assert "encoder.layers.0.extra.weight" in msg  # unknown
    assert "encoder.layers.2.mlp.fc1.bias" in msg  # missing
    assert "post_layernorm.bias" in msg and "(5,)" in msg  # mis-shaped
    mixed = {k.removeprefix("vision_model.") if "layers.1." in k else k: v for k, v in sd.items()}
    with pytest.raises(ConversionError, match="mixed key layout"):
        conv.convert_tensors(mixed, cfg)
    text = dict(sd, **{"text_model.embeddings.token_embedding.weight": np.zeros((4, 24), np.float32)})
    with pytest.raises(ConversionError, match="mixed key layout"):
        conv.convert_tensors(text, cfg)
    no_proj = {k: v for k, v in sd.items() if k != "visual_projection.weight"}
    assert conv.infer_config(no_proj, num_heads=4).projection_dim is None
    with pytest.raises(ConversionError, match="missing source key"):
        conv.convert_tensors(no_proj, cfg)  # cfg says there is a projection
    with pytest.raises(ConversionError, match="not divisible by num_heads"):
        conv.infer_config(sd, num_heads=5)


def test_vit_h_14_parameter_count_matches_transformers():
    """Full-size ViT-H/14 (Wan's image encoder) through jax.eval_shape against transformers on the meta device."""
    from flax import nnx

    abstract = nnx.eval_shape(lambda: CLIPVisionEncoder(CLIP_VIT_H_14, rngs=nnx.Rngs(0)))
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    hf = HFVisionConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
        projection_dim=1024,
    )
    with torch.device("meta"):
        ref = CLIPVisionModelWithProjection(hf)
    assert ours == sum(p.numel() for p in ref.parameters())
    assert CLIP_VIT_H_14.num_tokens == 257
    with pytest.raises(ValueError, match="activation"):
        CLIPVisionConfig(activation="relu")
