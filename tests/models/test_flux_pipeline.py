"""FLUX.1 end to end on a tiny random pipeline: a diffusers-layout download (tiny transformers T5 / CLIP, diffusers
Flux transformer and AutoencoderKL, tokenizer files built here) -> ``convert_weights flux-pipeline`` ->
``FluxPipeline.load`` -> prompt -> uint8 images and PNGs, plus the errors for bad inputs."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import models, pre_tokenizers, processors

from convert_weights import __main__ as convert_cli
from convert_weights.common import ConversionError
from convert_weights.flux_pipeline import convert
from models.flux import generate as generate_cli
from models.flux.pipeline import FluxPipeline
from tests.models.test_flux_support import tiny_diffusers

T5_LEN = 8


def _t5_tokenizer(directory):
    pieces = ["<pad>", "</s>", "<unk>", "▁a", "▁photo", "▁of", "▁cat", "▁dog", "s", "▁the", "▁"]
    pieces += list("abcdefghijklmnopqrstuvwxyz")
    vocab = [(p, 0.0 if i < 3 else -1.0 - 0.1 * i) for i, p in enumerate(pieces)]
    tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))


def _clip_tokenizer(directory) -> int:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir()
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return len(vocab)


def _download(root):
    """A FLUX.1-dev diffusers download with tiny random models (context 24, pooled 12, 16 packed channels)."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    root.mkdir()
    tiny_diffusers(guidance=True).save_pretrained(root / "transformer", safe_serialization=True)
    t5 = transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=48,
            d_model=24,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=3,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
        )
    )
    t5.save_pretrained(root / "text_encoder_2", safe_serialization=True)
    clip_vocab = _clip_tokenizer(root / "tokenizer")
    clip = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=clip_vocab,
            hidden_size=12,
            intermediate_size=20,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=clip_vocab - 2,
            pad_token_id=1,
            eos_token_id=2,
        )
    )
    clip.save_pretrained(root / "text_encoder", safe_serialization=True)
    _t5_tokenizer(root / "tokenizer_2")
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[4, 4, 8, 8],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=0.5,
        shift_factor=0.1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae.save_pretrained(root / "vae", safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("flux_pipeline")
    src = _download(base / "FLUX.1-tiny")
    dst = base / "converted"
    argv = ["flux-pipeline", "--src", str(src), "--dst", str(dst), "--dtype", "fp32", "--no-hash"]
    assert convert_cli.main(argv) == 0
    return src, dst


@pytest.fixture(scope="module")
def pipe(converted):
    return FluxPipeline.load(converted[1], t5_max_length=T5_LEN)


def test_layout_and_manifests(converted):
    _, dst = converted
    top = json.loads((dst / "manifest.json").read_text())
    assert top["model"] == "flux-pipeline" and top["variant"] == "dev" and top["dtype"] == "float32"
    for comp, model in (("transformer", "flux"), ("text_encoder_t5", "t5"), ("text_encoder_clip", "clip_text")):
        assert json.loads((dst / comp / "manifest.json").read_text())["model"] == model
    vae = json.loads((dst / "vae" / "manifest.json").read_text())
    # Latent normalisation comes from the diffusers vae/config.json, not the Flux defaults.
    assert vae["config"]["scaling_factor"] == 0.5 and vae["config"]["shift_factor"] == 0.1
    assert (dst / "tokenizer" / "merges.txt").exists() and (dst / "tokenizer_2" / "tokenizer.json").exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(".converted.tmp-")]


def test_encode_matches_torch(converted, pipe):
    """Our T5 / CLIP on our tokenizers' ids agree with the transformers models on the same ids."""
    import transformers

    src, _ = converted
    prompts = ["a photo of a cat", "dogs"]
    t5, pooled = pipe.encode(prompts)
    assert t5.shape == (2, T5_LEN, 24) and pooled.shape == (2, 12)
    ids_t5 = torch.tensor(pipe.t5_tokenizer(prompts).input_ids, dtype=torch.long)
    ids_clip = torch.tensor(pipe.clip_tokenizer(prompts).input_ids, dtype=torch.long)
    with torch.no_grad():
        ref_t5 = transformers.T5EncoderModel.from_pretrained(src / "text_encoder_2")(ids_t5).last_hidden_state
        ref_clip = transformers.CLIPTextModel.from_pretrained(src / "text_encoder")(ids_clip).pooler_output
    np.testing.assert_allclose(np.asarray(t5), ref_t5.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(pooled), ref_clip.numpy(), rtol=1e-4, atol=1e-4)


def test_generate_images(pipe):
    out = pipe.generate(["a cat", "a dog"], width=48, height=32, steps=3, seed=1, num_images=2)
    assert out.images.shape == (4, 32, 48, 3) and out.images.dtype == np.uint8
    assert out.images.std() > 0
    # The same request again: no step is recompiled and the images are identical.
    again = pipe.generate(["a cat", "a dog"], width=48, height=32, steps=3, seed=1, num_images=2)
    assert out.generation.report.compile_s and again.generation.report.compile_s == {}
    np.testing.assert_array_equal(again.images, out.images)
    other = pipe.generate(["a cat", "a dog"], width=48, height=32, steps=3, seed=2, num_images=2)
    assert not np.array_equal(other.images, out.images)


def test_cli_writes_pngs(converted, tmp_path, capsys):
    from PIL import Image

    _, dst = converted
    out = tmp_path / "img.png"
    argv = ["--checkpoint", str(dst), "--prompt", "a cat", "--out", str(out), "--width", "32", "--height", "48"]
    argv += ["--steps", "2", "--dense", "--num-images", "2", "--t5-max-length", str(T5_LEN)]
    assert generate_cli.main(argv + ["--loop"], stdin=io.StringIO("a dog\n\n")) == 0
    files = sorted(tmp_path.glob("img*.png"))
    assert [f.name for f in files] == ["img-1_0.png", "img-1_1.png", "img_0.png", "img_1.png"]
    with Image.open(files[2]) as im:
        assert im.size == (32, 48) and im.mode == "RGB"
    printed = capsys.readouterr().out
    # The loop's second prompt reuses every compiled step.
    assert printed.count("denoising total") == 2 and "all step kinds already compiled" in printed


def test_missing_component(converted, tmp_path, capsys):
    src, _ = converted
    broken = tmp_path / "src"
    shutil.copytree(src, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ConversionError, match=r"text_encoder_2"):
        convert(broken, tmp_path / "dst", dtype="fp32", hash_sources=False)
    assert not (tmp_path / "dst").exists()
    argv = ["flux-pipeline", "--src", str(broken), "--dst", str(tmp_path / "dst"), "--no-hash"]
    assert convert_cli.main(argv) == 2
    assert "text_encoder_2" in capsys.readouterr().err


def test_missing_tokenizer_files(converted, tmp_path, capsys):
    _, dst = converted
    broken = tmp_path / "ckpt"
    shutil.copytree(dst, broken)
    (broken / "tokenizer_2" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        FluxPipeline.load(broken, t5_max_length=T5_LEN)
    shutil.rmtree(broken / "tokenizer")
    argv = ["--checkpoint", str(broken), "--prompt", "x", "--out", str(tmp_path / "o.png")]
    assert generate_cli.main(argv) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_bad_requests(converted, pipe, tmp_path, capsys):
    with pytest.raises(ValueError, match="at least one"):
        pipe.generate([], width=32, height=32, steps=1)
    with pytest.raises(ValueError, match="width 40 is not a multiple of 16"):
        pipe.generate("x", width=40, height=32, steps=1)
    with pytest.raises(ValueError, match="multiple of 128"):
        pipe.generate("x", width=32, height=32, steps=1, chipmunk=__import__("chipmunk_jax").preset("flux"))
    _, dst = converted
    out = str(tmp_path / "o.png")
    for argv, msg in (
        (["--checkpoint", str(dst), "--out", out], "--prompt"),
        (["--checkpoint", str(dst), "--prompt", "x", "--out", out, "--width", "1000"], "width 1000"),
        (["--checkpoint", str(dst), "--prompt", "x", "--out", out, "--dense", "--height", "40"], "height 40"),
        (["--checkpoint", str(tmp_path / "nope"), "--prompt", "x", "--out", out], "does not exist"),
    ):
        assert generate_cli.main(argv) == 2
        assert msg in capsys.readouterr().err


def test_generate_chipmunk(pipe):
    import chipmunk_jax

    out = pipe.generate("a cat", width=128, height=128, steps=4, seed=0, chipmunk=chipmunk_jax.preset("flux"))
    assert out.images.shape == (1, 128, 128, 3) and out.images.dtype == np.uint8
    report = out.generation.report
    assert len(report.step_times) > 1, report.step_times  # full and sparse step kinds both ran
    assert 0.0 < report.stats["attention density (keys kept / keys)"] <= 1.0


def test_full_size_components_fit_together():
    """The released FLUX.1 component shapes assemble (abstractly, nothing allocated); a mismatched one is refused."""
    from flax import nnx

    from models.flux.config import FLUX_DEV
    from models.flux.model import Flux
    from models.text_encoders.clip import CLIP_L, CLIPTextEncoder
    from models.text_encoders.t5 import T5_XXL, T5Encoder
    from models.vae.flux_ae import AE_TINY, FLUX_AE, FluxAutoencoder

    def abstract(cls, cfg):
        return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))

    flux, t5, clip = abstract(Flux, FLUX_DEV), abstract(T5Encoder, T5_XXL), abstract(CLIPTextEncoder, CLIP_L)
    FluxPipeline(flux, t5, clip, abstract(FluxAutoencoder, FLUX_AE), None, None)
    with pytest.raises(ValueError, match="downsamples by 4"):
        FluxPipeline(flux, t5, clip, abstract(FluxAutoencoder, AE_TINY), None, None)
