"""Test helpers shared by several test files: random torch reference models, our models built from their weights
through the converters, small tokenizer files, and the error measure the parity bounds use.

Every reference model here has EVERY parameter drawn at random (norm weights, biases, learned tables), so that a
mapping or formula error cannot hide behind a default initialisation.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from diffusers import (
    HunyuanVideoTransformer3DModel,
    MochiTransformer3DModel,
    UniPCMultistepScheduler,
    WanTransformer3DModel,
)
from flax import nnx
from safetensors.numpy import save_file
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

from models.hunyuan_video import HunyuanVideoConfig, HunyuanVideoTransformer3D
from models.mochi import MochiConfig, MochiTransformer3D
from models.text_encoders.clip import CLIPTextConfig
from models.text_encoders.llama import HUNYUAN_VIDEO_TEMPLATE, LlamaConfig
from models.wan import WanConfig


def rel(a, b) -> float:
    """max |a - b| / max |b| in float64: the relative error every parity bound is stated in."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def torch_state(model: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """A torch module's state dict as numpy copies, keys prefixed with ``prefix``."""
    return {prefix + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# Wan2.1.


def wan_torch_model(cfg: WanConfig, seed: int) -> WanTransformer3DModel:
    """A diffusers Wan transformer of ``cfg`` with EVERY parameter randomised (norm weights and tables included)."""
    m = WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm,
        eps=cfg.eps,
        image_dim=cfg.image_dim,
        added_kv_proj_dim=cfg.dim if cfg.is_i2v else None,
        rope_max_seq_len=cfg.rope_max_seq_len,
    ).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            fan_in = p.shape[-1] if p.ndim >= 2 else 4
            noise = torch.randn(p.shape, generator=g) / fan_in**0.5
            # Norm scales around 1 (random, but not so small that they hide the normalised values).
            p.copy_(noise + 1.0 if "norm" in name and name.endswith("weight") else noise)
    return m


def diffusers_unipc(shift: float) -> UniPCMultistepScheduler:
    """diffusers' UniPC as the Wan pipelines configure it (flow prediction, ``shift``, order 2, bh2)."""
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
    )


# ---------------------------------------------------------------------------------------------------------
# Mochi 1.


def mochi_diffusers_module(cfg: MochiConfig) -> MochiTransformer3DModel:
    """The diffusers Mochi transformer of ``cfg`` as diffusers initialises it (randomise it before use)."""
    return MochiTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim,
        num_layers=cfg.num_layers,
        pooled_projection_dim=cfg.text_width,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        text_embed_dim=cfg.text_dim,
        time_embed_dim=cfg.time_embed_dim,
    ).eval()


def mochi_diffusers_model(cfg: MochiConfig, seed: int) -> MochiTransformer3DModel:
    """A diffusers Mochi transformer with EVERY parameter randomised (norm weights and pos_frequencies included):
    N(0, 1/fan_in), RMS scales 1 + that (random, but not so small they hide the normalised values)."""
    m = mochi_diffusers_module(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            fan_in = p.shape[-1] if p.ndim >= 2 else 4
            noise = torch.randn(p.shape, generator=g) / fan_in**0.5
            if "norm" in name and name.endswith("weight") and p.ndim == 1:
                noise = noise + 1.0
            p.copy_(noise)
    return m


def mochi_from_diffusers(cfg: MochiConfig, tm: MochiTransformer3DModel) -> MochiTransformer3D:
    """Our float32 Mochi transformer holding ``tm``'s weights, mapped by ``convert_weights.mochi`` (the one key
    table) and filled strictly by ``convert_weights.common.fill_module``; nothing is randomly initialised."""
    from convert_weights.common import fill_module
    from convert_weights.mochi import convert_tensors

    abstract = nnx.eval_shape(lambda: MochiTransformer3D(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32))
    return fill_module(abstract, convert_tensors(torch_state(tm), cfg), where="tiny diffusers model")


# ---------------------------------------------------------------------------------------------------------
# HunyuanVideo.

HUNYUAN_LATENT = (5, 14, 20)  # -> token grid (5, 7, 10): a main voxel block and all three tails
HUNYUAN_TEXT_LEN = 9  # padded prompt length of hunyuan_inputs


def hunyuan_torch_model(cfg: HunyuanVideoConfig, seed: int) -> HunyuanVideoTransformer3DModel:
    """A diffusers HunyuanVideo transformer with EVERY parameter randomised (norm weights, refiner, guidance)."""
    m = HunyuanVideoTransformer3DModel(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.head_dim,
        num_layers=cfg.depth_double,
        num_single_layers=cfg.depth_single,
        num_refiner_layers=cfg.depth_refiner,
        mlp_ratio=cfg.mlp_ratio,
        patch_size=cfg.patch_size,
        patch_size_t=cfg.patch_size_t,
        guidance_embeds=cfg.guidance_embeds,
        text_embed_dim=cfg.text_dim,
        pooled_projection_dim=cfg.pooled_dim,
        rope_theta=cfg.rope_theta,
        rope_axes_dim=cfg.rope_axes_dim,
    ).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            fan_in = int(np.prod(p.shape[1:])) if p.ndim >= 2 else 4
            noise = torch.randn(p.shape, generator=g) / fan_in**0.5
            # Norm scales around 1 (random, but not so small that they hide the normalised values).
            p.copy_(noise + 1.0 if "norm" in name and name.endswith("weight") and p.ndim == 1 else noise)
    return m


def hunyuan_from_diffusers(cfg: HunyuanVideoConfig, sd: dict[str, np.ndarray]) -> HunyuanVideoTransformer3D:
    """Our float32 HunyuanVideo transformer holding a diffusers state dict, mapped by
    ``convert_weights.hunyuan_video`` (the one key table); strict: every key used, every parameter set."""
    from convert_weights import hunyuan_video as ch

    return ch.to_model(cfg, ch.convert_tensors(sd, cfg), dtype=jnp.float32)


def hunyuan_inputs(cfg: HunyuanVideoConfig, valid: list[int], latent=HUNYUAN_LATENT, seed: int = 0):
    """(latents, timesteps, text, mask, pooled, guidance) float32 numpy for a batch of ``len(valid)`` prompts with
    ``valid`` tokens of ``HUNYUAN_TEXT_LEN``; guidance already scaled by 1000 as the pipeline passes it."""
    rs = np.random.RandomState(seed)
    b = len(valid)
    lat = rs.randn(b, cfg.in_channels, *latent).astype(np.float32)
    ts = rs.uniform(0, 1000, size=(b,)).astype(np.float32)
    txt = rs.randn(b, HUNYUAN_TEXT_LEN, cfg.text_dim).astype(np.float32)
    mask = (np.arange(HUNYUAN_TEXT_LEN)[None, :] < np.asarray(valid)[:, None]).astype(np.int64)
    pooled = rs.randn(b, cfg.pooled_dim).astype(np.float32)
    guidance = rs.uniform(1000, 8000, size=(b,)).astype(np.float32)
    return lat, ts, txt, mask, pooled, guidance


def hunyuan_torch_out(tm, lat, ts, txt, mask, pooled, guidance) -> np.ndarray:
    """The diffusers transformer's output for ``hunyuan_inputs``."""
    with torch.no_grad():
        out = tm(
            torch.tensor(lat),
            torch.tensor(ts),
            torch.tensor(txt),
            torch.tensor(mask),
            torch.tensor(pooled),
            guidance=torch.tensor(guidance),
            return_dict=False,
        )[0]
    return out.numpy()


# ---------------------------------------------------------------------------------------------------------
# Text encoders and tokenizers (HunyuanVideo's Llama and CLIP).

# Llama-3's pre-tokenizer split (public tokenizer.json data), so that the tiny tokenizer behaves like the real one.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<pad>",
]
LLAMA_PROMPTS = [
    "A chipmunk eats a nut in the autumn forest, soft light.",
    "cat",
    "The camera pans slowly across 1234 snowy mountains while a red kite, tiny and far away, drifts east.",
]


def llama_hf_config(cfg: LlamaConfig) -> transformers.LlamaConfig:
    """The transformers LlamaConfig of ``cfg`` (eager attention)."""
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type == "llama3":
        rope.update(
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_positions,
        )
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_eps,
        rope_parameters=rope,
        max_position_embeddings=4 * cfg.rope_original_max_positions,
        attn_implementation="eager",
    )


def torch_llama(cfg: LlamaConfig, seed: int) -> transformers.LlamaModel:
    """A transformers LlamaModel of ``cfg``, every parameter random (RMS norm weights 1 + 0.1 randn)."""
    model = transformers.LlamaModel(llama_hf_config(cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "embed" in name else 0.15))
    return model.eval()


@pytest.fixture(scope="module", name="tokenizer_dir")
def tokenizer_dir_fixture(tmp_path_factory):
    """Fixture ``tokenizer_dir`` (import this function into a test module to use it): a tiny Llama-3-like
    tokenizer directory: byte-level BPE, chat special tokens, <|begin_of_text|> prepended, <pad>."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=LLAMA_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([HUNYUAN_VIDEO_TEMPLATE.template.format(p) for p in LLAMA_PROMPTS] * 3, trainer)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    d = tmp_path_factory.mktemp("llama_tokenizer")
    tok.save(str(d / "tokenizer.json"))
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<pad>"}, "bos_token": bos}))
    (d / "tokenizer_config.json").write_text(json.dumps({"padding_side": "right"}))
    return d


def hf_llama_tokenizer(directory) -> transformers.PreTrainedTokenizerFast:
    """transformers' fast tokenizer over ``tokenizer_dir``'s file, configured as the HunyuanVideo release's."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<pad>",
        padding_side="right",
    )


def write_sharded(model, directory, prefix: str, extra: dict[str, np.ndarray], hf_config: dict) -> None:
    """Two safetensors shards + index + config.json, as transformers' save_pretrained writes them."""
    directory.mkdir(parents=True)
    tensors = {**torch_state(model, prefix), **extra}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(directory / fname))
        weight_map.update({k: fname for k in keys})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(hf_config))


def torch_clip(cfg: CLIPTextConfig, seed: int) -> transformers.CLIPTextModel:
    """A transformers CLIPTextModel of ``cfg`` (eager attention), every parameter random (LayerNorm weights in
    [0.5, 1.5))."""
    hf = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        layer_norm_eps=cfg.eps,
        hidden_act=cfg.activation,
        eos_token_id=cfg.eos_token_id,
        bos_token_id=0,
        pad_token_id=1,
        attn_implementation="eager",
    )
    model = transformers.CLIPTextModel(hf)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def clip_tokenizer_files(directory) -> dict[str, int]:
    """Writes a tiny CLIP BPE vocabulary (vocab.json, merges.txt: bytes, a few merges, the two specials) into
    ``directory``; returns the vocabulary."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("a", "n"), ("an", "d</w>"), ("t", "h")]
    merges += [("th", "e</w>"), ("o", "f</w>"), ("a", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return vocab
