"""T5 / UMT5 encoder: parity with transformers on tiny random configs, converter strictness, full-size shapes.

Parity bound: max |ours - torch| / max |torch| <= 1e-4 in float32, every parameter (RMS norm weights included)
randomised, weights round-tripped through safetensors and ``convert_t5``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert_weights.t5 import ConversionError, convert_t5, fill_strict, t5_config_from_weights, t5_key_table
from models.text_encoders.t5 import T5_TINY, T5_XXL, UMT5_TINY, T5Encoder, relative_position_buckets

REL_TOL = 1e-4


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "layer_norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim == 1 or "embed" in name else 0.2))


def _hf_config(cls, cfg):
    return cls(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=cfg.eps,
        dropout_rate=0.0,
    )


def _torch_t5(umt5: bool):
    if umt5:
        model = transformers.UMT5EncoderModel(_hf_config(transformers.UMT5Config, UMT5_TINY))
    else:
        model = transformers.T5EncoderModel(_hf_config(transformers.T5Config, T5_TINY))
    _randomise(model, seed=1 if umt5 else 0)
    return model.eval()


def _save_and_load(model, tmp_path) -> dict[str, np.ndarray]:
    path = tmp_path / "t5.safetensors"
    save_file({k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, str(path))
    return load_file(str(path))


@pytest.fixture(scope="module")
def t5_pair(tmp_path_factory):
    model = _torch_t5(umt5=False)
    weights = _save_and_load(model, tmp_path_factory.mktemp("t5"))
    return model, weights


def _inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, T5_TINY.vocab_size, size=(2, 40))
    mask = np.ones_like(ids)
    mask[1, 23:] = 0
    return ids, mask


@pytest.mark.parametrize("use_mask", [False, True])
def test_t5_matches_transformers(t5_pair, use_mask):
    model, weights = t5_pair
    ids, mask = _inputs()
    assert t5_config_from_weights(weights, max_distance=T5_TINY.max_distance) == T5_TINY
    ours_model = convert_t5(weights, T5_TINY)
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask) if use_mask else None
        ).last_hidden_state.numpy()
    ours = ours_model(jnp.asarray(ids), jnp.asarray(mask) if use_mask else None)
    assert ours.shape == ref.shape and ours.dtype == jnp.float32
    assert _rel_err(ours, ref) <= REL_TOL


def test_umt5_matches_transformers(tmp_path):
    model = _torch_t5(umt5=True)
    weights = _save_and_load(model, tmp_path)
    assert t5_config_from_weights(weights, max_distance=UMT5_TINY.max_distance) == UMT5_TINY
    ids, mask = _inputs()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    ours = convert_t5(weights, UMT5_TINY)(jnp.asarray(ids), jnp.asarray(mask))
    assert _rel_err(ours, ref) <= REL_TOL
    # The per-layer tables matter: converting as shared-bias T5 must fail on the extra tables.
    with pytest.raises(ConversionError, match="block.1.layer.0.SelfAttention.relative_attention_bias"):
        convert_t5(weights, dataclasses.replace(UMT5_TINY, per_layer_position_bias=False))


def test_buckets_match_transformers():
    ours = relative_position_buckets(300, 300, 32, 128)
    rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(rel, True, 32, 128)
    np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


@pytest.mark.parametrize("keep", ["shared.weight", "encoder.embed_tokens.weight"])
def test_tied_embedding_either_name(t5_pair, keep):
    _, weights = t5_pair
    w = {k: v for k, v in weights.items() if k not in ("shared.weight", "encoder.embed_tokens.weight")}
    w[keep] = weights["shared.weight"]
    model = convert_t5(w)
    np.testing.assert_array_equal(np.asarray(model.embed_tokens.embedding[...]), weights["shared.weight"])


def test_untied_embeddings_rejected(t5_pair):
    _, weights = t5_pair
    w = dict(weights)
    w["encoder.embed_tokens.weight"] = w["shared.weight"] + 1.0
    with pytest.raises(ConversionError, match="tied"):
        convert_t5(w)


def test_strict_lists_every_problem(t5_pair):
    _, weights = t5_pair
    w = dict(weights)
    w["encoder.block.0.extra.weight"] = np.zeros((3,), np.float32)
    del w["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    w["encoder.final_layer_norm.weight"] = np.zeros((7,), np.float32)
    with pytest.raises(ConversionError) as info:
        convert_t5(w, T5_TINY)
    msg = str(info.value)
    assert "3 problem(s)" in msg
    assert "unknown source key 'encoder.block.0.extra.weight'" in msg
    assert "missing source key 'encoder.block.1.layer.1.DenseReluDense.wo.weight'" in msg
    assert "shape mismatch 'encoder.final_layer_norm.weight'" in msg


def test_param_dtype_bf16(t5_pair):
    _, weights = t5_pair
    # bf16 sources arrive as ml_dtypes arrays (safetensors BF16 read through numpy).
    bf16 = {k: v.astype(jnp.bfloat16) for k, v in weights.items()}
    model = convert_t5(bf16, T5_TINY, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert model.blocks[1].ffn.wo.kernel[...].dtype == jnp.bfloat16
    ids, _ = _inputs()
    out = model(jnp.asarray(ids))
    assert out.dtype == jnp.bfloat16
    ref = convert_t5(weights, T5_TINY)(jnp.asarray(ids))
    assert _rel_err(out.astype(jnp.float32), ref) < 0.1


def test_full_xxl_shapes_without_allocation():
    model = nnx.eval_shape(lambda: T5Encoder(T5_XXL, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
    graphdef, state = nnx.split(model)
    n_params = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(state))
    assert n_params == 4_762_310_656  # google/t5-v1_1-xxl encoder incl. the shared embedding

    def run(state, ids):
        return nnx.merge(graphdef, state)(ids)

    out = jax.eval_shape(run, state, jax.ShapeDtypeStruct((1, 512), jnp.int32))
    assert out.shape == (1, 512, 4096)


def test_bad_input_shapes(t5_pair):
    _, weights = t5_pair
    model = convert_t5(weights, T5_TINY)
    with pytest.raises(ValueError, match="input_ids must be"):
        model(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask.shape"):
        model(jnp.zeros((1, 5), jnp.int32), jnp.ones((1, 4), jnp.int32))


def test_fill_strict_reports_table_problems(t5_pair):
    _, weights = t5_pair
    table = t5_key_table(T5_TINY)
    del table["encoder.final_layer_norm.weight"]  # leaves a model parameter unfilled
    table["encoder.block.0.layer.0.layer_norm.weight"] = (("blocks", 0, "attn_norm", "nope"), "identity")
    table["encoder.block.1.layer.0.layer_norm.weight"] = (("blocks", 1, "attn_norm", "weight"), "flip")
    abstract = nnx.eval_shape(lambda: T5Encoder(T5_TINY, rngs=nnx.Rngs(0)))
    w = {k: v for k, v in weights.items() if k != "encoder.embed_tokens.weight"}
    with pytest.raises(ConversionError) as info:
        fill_strict(abstract, w, table, ignored=["encoder.final_layer_norm.weight"])
    msg = str(info.value)
    assert "4 problem(s)" in msg
    assert "blocks.0.attn_norm.nope is not a model parameter" in msg
    assert "unknown transform 'flip'" in msg
    assert "model parameter final_norm.weight was not filled" in msg
    assert "model parameter blocks.0.attn_norm.weight was not filled" in msg
