"""HunyuanVideo VAE: parity with diffusers ``AutoencoderKLHunyuanVideo`` on a tiny random config (plain, temporally
tiled and spatially tiled decode; plain and temporally tiled encode), frame validation, converter, full-size count.

Parity bound: max |ours - torch| / max |torch| <= REL_TOL in float32, every parameter randomised (GroupNorm weights
1 + 0.1 randn and biases, conv and linear biases), weights round-tripped through safetensors and the converter.
Shapes are chosen so that the tests share the jitted tile shapes (each tile shape compiles the tiny model once).
"""

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo
from flax import nnx
from safetensors.numpy import save_file

from convert_weights import hunyuan_vae as conv
from convert_weights.common import ConversionError
from models.vae import hunyuan_vae as hv
from models.vae.hunyuan_vae import HUNYUAN_VAE, NO_TILING, HunyuanVAE, Tiling

REL_TOL = 2e-5  # measured: <= 3e-6 (see docs/HUNYUAN_VAE.md)
CFG = hv.tiny_config()


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _torch_vae(cfg=CFG, seed: int = 0) -> AutoencoderKLHunyuanVideo:
    model = AutoencoderKLHunyuanVideo(
        latent_channels=cfg.latent_channels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):  # GroupNorm scales (norm1/2, group_norm, conv_norm_out)
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
    return model.eval()


def _np(sd) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in sd.items()}


def _convert_cli(src, dst) -> None:
    parser = argparse.ArgumentParser()
    conv.add_arguments(parser)
    assert conv.run(parser.parse_args(["--src", str(src), "--dst", str(dst), "--no-hash"])) == 0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(torch model, its state dict, our VAE converted from a diffusers vae/ folder through the CLI)."""
    model = _torch_vae()
    sd = _np(model.state_dict())
    src = tmp_path_factory.mktemp("hvae_src") / "vae"
    src.mkdir()
    save_file(sd, str(src / "diffusion_pytorch_model.safetensors"))
    model.save_config(src)  # norm_num_groups (not in any tensor shape) comes from here
    dst = tmp_path_factory.mktemp("hvae_dst") / "ckpt"
    _convert_cli(src.parent, dst)  # a pipeline directory: uses vae/
    return model, sd, hv.load(dst)


def _latents(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_decode_encode_parity(pair):
    model, _, vae = pair
    latents = _latents((2, CFG.latent_channels, 2, 3, 2), 1)  # transformer-space latents, 2 latent frames
    video = torch.rand(2, 3, 9, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref = model.decode(latents / CFG.scaling_factor).sample.numpy()  # the pipeline's call
        post = model.encode(video).latent_dist
    ours = hv.decode(vae, jnp.asarray(latents.numpy()))
    assert ours.shape == (2, 3, 5, 24, 16)
    assert _rel_err(ours, ref) <= REL_TOL
    ours_post = vae.encode(jnp.asarray(video.numpy()))
    assert ours_post.mean.shape == (2, CFG.latent_channels, 3, 2, 3)
    assert _rel_err(ours_post.mean, post.mean.numpy()) <= REL_TOL
    assert _rel_err(ours_post.logvar, post.logvar.numpy()) <= REL_TOL
    # Channels-last and raw latents go through the same compiled tiles.
    raw = np.moveaxis(latents.numpy() / CFG.scaling_factor, 1, -1)
    last = vae.decode(jnp.asarray(raw), scaled=False, channels_last=True)
    assert _rel_err(last, np.moveaxis(ref, 1, -1)) <= REL_TOL
    sample = ours_post.sample(jax.random.key(0))
    assert sample.shape == ours_post.mean.shape and float(jnp.max(jnp.abs(sample - ours_post.mean))) > 0


def test_temporal_tiled_decode(pair):
    """5 latent frames > 16 // 4: diffusers' default decode tiles time (latent tiles [0:5], [3:5], blended)."""
    model, _, vae = pair
    latents = _latents((2, CFG.latent_channels, 5, 3, 2), 3)
    with torch.no_grad():
        ref = model.decode(latents).sample.numpy()
    ours = hv.decode(vae, jnp.asarray(latents.numpy()), scaled=False)
    assert ours.shape == (2, 3, 17, 24, 16)
    assert _rel_err(ours, ref) <= REL_TOL
    whole = hv.decode(vae, jnp.asarray(latents.numpy()), scaled=False, tiling=NO_TILING)  # same tile shape as [0:5]
    assert _rel_err(whole, ref) > 100 * REL_TOL  # tiling changes the numbers: the parity above is not vacuous


def test_spatial_tiled_decode(pair):
    """``enable_tiling`` with 24 px tiles every 16 px on 32x32 px: 2x2 tiles of 3 and 2 latent rows / columns."""
    model, _, vae = pair
    latents = _latents((2, CFG.latent_channels, 2, 4, 4), 4)
    sizes = dict(min_height=24, min_width=24, stride_height=16, stride_width=16)
    model.enable_tiling(
        tile_sample_min_height=24, tile_sample_min_width=24, tile_sample_stride_height=16, tile_sample_stride_width=16
    )
    try:
        with torch.no_grad():
            ref = model.decode(latents).sample.numpy()
    finally:
        model.disable_tiling()
    ours = hv.decode(vae, jnp.asarray(latents.numpy()), scaled=False, tiling=Tiling(spatial=True, **sizes))
    assert ours.shape == (2, 3, 5, 32, 32)
    assert _rel_err(ours, ref) <= REL_TOL


def test_temporal_tiled_encode(pair):
    """21 frames > 16: diffusers' default encode tiles time (frames [0:17], [12:21], blended over 1 latent frame)."""
    model, _, vae = pair
    video = torch.rand(2, 3, 21, 16, 24, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        post = model.encode(video).latent_dist
    ours = hv.encode(vae, jnp.asarray(video.numpy()))
    assert ours.mean.shape == (2, CFG.latent_channels, 6, 2, 3)
    assert _rel_err(ours.mean, post.mean.numpy()) <= REL_TOL
    assert _rel_err(ours.logvar, post.logvar.numpy()) <= REL_TOL


def test_spatial_tiled_encode_stitching(pair):
    """``enable_tiling`` with 16x24 px tiles every 16x24 px on 32x24 px: two stacked tiles, no blend (the blends
    are the decode's, tested above); the tile shape is the plain encode's, so nothing new compiles."""
    model, _, vae = pair
    video = torch.rand(2, 3, 9, 32, 24, generator=torch.Generator().manual_seed(6)) * 2 - 1
    model.enable_tiling(
        tile_sample_min_height=16, tile_sample_min_width=24, tile_sample_stride_height=16, tile_sample_stride_width=24
    )
    try:
        with torch.no_grad():
            post = model.encode(video).latent_dist
    finally:
        model.disable_tiling()
    sizes = dict(min_height=16, min_width=24, stride_height=16, stride_width=24)
    ours = hv.encode(vae, jnp.asarray(video.numpy()), tiling=Tiling(spatial=True, **sizes))
    assert ours.mean.shape == (2, CFG.latent_channels, 3, 4, 3)
    assert _rel_err(ours.mean, post.mean.numpy()) <= REL_TOL
    assert _rel_err(ours.logvar, post.logvar.numpy()) <= REL_TOL


def test_frame_and_shape_validation(pair):
    _, _, vae = pair
    assert [hv.latent_frames(t) for t in (1, 5, 129)] == [1, 2, 33]
    assert [hv.frames_for_latents(f) for f in (1, 2, 33)] == [1, 5, 129]
    for bad in (0, 8, 130):
        with pytest.raises(ValueError, match="4k \\+ 1"):
            hv.latent_frames(bad)
    with pytest.raises(ValueError, match="positive"):
        hv.frames_for_latents(0)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        hv.encode(vae, jnp.zeros((1, 3, 8, 16, 16), jnp.float32))
    with pytest.raises(ValueError, match="divisible by 8"):
        hv.encode(vae, jnp.zeros((1, 3, 5, 16, 12), jnp.float32))
    with pytest.raises(ValueError, match="latents must be"):
        hv.decode(vae, jnp.zeros((1, CFG.latent_channels + 1, 2, 2, 2), jnp.float32))
    with pytest.raises(ValueError, match="multiples of 8"):
        hv.decode(vae, jnp.zeros((1, CFG.latent_channels, 2, 2, 2), jnp.float32), tiling=Tiling(stride_height=12))
    with pytest.raises(ValueError, match="levels give"):
        hv.HunyuanVAEConfig(block_out_channels=(8, 8), norm_num_groups=4)
    with pytest.raises(ValueError, match="must divide"):
        hv.HunyuanVAEConfig(norm_num_groups=3)


def test_converter_strict_and_release_layout(pair, tmp_path):
    _, sd, vae = pair
    assert conv.infer_config(sd, norm_num_groups=CFG.norm_num_groups) == CFG
    w = dict(sd)
    w["encoder.extra.weight"] = np.zeros((3,), np.float32)
    del w["decoder.up_blocks.1.upsamplers.0.conv.conv.bias"]
    w["decoder.mid_block.attentions.0.to_k.weight"] = np.zeros((5, 16), np.float32)
    with pytest.raises(ConversionError) as info:
        conv.convert_tensors(w, CFG)
    msg = str(info.value)
    assert "encoder.extra.weight" in msg
    assert "decoder.up_blocks.1.upsamplers.0.conv.conv.bias" in msg
    assert "decoder.mid_block.attentions.0.to_k.weight" in msg
    with pytest.raises(ConversionError, match="not a HunyuanVideo VAE"):
        conv.convert_tensors({"x.weight": np.zeros((1,), np.float32)})
    # The release layout: diffusers names (optionally 'vae.'-prefixed) + AutoencoderKLCausal3D's config.json.
    src = tmp_path / "vae"
    src.mkdir()
    save_file({f"vae.{k}": v for k, v in sd.items()}, str(src / "pytorch_model.safetensors"))
    release = {"_class_name": "AutoencoderKLCausal3D", "act_fn": "silu", "time_compression_ratio": 4}
    release.update(block_out_channels=list(CFG.block_out_channels), norm_num_groups=CFG.norm_num_groups)
    (src / "config.json").write_text(json.dumps(release))
    manifest = conv.convert(src / "pytorch_model.safetensors", tmp_path / "ckpt", hash_sources=False)
    assert manifest["source_format"] == "original" and manifest["config"] == CFG.to_dict()
    ours = dict(nnx.to_flat_state(nnx.state(hv.load(tmp_path / "ckpt"), nnx.Param)))
    theirs = nnx.to_flat_state(nnx.state(vae, nnx.Param))
    assert all(np.array_equal(np.asarray(v.get_value()), np.asarray(ours[p].get_value())) for p, v in theirs)
    release["layers_per_block"] = 3
    (src / "config.json").write_text(json.dumps(release))
    with pytest.raises(ConversionError, match="disagrees"):
        conv.convert(src, tmp_path / "ckpt2", hash_sources=False)
    pt = tmp_path / "pytorch_model.pt"
    pt.write_bytes(b"")
    with pytest.raises(ConversionError, match="pickles"):
        conv.convert(pt, tmp_path / "ckpt3")


def test_full_size_count_and_shapes():
    with torch.device("meta"):
        ref = AutoencoderKLHunyuanVideo()
    ref_count = sum(p.numel() for p in ref.parameters())
    assert conv.param_count(HUNYUAN_VAE) == ref_count
    bf16 = jnp.bfloat16
    abstract = nnx.eval_shape(lambda: HunyuanVAE(HUNYUAN_VAE, rngs=nnx.Rngs(0), dtype=bf16, param_dtype=bf16))
    # 33 frames at 480x848 (9 x 60 x 106 latents; default tiling: time tiles of 5, 5 and 3 latent frames), traced
    # without computing.
    latents = jax.ShapeDtypeStruct((1, 16, 9, 60, 106), bf16)
    video = jax.eval_shape(lambda v, z: hv.decode(v, z), abstract, latents)
    assert (video.shape, video.dtype) == ((1, 3, 33, 480, 848), bf16)
