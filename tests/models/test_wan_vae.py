"""Wan2.1 VAE: parity with diffusers ``AutoencoderKLWan`` on a tiny random config, chunked compilation, converter.

Parity bound: max |ours - torch| / max |torch| <= 1e-4 in float32, every parameter (RMS norm gammas included)
randomised, weights round-tripped through safetensors and ``convert_weights.wan_vae``.
"""

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from flax import nnx
from safetensors.numpy import save_file

from convert_weights import wan_vae as conv
from convert_weights.__main__ import main as convert_main
from convert_weights.common import ConversionError
from models.vae import wan_vae
from models.vae.wan_vae import WAN21_VAE, WAN_VAE_TINY, WanVAE

REL_TOL = 1e-4
CFG = WAN_VAE_TINY


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _torch_vae(cfg=CFG, seed: int = 0) -> AutoencoderKLWan:
    model = AutoencoderKLWan(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temperal_downsample),
        latents_mean=list(cfg.latents_mean),
        latents_std=list(cfg.latents_std),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                gain = 0.3 if name.startswith("decoder.conv_out") else 1.0  # keep most outputs inside [-1, 1]
                p.copy_(torch.randn(p.shape, generator=gen) * gain / math.sqrt(p[0].numel()))
    return model.eval()


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(torch model, its diffusers state dict, our VAE converted from a safetensors file via the CLI)."""
    model = _torch_vae()
    sd = _state_dict(model)
    src = tmp_path_factory.mktemp("vae_src") / "vae"
    src.mkdir()
    save_file(sd, str(src / "diffusion_pytorch_model.safetensors"))
    model.save_config(src)  # config.json as diffusers writes it: the latent statistics come from here
    dst = tmp_path_factory.mktemp("vae_dst") / "ckpt"
    assert convert_main(["wan-vae", "--src", str(src.parent), "--dst", str(dst), "--dtype", "fp32"]) == 0
    return model, sd, wan_vae.load(dst)


def test_parity_with_diffusers(pair):
    model, _, vae = pair
    gen = torch.Generator().manual_seed(1)
    video = torch.rand(2, 3, 9, 16, 24, generator=gen) * 2 - 1  # 9 frames -> 3 latent frames, non-square
    mean, std = torch.tensor(CFG.latents_mean)[None, :, None, None, None], torch.tensor(CFG.latents_std)
    std = std[None, :, None, None, None]
    latents = torch.randn(2, CFG.z_dim, 3, 2, 3, generator=gen)  # normalised, as the transformer emits them
    with torch.no_grad():
        ref_mean = model.encode(video).latent_dist.mean.numpy()
        ref_video = model.decode(latents * std + mean).sample.numpy()  # the diffusers Wan pipeline's un-normalisation
    ours_mean = wan_vae.encode(vae, jnp.asarray(video.numpy()), normalize=False)
    ours_video = wan_vae.decode(vae, jnp.asarray(latents.numpy()))
    assert ours_mean.shape == ref_mean.shape == (2, CFG.z_dim, 3, 2, 3)
    assert ours_video.shape == ref_video.shape == (2, 3, 9, 16, 24)
    assert _rel_err(ours_mean, ref_mean) <= REL_TOL
    assert _rel_err(ours_video, ref_video) <= REL_TOL
    assert np.mean(np.abs(ref_video) < 0.99) > 0.8  # the comparison is not hidden by the [-1, 1] clipping


def test_single_frame_channels_last_and_normalisation(pair):
    model, _, vae = pair
    image = torch.rand(1, 3, 1, 16, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref = model.encode(image).latent_dist.mean.numpy()
    mean = np.asarray(CFG.latents_mean)[None, :, None, None, None]
    std = np.asarray(CFG.latents_std)[None, :, None, None, None]
    ref_normalised = np.moveaxis((ref - mean) / std, 1, -1)  # the Wan I2V pipeline's normalisation
    ours = wan_vae.encode(vae, jnp.asarray(np.moveaxis(image.numpy(), 1, -1)), channels_last=True)
    assert ours.shape == (1, 1, 2, 1, CFG.z_dim)
    assert _rel_err(ours, ref_normalised) <= REL_TOL
    z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, CFG.z_dim)), jnp.float32)
    back = wan_vae.normalize_latents(wan_vae.denormalize_latents(z, CFG), CFG)
    np.testing.assert_allclose(np.asarray(back), np.asarray(z), rtol=1e-6, atol=1e-6)


def _count_convs(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "conv_general_dilated"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count_convs(sub)
    return n


def test_chunks_share_one_compiled_body():
    """Longer videos add scan iterations, not traced convolutions: one body for all chunks after the first."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WanVAE(CFG, rngs=nnx.Rngs(0))))  # tracing needs no values

    def traced_convs(fn, shape):
        jaxpr = jax.make_jaxpr(lambda s, x: fn(nnx.merge(graphdef, s), x))(state, jnp.zeros(shape, jnp.float32))
        return _count_convs(jaxpr.jaxpr)

    dec = [traced_convs(lambda m, z: m.decode_raw(z), (1, f, 2, 2, CFG.z_dim)) for f in (1, 2, 6)]
    enc = [traced_convs(lambda m, x: m.encode_moments(x)[0], (1, t, 8, 8, 3)) for t in (1, 5, 21)]
    temporal = sum(CFG.temperal_downsample)  # time convs that the first chunk skips
    assert dec[1] == dec[2] == 2 * dec[0] + temporal and enc[1] == enc[2] == 2 * enc[0] + temporal


def test_full_size_shapes_and_param_count():
    with torch.device("meta"):
        ref = AutoencoderKLWan()
    ref_count = sum(p.numel() for p in ref.parameters())
    assert conv.param_count(WAN21_VAE) == ref_count == 126_892_531
    bf16 = jnp.bfloat16
    abstract = nnx.eval_shape(lambda: WanVAE(WAN21_VAE, rngs=nnx.Rngs(0), dtype=bf16, param_dtype=bf16))
    # Tracing at full size in bfloat16 checks shapes and the strict dtype promotion without computing anything.
    latents = jax.ShapeDtypeStruct((1, 16, 21, 60, 104), jnp.float32)  # 81 frames at 832x480
    video = jax.eval_shape(lambda v, z: wan_vae.decode(v, z), abstract, latents)
    assert (video.shape, video.dtype) == ((1, 3, 81, 480, 832), bf16)
    back = jax.eval_shape(lambda v, x: wan_vae.encode(v, x), abstract, video)
    assert (back.shape, back.dtype) == ((1, 16, 21, 60, 104), bf16)


def test_original_release_names(pair, tmp_path):
    """The original-release key table agrees with diffusers' own single-file conversion of those names."""
    model, sd, vae = pair
    diffusers_rules, original_rules = conv.key_rules(CFG, conv.DIFFUSERS), conv.key_rules(CFG, conv.ORIGINAL)
    to_original = {}
    for d, o in zip(diffusers_rules, original_rules, strict=True):
        to_original.update(zip(d.sources, o.sources, strict=True))
    assert sorted(to_original) == sorted(sd)
    original = {to_original[k]: v for k, v in sd.items()}
    back = {
        k: v.numpy()
        for k, v in convert_wan_vae_to_diffusers({k: torch.from_numpy(v) for k, v in original.items()}).items()
    }
    assert sorted(back) == sorted(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
    # The release ships a .pth state dict.
    pth = tmp_path / "Wan2.1_VAE.pth"
    torch.save({k: torch.from_numpy(v) for k, v in original.items()}, pth)
    stats = dict(latents_mean=CFG.latents_mean, latents_std=CFG.latents_std)
    manifest = conv.convert(pth, tmp_path / "ckpt", hash_sources=False, **stats)
    assert manifest["source_format"] == "original" and manifest["config"]["base_dim"] == CFG.base_dim
    ours = nnx.to_flat_state(nnx.state(wan_vae.load(tmp_path / "ckpt"), nnx.Param))
    theirs = dict(nnx.to_flat_state(nnx.state(vae, nnx.Param)))
    assert all(np.array_equal(np.asarray(v.get_value()), np.asarray(theirs[p].get_value())) for p, v in ours)


def test_converter_is_strict(pair):
    _, sd, _ = pair
    assert conv.infer_config(sd, latents_mean=CFG.latents_mean, latents_std=CFG.latents_std) == CFG
    w = dict(sd)
    w["encoder.extra.weight"] = np.zeros((3,), np.float32)
    del w["decoder.up_blocks.1.upsamplers.0.time_conv.bias"]
    w["decoder.norm_out.gamma"] = np.zeros((5, 1, 1, 1), np.float32)
    with pytest.raises(ConversionError) as info:
        conv.convert_tensors(w, CFG)
    msg = str(info.value)
    assert "encoder.extra.weight" in msg
    assert "decoder.up_blocks.1.upsamplers.0.time_conv.bias" in msg
    assert "decoder.norm_out.gamma" in msg
    with pytest.raises(ConversionError, match="not a Wan2.1 VAE"):
        conv.convert_tensors({"x.weight": np.zeros((1,), np.float32)})


def test_bad_shapes_fail_before_compute(pair):
    _, _, vae = pair
    with pytest.raises(ValueError, match="4k \\+ 1"):
        wan_vae.encode(vae, jnp.zeros((1, 3, 8, 16, 16), jnp.float32))
    with pytest.raises(ValueError, match="divisible by 8"):
        wan_vae.encode(vae, jnp.zeros((1, 3, 5, 16, 12), jnp.float32))
    with pytest.raises(ValueError, match="latents must be"):
        wan_vae.decode(vae, jnp.zeros((1, CFG.z_dim + 1, 2, 2, 2), jnp.float32))
