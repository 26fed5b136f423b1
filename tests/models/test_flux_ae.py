"""Flux autoencoder: parity with diffusers.AutoencoderKL (Flux-style: 16 latent channels, no quant convs).

Parity bound: max |ours - torch| / max |torch| <= 1e-4 in float32 for encode (posterior mean and a sample drawn
with the same noise) and decode, every parameter (GroupNorm weights and biases included) randomised, weights
round-tripped through safetensors and ``convert_flux_ae``. The BFL layout is checked by converting a BFL-named
copy (an independent regex renaming of the diffusers file, written here) and requiring bit-identical parameters.
"""

import re

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert_weights.flux_ae import convert_flux_ae, detect_format, flux_ae_config_from_weights
from convert_weights.t5 import ConversionError
from models.vae.flux_ae import AE_TINY, FLUX_AE, AutoencoderConfig, FluxAutoencoder

REL_TOL = 1e-4


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


def _torch_ae(cfg: AutoencoderConfig):
    n = len(cfg.block_out_channels)
    model = diffusers.AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scaling_factor,
        shift_factor=cfg.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / fan_in) ** 0.5)
    return model.eval()


_BFL_RULES = [
    (r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.block."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
]


def _to_bfl(weights: dict[str, np.ndarray], num_levels: int) -> dict[str, np.ndarray]:
    out = {}
    for key, value in weights.items():
        new = key
        for pattern, repl in _BFL_RULES:
            new = re.sub(pattern, repl, new)
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)", new)
        if m:
            level = num_levels - 1 - int(m.group(1))
            inner = "block." if m.group(2) == "resnets" else "upsample."
            new = f"decoder.up.{level}.{inner}{m.group(3)}"
        if ".attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


@pytest.fixture(scope="module")
def ae_pair(tmp_path_factory):
    model = _torch_ae(AE_TINY)
    path = tmp_path_factory.mktemp("ae") / "vae.safetensors"
    save_file({k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, str(path))
    return model, load_file(str(path))


def _images() -> np.ndarray:
    return np.random.default_rng(1).uniform(-1, 1, size=(2, 3, 16, 24)).astype(np.float32)  # NCHW


def test_bfl_layout_gives_the_same_model(ae_pair):
    _, weights = ae_pair
    bfl = _to_bfl(weights, len(AE_TINY.block_out_channels))
    # BFL numbers decoder levels by resolution: level 0 (full resolution, no upsampler) runs last.
    assert "decoder.up.2.upsample.conv.weight" in bfl and "decoder.up.0.upsample.conv.weight" not in bfl
    assert "decoder.up.0.block.0.nin_shortcut.weight" in bfl and bfl["encoder.mid.attn_1.q.weight"].ndim == 4
    assert detect_format(bfl) == "bfl"
    assert flux_ae_config_from_weights(bfl, norm_num_groups=AE_TINY.norm_num_groups) == AE_TINY
    from_bfl = nnx.to_flat_state(nnx.state(convert_flux_ae(bfl, AE_TINY)))
    from_diffusers = dict(nnx.to_flat_state(nnx.state(convert_flux_ae(weights, AE_TINY))))
    assert len(from_bfl) == len(from_diffusers)
    for path, var in from_bfl:
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(from_diffusers[path][...]), err_msg=str(path))


def test_encode_decode_match_diffusers(ae_pair):
    model, weights = ae_pair
    assert detect_format(weights) == "diffusers"
    assert flux_ae_config_from_weights(weights, norm_num_groups=AE_TINY.norm_num_groups) == AE_TINY
    ours = convert_flux_ae(weights, AE_TINY)
    images = _images()
    s, t = AE_TINY.scaling_factor, AE_TINY.shift_factor
    with torch.no_grad():
        post = model.encode(torch.from_numpy(images)).latent_dist
        ref_mean, ref_std = post.mean.numpy(), post.std.numpy()
        latents = np.random.default_rng(2).standard_normal((2, 16, 4, 6)).astype(np.float32)
        ref_images = model.decode(torch.from_numpy(latents / s + t)).sample.numpy()
    enc = ours.encode(jnp.asarray(_nhwc(images)))
    assert enc.shape == (2, 4, 6, 16)
    assert _rel_err(_nchw(enc), (ref_mean - t) * s) <= REL_TOL
    key = jax.random.key(0)
    noise = _nchw(jax.random.normal(key, enc.shape, jnp.float32))
    sampled = ours.encode(jnp.asarray(_nhwc(images)), rng=key)
    assert _rel_err(_nchw(sampled), (ref_mean + ref_std * noise - t) * s) <= REL_TOL
    dec = ours.decode(jnp.asarray(_nhwc(latents)))
    assert dec.shape == (2, 16, 24, 3)
    assert _rel_err(_nchw(dec), ref_images) <= REL_TOL


def test_quant_conv_and_other_problems_rejected(ae_pair):
    _, weights = ae_pair
    w = dict(weights)
    w["quant_conv.weight"] = np.zeros((32, 32, 1, 1), np.float32)
    del w["decoder.up_blocks.1.upsamplers.0.conv.bias"]
    w["encoder.conv_in.weight"] = np.zeros((8, 3, 3, 5), np.float32)
    with pytest.raises(ConversionError) as info:
        convert_flux_ae(w, AE_TINY)
    msg = str(info.value)
    assert "3 problem(s)" in msg
    assert "unknown source key 'quant_conv.weight'" in msg
    assert "missing source key 'decoder.up_blocks.1.upsamplers.0.conv.bias'" in msg
    assert "shape mismatch 'encoder.conv_in.weight'" in msg


def test_layout_detection_errors():
    with pytest.raises(ConversionError, match="neither"):
        detect_format({"foo.weight": np.zeros(1)})
    with pytest.raises(ConversionError, match="both"):
        detect_format({"encoder.down_blocks.0.x": np.zeros(1), "encoder.down.0.x": np.zeros(1)})


def test_bad_shapes_rejected():
    ae = nnx.eval_shape(lambda: FluxAutoencoder(AE_TINY, rngs=nnx.Rngs(0)))  # shapes are checked before any compute
    with pytest.raises(ValueError, match="divisible by 4"):
        ae.encode(jnp.zeros((1, 10, 16, 3)))
    with pytest.raises(ValueError, match="latents must be NHWC"):
        ae.decode(jnp.zeros((1, 16, 4, 4)))


def test_flux_ae_shapes_without_allocation():
    model = nnx.eval_shape(lambda: FluxAutoencoder(FLUX_AE, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    assert sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(state)) == 83_819_683

    def decode(state, z):
        return nnx.merge(graphdef, state).decode(z)

    out = jax.eval_shape(decode, state, jax.ShapeDtypeStruct((1, 128, 128, 16), jnp.float32))
    assert out.shape == (1, 1024, 1024, 3)
