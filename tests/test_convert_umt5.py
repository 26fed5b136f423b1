"""``python -m convert_weights umt5``: a tiny random transformers UMT5EncoderModel -> orbax -> ``umt5.load``.

Parity bound: max |ours - torch| / max |torch| <= 1e-4 in float32 on the final hidden states, every parameter
(RMS norm weights and every layer's relative attention bias table included) randomised.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from convert_weights import umt5
from convert_weights.__main__ import build_parser
from convert_weights.__main__ import main as convert_main
from convert_weights.common import ConversionError

REL_TOL = 1e-4


def _model(cls, config_cls, seed: int):
    cfg = config_cls(
        vocab_size=77,
        d_model=32,
        d_kv=8,
        d_ff=40,
        num_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-5,
        dropout_rate=0.0,
    )
    model = cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "embed" in name or "shared" in name else 0.2))
    return model.eval()


def _save(model, directory):
    directory.mkdir(parents=True)
    save_file(
        {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, str(directory / "model.safetensors")
    )
    model.config.to_json_file(str(directory / "config.json"))


def test_umt5_cli_round_trip_matches_transformers(tmp_path):
    model = _model(transformers.UMT5EncoderModel, transformers.UMT5Config, seed=3)
    _save(model, tmp_path / "wan" / "text_encoder")  # a diffusers Wan pipeline layout
    dst = tmp_path / "ckpt"
    assert convert_main(["umt5", "--src", str(tmp_path / "wan"), "--dst", str(dst), "--dtype", "fp32"]) == 0
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["model"] == "umt5" and manifest["config"]["per_layer_position_bias"]
    assert manifest["config"]["max_distance"] == 20 and manifest["config"]["eps"] == 1e-5
    encoder = umt5.load(dst)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 77, size=(2, 30))
    mask = np.ones_like(ids)
    mask[1, 17:] = 0  # Wan masks the padding of its 512-token prompts
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    graphdef, state = nnx.split(encoder)
    run = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m))  # one compilation instead of eager dispatch
    ours = np.asarray(run(state, jnp.asarray(ids), jnp.asarray(mask)), np.float64)
    assert ours.shape == ref.shape
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) <= REL_TOL


def test_umt5_rejects_t5_and_is_listed(tmp_path):
    t5 = _model(transformers.T5EncoderModel, transformers.T5Config, seed=4)
    _save(t5, tmp_path / "t5")
    with pytest.raises(ConversionError, match="not a UMT5"):
        umt5.convert(tmp_path / "t5", tmp_path / "out", dtype="fp32", hash_sources=False)
    assert not (tmp_path / "out").exists()
    help_text = build_parser().format_help()
    assert "umt5" in help_text and "wan-vae" in help_text
