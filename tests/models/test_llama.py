"""Llama text encoder of HunyuanVideo: parity with transformers ``LlamaModel`` and diffusers' prompt path.

* Every hidden state (``output_hidden_states``) and the selected ``hidden_states[-3]`` against
  ``transformers.LlamaModel`` (eager attention), tiny random configs with every parameter randomised (RMS norm
  weights 1 + 0.1 randn), grouped-query attention (2 and 4 query heads per key/value head), a right-padded batch
  of different lengths, default and llama3 RoPE, float32, weights converted through ``convert_weights.llama``.
  Measured max |ours - ref| / max |ref| <= 8.2e-7 (prompt path 4.7e-7); bound 1e-5.
* ``hunyuan_prompt_embeds`` against ``HunyuanVideoPipeline._get_llama_prompt_embeds`` called on a real pipeline
  object holding the tiny torch model and a transformers ``PreTrainedTokenizerFast`` over a tiny byte-level BPE
  ``tokenizer.json`` trained here (the released template text, with the crop of this tokenizer). Bound 1e-5.
* Tokenizer ids / masks equal to transformers' on the same file (padding, truncation, special tokens, unicode).
* Converter: CLI round trip from sharded safetensors + index + config.json in the diffusers, ``model.`` and llava
  layouts; strictness (unknown, missing, mis-shaped keys all listed; nothing written); unsupported RoPE refused.
* Release config: ``nnx.eval_shape`` parameter count equals transformers' on the meta device (7,505,186,816).
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

from convert_weights import llama as conv
from convert_weights.__main__ import build_parser
from convert_weights.__main__ import main as convert_main
from convert_weights.common import ConversionError
from models.text_encoders.llama import (
    HUNYUAN_VIDEO_TEMPLATE,
    LLAMA3_8B,
    LlamaConfig,
    LlamaEncoder,
    PromptTemplate,
    all_hidden_states,
    encode,
    hunyuan_prompt_embeds,
    rope_inv_freq,
    tiny_config,
)
from models.text_encoders.llama_tokenizer import load_llama_tokenizer
from tests.models.helpers import (
    LLAMA_PROMPTS,
    hf_llama_tokenizer,
    llama_hf_config,
    tokenizer_dir_fixture,  # noqa: F401  (the tokenizer_dir fixture)
    torch_llama,
    torch_state,
    write_sharded,
)

REL_TOL = 1e-5


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _ours(model, cfg: LlamaConfig) -> LlamaEncoder:
    return conv.to_model(cfg, conv.convert_tensors(torch_state(model), cfg))


LLAMA3_ROPE = tiny_config(
    num_layers=3,
    num_heads=8,
    num_kv_heads=2,
    head_dim=12,  # num_heads * head_dim != hidden_size
    rope_theta=500000.0,
    rope_type="llama3",
    rope_factor=8.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_positions=64,  # small, so that the tiny head's frequencies fall in all three bands
)


@pytest.mark.parametrize("cfg", [tiny_config(), LLAMA3_ROPE], ids=["default-rope-gqa2", "llama3-rope-gqa4"])
def test_hidden_states_match_transformers(cfg):
    model = torch_llama(cfg, seed=1)
    ours = _ours(model, cfg)
    n = 14
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(3, n))
    mask = (np.arange(n)[None] < np.array([n, 9, 3])[:, None]).astype(np.int64)  # right padding, 3 lengths
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    states = np.asarray(all_hidden_states(ours, ids, mask))
    assert states.shape == (cfg.num_layers + 1, 3, n, cfg.hidden_size) == (len(ref.hidden_states), *ref[0].shape)
    for i, r in enumerate(ref.hidden_states):
        assert _rel_err(states[i], r.numpy()) <= REL_TOL, f"hidden_states[{i}]"
    assert _rel_err(states[-1], ref.last_hidden_state.numpy()) <= REL_TOL  # the final norm is in the last one
    sel = np.asarray(encode(ours, ids, mask))  # HunyuanVideo's selection: skip_layer=2 -> hidden_states[-3]
    assert _rel_err(sel, ref.hidden_states[-3].numpy()) <= REL_TOL
    if cfg.rope_type == "default":
        for skip in (0, cfg.num_layers):  # last_hidden_state (final norm applied) and the embeddings
            got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask), skip_layer=skip))
            assert _rel_err(got, ref.hidden_states[-(skip + 1)].numpy()) <= REL_TOL, f"skip_layer={skip}"
        # Padding changes no real token's state: row 2 alone, unpadded, gives the same first 3 positions.
        alone = np.asarray(encode(ours, ids[2:3, :3], None))
        assert _rel_err(alone, sel[2:3, :3]) <= REL_TOL


def test_llama3_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](llama_hf_config(LLAMA3_ROPE))
    ours = rope_inv_freq(LLAMA3_ROPE)
    assert np.allclose(ours, ref.numpy(), rtol=1e-6, atol=0)
    plain = rope_inv_freq(LlamaConfig(**{**LLAMA3_ROPE.to_dict(), "rope_type": "default"}))
    assert (ours < plain).any() and (ours == plain).any()  # both the scaled and the kept bands are exercised


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and the HunyuanVideo prompt path.


def test_tokenizer_matches_transformers(tokenizer_dir):
    ours = load_llama_tokenizer(tokenizer_dir)
    assert ours.padding_side == "right" and ours.pad_token == "<pad>"
    ref = hf_llama_tokenizer(tokenizer_dir)
    texts = [
        *LLAMA_PROMPTS,
        "",
        "Ünïcödé — émoji 🐿️ and <|eot_id|> inline",
        HUNYUAN_VIDEO_TEMPLATE.template.format("dog"),
    ]
    for max_length in (8, 40, 300):
        got = ours(texts, max_length=max_length)
        want = ref(texts, max_length=max_length, padding="max_length", truncation=True)
        assert got.input_ids.tolist() == want["input_ids"], max_length
        assert got.attention_mask.tolist() == want["attention_mask"], max_length
        assert got.input_ids.shape == (len(texts), max_length) and got.input_ids.dtype == np.int32
    assert (got.input_ids[:, 0] == ours._tok.token_to_id("<|begin_of_text|>")).all()
    assert ours.decode(got.input_ids[0]) == LLAMA_PROMPTS[0]
    with pytest.raises(ValueError, match="pad token"):
        load_llama_tokenizer(tokenizer_dir / "tokenizer.json", pad_token="<nope>")
    with pytest.raises(ValueError, match="empty"):
        ours([], max_length=4)


def test_hunyuan_prompt_embeds_match_diffusers_pipeline(tokenizer_dir):
    from diffusers import HunyuanVideoPipeline

    tok = load_llama_tokenizer(tokenizer_dir)
    cfg = tiny_config(vocab_size=tok.vocab_size, num_layers=4)
    model = torch_llama(cfg, seed=2)
    pipe = HunyuanVideoPipeline(
        text_encoder=model,
        tokenizer=hf_llama_tokenizer(tokenizer_dir),
        transformer=None,
        vae=None,
        scheduler=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    crop = tok.num_tokens(HUNYUAN_VIDEO_TEMPLATE.template.split("{}")[0])  # 95 for the real Llama-3 tokenizer
    template = PromptTemplate(HUNYUAN_VIDEO_TEMPLATE.template, crop)
    max_length = 24  # the last prompt is longer: truncated, losing its closing <|eot_id|>
    with torch.no_grad():
        ref, ref_mask = pipe._get_llama_prompt_embeds(
            LLAMA_PROMPTS,
            {"template": template.template, "crop_start": crop},
            device=torch.device("cpu"),
            dtype=torch.float32,
            max_sequence_length=max_length,
            num_hidden_layers_to_skip=2,
        )
    embeds, mask = hunyuan_prompt_embeds(_ours(model, cfg), tok, LLAMA_PROMPTS, max_length, template=template)
    assert embeds.shape == ref.shape == (3, max_length, cfg.hidden_size)
    assert np.asarray(mask).tolist() == ref_mask.numpy().tolist()
    assert 0 < int(np.asarray(mask)[1].sum()) < max_length and int(np.asarray(mask)[2].sum()) == max_length
    assert _rel_err(embeds, ref.numpy()) <= REL_TOL
    with pytest.raises(ValueError, match="right padding"):
        hunyuan_prompt_embeds(_ours(model, cfg), load_llama_tokenizer(tokenizer_dir, padding_side="left"), "x")


# ---------------------------------------------------------------------------------------------------------
# Converter.


@pytest.mark.parametrize("layout", ["diffusers", "causal-lm", "llava"])
def test_cli_round_trip(tmp_path, layout):
    cfg = tiny_config(num_layers=3, rms_eps=1e-6, rope_theta=5000.0)
    model = torch_llama(cfg, seed=3)
    hf = model.config.to_dict()
    hf.pop("rope_parameters")
    hf.update(rope_theta=cfg.rope_theta, rope_scaling=None)  # the transformers 4 file format of the release
    extra: dict[str, np.ndarray] = {}
    if layout == "diffusers":
        prefix, src = "", tmp_path / "HunyuanVideo"
        write_sharded(model, src / "text_encoder", prefix, extra, hf)
    elif layout == "causal-lm":
        prefix, src = "model.", tmp_path / "causal"
        extra = {"lm_head.weight": np.zeros((cfg.vocab_size, cfg.hidden_size), np.float32)}
        write_sharded(model, src, prefix, extra, hf)
    else:
        prefix, src = "language_model.model.", tmp_path / "llava"
        extra = {
            "language_model.lm_head.weight": np.zeros((cfg.vocab_size, cfg.hidden_size), np.float32),
            "vision_tower.vision_model.embeddings.patch_embedding.weight": np.zeros((4, 3, 2, 2), np.float32),
            "multi_modal_projector.linear_1.weight": np.zeros((32, 4), np.float32),
        }
        hf = {"model_type": "llava", "text_config": {k: v for k, v in hf.items() if k != "head_dim"}}
        write_sharded(model, src, prefix, extra, hf)
    dst = tmp_path / "ckpt"
    argv = ["llama", "--src", str(src), "--dst", str(dst), "--dtype", "fp32", "--no-hash"]
    if layout == "llava":
        argv += ["--head-dim", "8"]  # given by num_attention_heads anyway; the flag is accepted
    assert convert_main(argv) == 0
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["model"] == "llama" and LlamaConfig.from_dict(manifest["config"]) == cfg
    assert manifest["ignored_source_keys"] == sorted(extra)
    assert manifest["num_params"] == cfg.num_params
    ours = conv.load(dst)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 10))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    assert _rel_err(encode(ours, ids, mask), ref.hidden_states[-3].numpy()) <= REL_TOL


def test_converter_is_strict(tmp_path):
    cfg = tiny_config(num_layers=2)
    weights = torch_state(torch_llama(cfg, seed=4), "model.")
    weights["model.layers.0.self_attn.q_proj.bias"] = np.zeros((32,), np.float32)  # unknown
    weights["model.extra_head.weight"] = np.zeros((3, 3), np.float32)  # unknown, inside the prefix
    weights["mystery.weight"] = np.zeros((3, 3), np.float32)  # unknown, outside the prefix
    del weights["model.layers.1.mlp.up_proj.weight"]  # missing
    weights["model.layers.0.self_attn.o_proj.weight"] = np.zeros((32, 31), np.float32)  # mis-shaped
    with pytest.raises(ConversionError) as info:
        conv.convert_tensors(weights, cfg)
    msg = str(info.value)
    for part in ("q_proj.bias", "'extra_head.weight'", "'mystery.weight'", "layers.1.mlp.up_proj.weight", "(32, 31)"):
        assert part in msg, part
    assert "prefix 'model.'" in msg
    src = tmp_path / "bad"
    src.mkdir()
    save_file(weights, str(src / "model.safetensors"))
    assert convert_main(["llama", "--src", str(src), "--dst", str(tmp_path / "out"), "--no-hash"]) == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match="not a Llama checkpoint"):
        conv.convert_tensors({"foo.weight": np.zeros((2, 2), np.float32)}, cfg)
    good = torch_state(torch_llama(cfg, seed=4))
    with pytest.raises(ConversionError, match="yarn"):
        conv.infer_config(good, {"rope_theta": 1e4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, head_dim=8)
    with pytest.raises(ConversionError, match="num_attention_heads=8 but the weights have 4"):
        conv.infer_config(good, {"num_attention_heads": 8, "head_dim": 8})
    with pytest.raises(ValueError, match="not supported"):
        LlamaConfig(rope_type="yarn")
    assert "llama" in build_parser().format_help()


# ---------------------------------------------------------------------------------------------------------
# Release size.


def test_release_config_shapes_without_allocation():
    with torch.device("meta"):
        ref = transformers.LlamaModel(llama_hf_config(LLAMA3_8B))
    torch_count = sum(p.numel() for p in ref.parameters())
    assert torch_count == LLAMA3_8B.num_params == conv.param_count(LLAMA3_8B) == 7_505_186_816
    model = nnx.eval_shape(lambda: LlamaEncoder(LLAMA3_8B, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    graphdef, state = nnx.split(model)
    n = HUNYUAN_VIDEO_TEMPLATE.crop_start + 256

    def run(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask, skip_layer=2)

    out = jax.eval_shape(run, state, *[jax.ShapeDtypeStruct((2, n), jnp.int32)] * 2)
    assert out.shape == (2, n, 4096) and out.dtype == jnp.bfloat16
