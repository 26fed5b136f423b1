"""CLIP text encoder: parity with transformers.CLIPTextModel (eager attention) on tiny random configs.

Parity bound: max |ours - torch| / max |torch| <= 1e-4 in float32 for the last hidden state and the pooled output,
every parameter (layer norm weights and biases included) randomised, weights round-tripped through safetensors
and ``convert_clip``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert_weights.clip import clip_config_from_weights, convert_clip
from convert_weights.t5 import ConversionError
from models.text_encoders.clip import CLIP_L, CLIP_TINY, CLIP_TINY_EOS, CLIPTextConfig, CLIPTextEncoder
from tests.models.helpers import torch_clip

REL_TOL = 1e-4


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _checkpoint(model, tmp_path, prefix: str) -> dict[str, np.ndarray]:
    path = tmp_path / "clip.safetensors"
    tensors = {prefix + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    save_file(tensors, str(path))
    return load_file(str(path))


def _ids(cfg: CLIPTextConfig, n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    ids = rng.integers(2, cfg.vocab_size - 2, size=(3, n))
    eos = cfg.vocab_size - 1 if cfg.eos_token_id == 2 else cfg.eos_token_id
    ids[ids == eos] = eos + 1  # the only end-of-text tokens are the ones placed below
    ids[:, 0] = 0
    for row, end in enumerate((5, n - 1, 9)):
        ids[row, end] = eos
        ids[row, end + 1 :] = eos if cfg.eos_token_id != 2 else 1  # padding with eos (new convention) or pad id
    return ids


@pytest.mark.parametrize(
    "cfg,prefix,use_mask",
    [(CLIP_TINY, "text_model.", False), (CLIP_TINY, "", True), (CLIP_TINY_EOS, "text_model.", False)],
    ids=["legacy-eos-prefixed", "legacy-eos-v5-names-masked", "explicit-eos"],
)
def test_clip_matches_transformers(tmp_path, cfg, prefix, use_mask):
    model = torch_clip(cfg, seed=3)
    weights = _checkpoint(model, tmp_path, prefix)
    ids = _ids(cfg, cfg.max_positions)
    mask = (np.arange(ids.shape[1])[None, :] <= np.array([5, 15, 9])[:, None]).astype(np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask) if use_mask else None)
    ours_model = convert_clip(weights, cfg)
    hidden, pooled = ours_model(jnp.asarray(ids), jnp.asarray(mask) if use_mask else None)
    assert _rel_err(hidden, ref.last_hidden_state.numpy()) <= REL_TOL
    assert _rel_err(pooled, ref.pooler_output.numpy()) <= REL_TOL


def test_config_inference_and_position_ids_buffer(tmp_path):
    model = torch_clip(CLIP_TINY, seed=4)
    weights = _checkpoint(model, tmp_path, "text_model.")
    weights["text_model.embeddings.position_ids"] = np.arange(16)[None]
    inferred = clip_config_from_weights(weights, head_dim=8)
    assert inferred == CLIP_TINY
    ids = _ids(CLIP_TINY, 12)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    assert _rel_err(convert_clip(weights, inferred)(jnp.asarray(ids))[1], ref) <= REL_TOL


def test_strict_errors(tmp_path):
    weights = _checkpoint(torch_clip(CLIP_TINY, seed=5), tmp_path, "text_model.")
    w = dict(weights)
    w["text_projection.weight"] = np.zeros((32, 32), np.float32)
    with pytest.raises(ConversionError, match="mixed key layout"):
        convert_clip(w, CLIP_TINY)
    w = dict(weights)
    w["text_model.text_projection.weight"] = np.zeros((32, 32), np.float32)
    del w["text_model.encoder.layers.1.mlp.fc2.bias"]
    w["text_model.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 31), np.float32)
    with pytest.raises(ConversionError) as info:
        convert_clip(w, CLIP_TINY)
    msg = str(info.value)
    assert "3 problem(s)" in msg and "text_projection" in msg and "fc2.bias" in msg and "q_proj.weight" in msg


def test_bad_inputs():
    model = nnx.eval_shape(lambda: CLIPTextEncoder(CLIP_TINY, rngs=nnx.Rngs(0)))  # checks run before any compute
    with pytest.raises(ValueError, match="exceeds max_positions"):
        model(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(width=30, num_heads=4)


def test_clip_l_shapes_without_allocation():
    model = nnx.eval_shape(lambda: CLIPTextEncoder(CLIP_L, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    assert sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(state)) == 123_060_480

    def run(state, ids):
        return nnx.merge(graphdef, state)(ids)

    hidden, pooled = jax.eval_shape(run, state, jax.ShapeDtypeStruct((2, 77), jnp.int32))
    assert hidden.shape == (2, 77, 768) and pooled.shape == (2, 768)
