"""Mochi 1 VAE: parity with diffusers ``AutoencoderKLMochi`` on a tiny random config, tiling, converter.

Parity bound: max |ours - torch| / max |torch| <= 2e-5 in float32 (measured about 1e-6), every parameter
(group norm weights and biases included) randomised, weights round-tripped through safetensors and the
``mochi-vae`` CLI.
"""

import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLMochi
from flax import nnx
from safetensors.numpy import save_file

from convert_weights import mochi_vae as conv
from convert_weights.__main__ import main as convert_main
from convert_weights.common import ConversionError
from models.vae import mochi_vae
from models.vae.mochi_vae import MOCHI_VAE, MochiTiling, MochiVAE, MochiVAEConfig

REL_TOL = 2e-5
CFG = MochiVAEConfig.tiny_config()


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _torch_vae(cfg: MochiVAEConfig = CFG, seed: int = 0) -> AutoencoderKLMochi:
    model = AutoencoderKLMochi(
        encoder_block_out_channels=cfg.encoder_block_out_channels,
        decoder_block_out_channels=cfg.decoder_block_out_channels,
        layers_per_block=cfg.layers_per_block,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("norm_layer.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))  # group norm scales
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))  # every bias, group norm biases included
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(torch model, its diffusers state dict, our VAE converted from a safetensors file via the CLI)."""
    model = _torch_vae()
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    src = tmp_path_factory.mktemp("mochi_src") / "vae"
    src.mkdir()
    save_file(sd, str(src / "diffusion_pytorch_model.safetensors"))
    model.save_config(src)  # config.json as diffusers writes it; its fields are checked against the shapes
    dst = tmp_path_factory.mktemp("mochi_dst") / "ckpt"
    assert convert_main(["mochi-vae", "--src", str(src.parent), "--dst", str(dst), "--no-hash"]) == 0
    return model, sd, mochi_vae.load(dst)


def test_decode_parity_and_chunking(pair):
    """Decode of 3 latent frames (-> 13 frames), batch 2, non-square. The default chunking (a first chunk of one
    latent frame, then a scan over 2-frame chunks carrying the conv caches) matches diffusers' one-pass decode."""
    model, _, vae = pair
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 12, 3, 4, 3, generator=gen)  # transformer-space latents
    mean = torch.tensor(CFG.latents_mean).view(1, 12, 1, 1, 1)
    std = torch.tensor(CFG.latents_std).view(1, 12, 1, 1, 1)
    with torch.no_grad():  # the diffusers MochiPipeline's un-normalisation, then vae.decode
        ref = model.decode(latents * std / CFG.scaling_factor + mean).sample.numpy()
    ours = vae.decode(jnp.asarray(latents.numpy()), unnormalize=True)
    assert ours.shape == ref.shape == (2, 3, 13, 32, 24)
    assert _rel_err(ours, ref) <= REL_TOL
    # The raw-latent path and the module-level unnormalisation agree with the fused one.
    z = mochi_vae.unnormalize_latents(jnp.asarray(latents.numpy()), CFG)
    np.testing.assert_allclose(np.asarray(vae.decode(z)), np.asarray(ours), rtol=0, atol=1e-5)


def test_encode_parity(pair):
    """Encode of 13 frames (-> 3 latent frames), batch 2. The attention's pixel batching is forced on where the
    sequences are longest (first down block: 192 pixels in batches of 50 through lax.map, remainder included)."""
    model, _, vae = pair
    vae.set_attention_chunk_elements(50 * 13 * 13)
    video = torch.rand(2, 3, 13, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1  # 13 = 6 * 2 + 1
    with torch.no_grad():
        dist = model.encode(video).latent_dist
    mean, logvar = mochi_vae.encode_moments(vae, jnp.asarray(video.numpy()))
    assert mean.shape == logvar.shape == dist.mean.shape == (2, 12, 3, 2, 3)
    assert _rel_err(mean, dist.mean.numpy()) <= REL_TOL
    assert _rel_err(logvar, dist.logvar.numpy()) <= REL_TOL
    z = vae.encode(jnp.asarray(np.moveaxis(video.numpy(), 1, -1)), channels_last=True, normalize=True)
    back = mochi_vae.unnormalize_latents(z, CFG, channel_axis=-1)
    np.testing.assert_allclose(np.asarray(back), np.moveaxis(dist.mean.numpy(), 1, -1), rtol=0, atol=1e-4)


def test_tiling_matches_diffusers(pair):
    """``MochiTiling`` reproduces ``enable_tiling()``: decode over 2 x 2 overlapping tiles (both blends, in one
    pass: a single latent frame), encode over one row of three tiles (two of them the shape compiled by
    ``test_encode_parity``); tiled results differ from untiled ones, so the blends are exercised."""
    model, _, vae = pair
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 12, 1, 4, 4, generator=gen)
    tiling = MochiTiling(min_height=24, min_width=24, stride_height=16, stride_width=16)
    model.enable_tiling(tile_sample_min_height=24, tile_sample_min_width=24, tile_sample_stride_height=16,
                        tile_sample_stride_width=16)  # fmt: skip
    video = torch.rand(2, 3, 13, 16, 40, generator=gen) * 2 - 1
    try:
        with torch.no_grad():
            ref = model.decode(latents).sample.numpy()
            ref_enc = model.encode(video).latent_dist.mean.numpy()
    finally:
        model.disable_tiling()
    ours = mochi_vae.decode(vae, jnp.asarray(latents.numpy()), tiling=tiling)
    ours_enc = mochi_vae.encode(vae, jnp.asarray(video.numpy()), tiling=tiling)
    assert ours.shape == ref.shape == (1, 3, 1, 32, 32) and ours_enc.shape == ref_enc.shape == (2, 12, 3, 2, 5)
    assert _rel_err(ours, ref) <= REL_TOL
    assert _rel_err(ours_enc, ref_enc) <= REL_TOL
    with torch.no_grad():
        assert _rel_err(model.decode(latents).sample.numpy(), ref) > 1e-2
        assert _rel_err(model.encode(video).latent_dist.mean.numpy(), ref_enc) > 1e-2


def test_frames_and_shape_errors(pair):
    _, _, vae = pair
    assert [mochi_vae.latent_frames(t) for t in (1, 7, 163)] == [1, 2, 28]
    assert [mochi_vae.frames_for_latents(f) for f in (1, 2, 28)] == [1, 7, 163]
    for bad in (0, 2, 6, 8, 162):
        with pytest.raises(ValueError, match="6k \\+ 1"):
            mochi_vae.latent_frames(bad)
    with pytest.raises(ValueError, match="positive int"):
        mochi_vae.frames_for_latents(0)
    with pytest.raises(ValueError, match="6k \\+ 1"):
        vae.encode(jnp.zeros((1, 3, 8, 16, 16), jnp.float32))
    with pytest.raises(ValueError, match="divisible by 8"):
        vae.encode(jnp.zeros((1, 3, 7, 16, 12), jnp.float32))
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(jnp.zeros((1, 16, 2, 2, 2), jnp.float32))
    with pytest.raises(ValueError, match="frames_per_chunk"):
        vae.decode(jnp.zeros((1, 12, 2, 2, 2), jnp.float32), frames_per_chunk=0)
    with pytest.raises(ValueError, match="stride_height"):
        MochiTiling(min_height=16, stride_height=32)


def test_latent_statistics_and_normalisation():
    """The constants are diffusers' AutoencoderKLMochi defaults (= the genmo/mochi-1-preview vae config), and the
    un-normalisation is the MochiPipeline formula ``z * std / scaling_factor + mean`` (scaling factor not 1 here
    so that its place in the formula is checked)."""
    defaults = inspect.signature(AutoencoderKLMochi.__init__).parameters
    assert mochi_vae.LATENTS_MEAN == tuple(defaults["latents_mean"].default)
    assert mochi_vae.LATENTS_STD == tuple(defaults["latents_std"].default)
    assert mochi_vae.SCALING_FACTOR == defaults["scaling_factor"].default
    cfg = MochiVAEConfig(scaling_factor=0.7)
    z = np.random.default_rng(0).normal(size=(2, 12, 3, 2, 2)).astype(np.float32)
    mean = np.asarray(mochi_vae.LATENTS_MEAN, np.float32).reshape(1, 12, 1, 1, 1)
    std = np.asarray(mochi_vae.LATENTS_STD, np.float32).reshape(1, 12, 1, 1, 1)
    ours = mochi_vae.unnormalize_latents(jnp.asarray(z), cfg)
    np.testing.assert_allclose(np.asarray(ours), z * std / np.float32(0.7) + mean, rtol=1e-6, atol=1e-6)
    back = mochi_vae.normalize_latents(ours, cfg)
    np.testing.assert_allclose(np.asarray(back), z, rtol=1e-5, atol=1e-5)


def test_full_size_param_count_and_shapes():
    with torch.device("meta"):
        ref = AutoencoderKLMochi()
    assert conv.param_count(MOCHI_VAE) == sum(p.numel() for p in ref.parameters()) == 459_748_611
    bf16 = jnp.bfloat16
    abstract = nnx.eval_shape(lambda: MochiVAE(MOCHI_VAE, rngs=nnx.Rngs(0), dtype=bf16, param_dtype=bf16))
    # Tracing at full size in bfloat16 checks shapes and the strict dtype promotion without computing anything:
    # the release's 163 frames at 480 x 848 from 28 latent frames of 60 x 106.
    latents = jax.ShapeDtypeStruct((1, 12, 28, 60, 106), bf16)
    video = jax.eval_shape(lambda v, z: mochi_vae.decode(v, z, unnormalize=True), abstract, latents)
    assert (video.shape, video.dtype) == ((1, 3, 163, 480, 848), bf16)
    back = jax.eval_shape(lambda v, x: mochi_vae.encode(v, x), abstract, video)
    assert (back.shape, back.dtype) == ((1, 12, 28, 60, 106), bf16)


# ---------------------------------------------------------------------------------------------------------
# Converter.

_GENMO_RESNET = {"norm1.norm_layer": "stack.0", "conv1.conv": "stack.2", "norm2.norm_layer": "stack.3",
                 "conv2.conv": "stack.5"}  # fmt: skip


def _to_genmo(sd: dict, cfg: MochiVAEConfig) -> tuple[dict, dict]:
    """(encoder, decoder) state dicts with genmo's names, written from diffusers' upstream
    ``convert_mochi_vae_state_dict_to_diffusers`` read backwards (its fixed indices generalised: the encoder's
    layers are numbered flatly, block_in resnets from 1, then one entry per down block, then block_out)."""
    l0, nb = cfg.layers_per_block[0], len(cfg.decoder_block_out_channels) - 1
    enc, dec = {}, {}
    for key, value in sd.items():
        side, rest = key.split(".", 1)
        for d_name, g_name in _GENMO_RESNET.items():
            rest = rest.replace(f".{d_name}.", f".{g_name}.")
        if side == "decoder":
            rest = re.sub(r"^conv_in\.", "blocks.0.0.", rest)
            rest = re.sub(r"^block_in\.resnets\.(\d+)\.", lambda m: f"blocks.0.{int(m[1]) + 1}.", rest)
            rest = re.sub(r"^up_blocks\.(\d+)\.resnets\.", lambda m: f"blocks.{int(m[1]) + 1}.blocks.", rest)
            rest = re.sub(r"^up_blocks\.(\d+)\.proj\.", lambda m: f"blocks.{int(m[1]) + 1}.proj.", rest)
            rest = re.sub(r"^block_out\.resnets\.", f"blocks.{nb + 1}.", rest)
            dec[rest.replace("proj_out.", "output_proj.")] = value
            continue
        rest = re.sub(r"^proj_in\.", "layers.0.", rest).replace("norm_out.norm_layer.", "output_norm.")
        rest = rest.replace("proj_out.", "output_proj.")
        rest = re.sub(r"^down_blocks\.(\d+)\.conv_in\.conv\.", lambda m: f"layers.{l0 + 1 + int(m[1])}.layers.0.", rest)
        m = re.match(r"^(block_in|down_blocks\.(\d+)|block_out)\.(resnets|norms|attentions)\.(\d+)\.(.*)$", rest)
        if m:
            i = int(m[4])
            if m[1] == "block_in":
                prefix = f"layers.{i + 1}"
            elif m[1] == "block_out":
                prefix = f"layers.{l0 + 1 + nb + i}"
            else:
                prefix = f"layers.{l0 + 1 + int(m[2])}.layers.{i + 1}"
            tail = m[5]
            if m[3] == "norms":
                tail = "attn_block.norm." + tail.removeprefix("norm_layer.")
            elif m[3] == "attentions":
                if tail in ("to_k.weight", "to_v.weight"):
                    continue
                if tail == "to_q.weight":
                    base = key.removesuffix("to_q.weight")
                    value = np.concatenate([sd[base + f"to_{p}.weight"] for p in "qkv"], axis=0)
                    tail = "attn_block.attn.qkv.weight"
                else:
                    tail = "attn_block.attn.out." + tail.removeprefix("to_out.0.")
            rest = f"{prefix}.{tail}"
        enc[rest] = value
    return enc, dec


def test_genmo_layout_and_decoder_only(pair, tmp_path):
    model, sd, vae = pair
    enc, dec = _to_genmo(sd, CFG)
    assert "layers.3.layers.2.attn_block.attn.qkv.weight" in enc and "blocks.4.0.stack.5.bias" in dec
    save_file(enc, str(tmp_path / "encoder.safetensors"))
    save_file(dec, str(tmp_path / "decoder.safetensors"))
    manifest = conv.convert(tmp_path, tmp_path / "ckpt", hash_sources=False)
    assert manifest["source_format"] == "original" and manifest["num_params"] == sum(v.size for v in sd.values())
    ours = dict(nnx.to_flat_state(nnx.state(mochi_vae.load(tmp_path / "ckpt"), nnx.Param)))
    theirs = nnx.to_flat_state(nnx.state(vae, nnx.Param))
    assert all(np.array_equal(np.asarray(v.get_value()), np.asarray(ours[p].get_value())) for p, v in theirs)
    # genmo's decoder file alone: a decoder-only model with the same decoder.
    manifest = conv.convert(tmp_path / "decoder.safetensors", tmp_path / "dec", hash_sources=False)
    assert manifest["variant"] == "mochi-1-decoder" and manifest["config"]["with_encoder"] is False
    dec_vae = mochi_vae.load(tmp_path / "dec")
    dec_params = nnx.to_flat_state(nnx.state(dec_vae, nnx.Param))
    assert dec_vae.encoder is None and len(dec_params) == len([p for p, _ in theirs if p[0] == "decoder"])
    assert all(np.array_equal(np.asarray(v.get_value()), np.asarray(ours[p].get_value())) for p, v in dec_params)
    with pytest.raises(ValueError, match="no encoder"):
        dec_vae.encode(jnp.zeros((1, 3, 1, 8, 8), jnp.float32))


def test_converter_is_strict(pair):
    _, sd, _ = pair
    assert conv.infer_config(sd) == CFG
    w = dict(sd)
    w["decoder.up_blocks.0.extra.weight"] = np.zeros((3,), np.float32)
    del w["encoder.down_blocks.1.attentions.0.to_k.weight"]
    w["decoder.block_out.resnets.0.norm2.norm_layer.bias"] = np.zeros((5,), np.float32)
    with pytest.raises(ConversionError) as info:
        conv.convert_tensors(w, CFG)
    msg = str(info.value)
    assert "decoder.up_blocks.0.extra.weight" in msg
    assert "encoder.down_blocks.1.attentions.0.to_k.weight" in msg
    assert "decoder.block_out.resnets.0.norm2.norm_layer.bias" in msg
    with pytest.raises(ConversionError, match="not a Mochi VAE"):
        conv.convert_tensors({"x.weight": np.zeros((1,), np.float32)})
