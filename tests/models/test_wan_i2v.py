"""Wan2.1 image-to-video: the conditioning tensor against diffusers' ``WanImageToVideoPipeline.prepare_latents``,
a whole I2V generation against the diffusers pipeline (tiny random transformer, VAE and CLIP vision tower, every
parameter randomised, image preprocessing and CLIP encoding included), argument errors, the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image
from transformers import CLIPVisionConfig as HFVisionConfig
from transformers import CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from convert_weights import clip_vision as conv_clip
from convert_weights import wan as conv_wan
from convert_weights import wan_vae as conv_vae
from models.wan import tiny_config
from models.wan.sampling import first_frame_mask, generate, image_condition, video_image
from tests.models.helpers import diffusers_unipc, rel, wan_torch_model
from tests.models.test_clip_vision import _randomise
from tests.models.test_wan_vae import _torch_vae

FRAMES, HEIGHT, WIDTH = 5, 64, 96  # latents 2 x 8 x 12
LATENT = (2, 8, 12)
STEPS, SHIFT, GUIDE = 4, 5.0, 4.0
TEXT_LEN = 512  # diffusers splits image tokens off the context assuming exactly 512 text tokens
CFG = tiny_config(i2v=True, in_channels=12, num_layers=2)  # noise 4 + mask 4 + tiny VAE latents 4


@pytest.fixture(scope="module")
def parts():
    """Tiny random torch models (transformer, VAE, CLIP tower) and ours converted from their state dicts."""
    tm = wan_torch_model(CFG, seed=3)
    tv = _torch_vae(seed=4)
    hf = HFVisionConfig(
        hidden_size=CFG.image_dim,
        intermediate_size=36,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        hidden_act="gelu",
    )
    tc = _randomise(CLIPVisionModel(hf), 5)
    sd = lambda m: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    model = conv_wan.to_model(CFG, conv_wan.convert_tensors(sd(tm), CFG))
    vcfg = conv_vae.infer_config(sd(tv), latents_mean=tv.config.latents_mean, latents_std=tv.config.latents_std)
    vae = conv_vae.to_model(vcfg, conv_vae.convert_tensors(sd(tv), vcfg))
    ccfg = conv_clip.infer_config(sd(tc), num_heads=4)
    clip = conv_clip.to_model(ccfg, conv_clip.convert_tensors(sd(tc), ccfg))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8))
    return tm, tv, tc, model, vae, clip, image


def _pipeline(parts) -> WanImageToVideoPipeline:
    tm, tv, tc, *_ = parts
    processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tv,
        scheduler=diffusers_unipc(SHIFT),
        image_processor=processor,
        image_encoder=tc,
        transformer=tm,
    )


def test_condition_matches_diffusers_prepare_latents(parts):
    """The first frame as the VAE sees it, the mask channels and the normalised latents of [image, zeros]."""
    *_, vae, _, image = parts
    pipe = _pipeline(parts)
    want_image = pipe.video_processor.preprocess(image, height=HEIGHT, width=WIDTH)
    got_image = video_image(image, WIDTH, HEIGHT)
    np.testing.assert_array_equal(got_image, want_image.numpy())
    noise = torch.randn(2, 4, *LATENT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, want = pipe.prepare_latents(want_image, 2, 4, HEIGHT, WIDTH, FRAMES, torch.float32, "cpu", None, noise)
    got = image_condition(vae, np.repeat(got_image, 2, axis=0), FRAMES)
    assert got.shape == want.shape == (2, 8, *LATENT)
    np.testing.assert_array_equal(np.asarray(got[:, :4]), want[:, :4].numpy())
    assert want[:, :4, 0].min() == 1 and want[:, :4, 1:].max() == 0
    assert rel(got[:, 4:], want[:, 4:].numpy()) <= 1e-5  # measured 1.4e-6
    m = first_frame_mask(1, 9, 16, 16)  # 3 latent frames
    assert m.shape == (1, 4, 3, 2, 2) and m[:, :, 0].all() and not m[:, :, 1:].any()


def test_generation_matches_diffusers_i2v_pipeline(parts):
    """CFG 4, UniPC, 4 steps: diffusers encodes the image (CLIPImageProcessorPil + CLIPVisionModel hidden_states[-2])
    and the condition itself; we run preprocess + our CLIP + image_condition + generate on the same image."""
    from models.wan.generate import image_inputs

    *_, model, vae, clip, image = parts
    rng = np.random.default_rng(7)
    text = rng.standard_normal((1, TEXT_LEN, CFG.text_dim)).astype(np.float32)
    neg = rng.standard_normal((1, TEXT_LEN, CFG.text_dim)).astype(np.float32)
    noise = rng.standard_normal((1, CFG.out_channels, *LATENT)).astype(np.float32)
    with torch.no_grad():
        want = (
            _pipeline(parts)(
                image=image,
                prompt_embeds=torch.tensor(text),
                negative_prompt_embeds=torch.tensor(neg),
                height=HEIGHT,
                width=WIDTH,
                num_frames=FRAMES,
                num_inference_steps=STEPS,
                guidance_scale=GUIDE,
                latents=torch.tensor(noise),
                output_type="latent",
            )
            .frames.float()
            .numpy()
        )
    tokens, condition = image_inputs(image, clip, vae, frames=FRAMES, width=WIDTH, height=HEIGHT)
    assert tokens.shape == (1, 5, CFG.image_dim) and condition.shape == (1, 8, *LATENT)
    got = generate(
        model,
        text,
        neg,
        frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        steps=STEPS,
        guidance=GUIDE,
        shift=SHIFT,
        noise=noise,
        image=tokens,
        condition=condition,
        progress=False,
    )
    assert got.latents.shape == (1, CFG.out_channels, *LATENT)
    assert rel(got.latents, want) <= 1e-5  # measured 7.2e-7
    # The image matters: another first frame moves the result far beyond that bound.
    other = Image.fromarray(255 - np.asarray(image))
    tokens2, condition2 = image_inputs(other, clip, vae, frames=FRAMES, width=WIDTH, height=HEIGHT)
    kw = dict(frames=FRAMES, height=HEIGHT, width=WIDTH, steps=STEPS, guidance=GUIDE, shift=SHIFT, noise=noise)
    moved = generate(model, text, neg, image=tokens2, condition=condition2, progress=False, **kw)
    assert rel(moved.latents, want) > 1e-2


def test_i2v_arguments_are_checked(parts):
    *_, model, _, _, _ = parts
    text = np.zeros((1, 8, CFG.text_dim), np.float32)
    kw = dict(frames=FRAMES, height=HEIGHT, width=WIDTH, steps=1, guidance=1.0, progress=False)
    with pytest.raises(ValueError, match="image-to-video model: pass image="):
        generate(model, text, **kw)
    tokens = np.zeros((1, 5, CFG.image_dim), np.float32)
    with pytest.raises(ValueError, match=r"condition must be \[1 or 1, 8, 2, 8, 12\]"):
        generate(model, text, image=tokens, condition=np.zeros((1, 4, *LATENT), np.float32), **kw)
    with pytest.raises(ValueError, match="CLIP tokens"):
        generate(model, text, image=tokens[..., :3], condition=np.zeros((1, 8, *LATENT), np.float32), **kw)
    with pytest.raises(ValueError, match=r"image must be \[B, 3, H, W\]"):
        image_condition(parts[4], np.zeros((1, 4, HEIGHT, WIDTH), np.float32), FRAMES)
    with pytest.raises(ValueError, match=r"frames 6 is not 4k\+1"):
        image_condition(parts[4], np.zeros((1, 3, HEIGHT, WIDTH), np.float32), 6)


def test_t2v_model_refuses_image_inputs():
    from models.wan.generate import random_model

    model = random_model(tiny_config(num_layers=1), "float32")
    text = np.zeros((1, 8, 24), np.float32)
    with pytest.raises(ValueError, match="this is a T2V model"):
        generate(
            model,
            text,
            frames=FRAMES,
            height=HEIGHT,
            width=WIDTH,
            guidance=1.0,
            image=np.zeros((1, 5, 20), np.float32),
            condition=np.zeros((1, 8, *LATENT), np.float32),
        )


# ---------------------------------------------------------------------------------------------------------
# The CLI.


def _cli(tmp_path, *extra):
    from models.wan.generate import main

    return main(["--random-weights", "--tiny", "--no-progress", "--out-dir", str(tmp_path / "out"), *extra])


@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called")
def test_cli_image_to_video_end_to_end_tiny(tmp_path, capsys):
    png = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 70, 4), dtype=np.uint8)).save(png)  # RGBA
    size = ["--frames", "5", "--size", "96x64", "--steps", "3", "--dense", "--dtype", "float32"]
    rc = _cli(tmp_path, "--image", str(png), "--random-vae", *size)
    assert rc == 0, capsys.readouterr().err
    lat = np.load(tmp_path / "out" / "latents.npy")
    assert lat.shape == (1, 4, *LATENT) and np.isfinite(lat).all()
    report = (tmp_path / "out" / "report.txt").read_text()
    assert "image-to-video from" in report and "tiny random" in report
    out = capsys.readouterr().out
    assert "5 CLIP tokens" in out and "video_0.mp4" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "{png}"], "encodes the first frame with the VAE"),
        (["--image", "{tmp}/missing.png", "--random-vae"], "missing.png does not exist"),
        (["--image", "{tmp}/bad.png", "--random-vae"], "not a readable image"),
        (["--clip-vision", "{tmp}"], "--clip-vision is for image-to-video"),
    ],
)
def test_cli_i2v_arguments_are_checked_before_compute(tmp_path, capsys, args, message):
    png = tmp_path / "first.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    args = [a.format(png=png, tmp=tmp_path) for a in args]
    assert _cli(tmp_path, "--frames", "5", "--size", "64x64", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "latents.npy").exists()


def test_cli_model_and_image_must_agree(tmp_path, capsys):
    from models.wan.generate import main

    png = tmp_path / "first.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    size = ["--frames", "5", "--size", "64x64", "--out-dir", str(tmp_path)]
    assert main(["--random-weights", "--variant", "t2v-1.3b", "--image", str(png), *size]) == 2
    assert "--image needs an image-to-video model" in capsys.readouterr().err
    assert main(["--random-weights", "--variant", "i2v-14b", *size]) == 2
    assert "give the first frame with --image" in capsys.readouterr().err
    for name, manifest in [
        ("ckpt", {"model": "wan", "config": CFG.to_dict()}),
        ("vae", {"model": "wan_vae", "config": {"z_dim": 4}}),
        ("clip", {"model": "clip_vision", "config": {"width": 16}}),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    i2v = ["--checkpoint", str(tmp_path / "ckpt"), "--vae", str(tmp_path / "vae"), *size]
    assert main(i2v) == 2
    assert "image-to-video model: give the first frame with --image" in capsys.readouterr().err
    assert main([*i2v, "--image", str(png)]) == 2
    assert "needs the CLIP image encoder: --clip-vision DIR" in capsys.readouterr().err
    assert main([*i2v, "--image", str(png), "--clip-vision", str(tmp_path / "clip")]) == 2
    assert "the CLIP encoder has width 16, the model takes image tokens of 20" in capsys.readouterr().err
