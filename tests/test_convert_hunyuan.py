"""HunyuanVideo weight conversion (``python -m convert_weights hunyuan-video``): diffusers and original layouts,
parity of the converted model with diffusers, strictness, determinism, the loader and the CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel
from flax import nnx
from safetensors.numpy import save_file

from convert_weights import common
from convert_weights import hunyuan_video as ch
from convert_weights.__main__ import main
from models.hunyuan_video import HUNYUAN_VIDEO_13B, forward, tiny_config
from models.hunyuan_video.load import load_transformer, read_config
from tests.models.helpers import hunyuan_inputs, hunyuan_torch_model, hunyuan_torch_out, rel

# Not the release values, so that config.json (or the CLI options) must really be read: an MLP ratio of 3 for
# the blocks (the refiner keeps 4) and a RoPE base of 64.
CFG = tiny_config(mlp_ratio=3.0, rope_theta=64.0)
ROPE = dict(rope_axes_dim=CFG.rope_axes_dim, rope_theta=CFG.rope_theta)


@pytest.fixture(scope="module")
def tiny():
    """(torch model with every parameter random, its state dict as numpy)."""
    tm = hunyuan_torch_model(CFG, seed=3)
    sd = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
    return tm, sd


def to_original(sd: dict[str, np.ndarray], depth_refiner: int, depth_double: int, depth_single: int) -> dict:
    """A diffusers state dict under the Tencent release's names (test-local inverse table, every key used once)."""
    sd, out = dict(sd), {}

    def take(k):
        return sd.pop(k)

    def lin(src, dst):
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = take(f"{src}.{p}")

    def fused(srcs, dst):
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = np.concatenate([take(f"{s}.{p}") for s in srcs], axis=0)

    lin("x_embedder.proj", "img_in.proj")
    tte = "time_text_embed"
    lin(f"{tte}.timestep_embedder.linear_1", "time_in.mlp.0")
    lin(f"{tte}.timestep_embedder.linear_2", "time_in.mlp.2")
    lin(f"{tte}.guidance_embedder.linear_1", "guidance_in.mlp.0")
    lin(f"{tte}.guidance_embedder.linear_2", "guidance_in.mlp.2")
    lin(f"{tte}.text_embedder.linear_1", "vector_in.in_layer")
    lin(f"{tte}.text_embedder.linear_2", "vector_in.out_layer")
    lin(f"context_embedder.{tte}.timestep_embedder.linear_1", "txt_in.t_embedder.mlp.0")
    lin(f"context_embedder.{tte}.timestep_embedder.linear_2", "txt_in.t_embedder.mlp.2")
    lin(f"context_embedder.{tte}.text_embedder.linear_1", "txt_in.c_embedder.linear_1")
    lin(f"context_embedder.{tte}.text_embedder.linear_2", "txt_in.c_embedder.linear_2")
    lin("context_embedder.proj_in", "txt_in.input_embedder")
    for i in range(depth_refiner):
        s, d = f"context_embedder.token_refiner.refiner_blocks.{i}", f"txt_in.individual_token_refiner.blocks.{i}"
        lin(f"{s}.norm1", f"{d}.norm1")
        lin(f"{s}.norm2", f"{d}.norm2")
        fused([f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v"], f"{d}.self_attn_qkv")
        lin(f"{s}.attn.to_out.0", f"{d}.self_attn_proj")
        lin(f"{s}.ff.net.0.proj", f"{d}.mlp.fc1")
        lin(f"{s}.ff.net.2", f"{d}.mlp.fc2")
        lin(f"{s}.norm_out.linear", f"{d}.adaLN_modulation.1")
    for i in range(depth_double):
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        lin(f"{s}.norm1.linear", f"{d}.img_mod.linear")
        lin(f"{s}.norm1_context.linear", f"{d}.txt_mod.linear")
        fused([f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v"], f"{d}.img_attn_qkv")
        fused([f"{s}.attn.add_q_proj", f"{s}.attn.add_k_proj", f"{s}.attn.add_v_proj"], f"{d}.txt_attn_qkv")
        out[f"{d}.img_attn_q_norm.weight"] = take(f"{s}.attn.norm_q.weight")
        out[f"{d}.img_attn_k_norm.weight"] = take(f"{s}.attn.norm_k.weight")
        out[f"{d}.txt_attn_q_norm.weight"] = take(f"{s}.attn.norm_added_q.weight")
        out[f"{d}.txt_attn_k_norm.weight"] = take(f"{s}.attn.norm_added_k.weight")
        lin(f"{s}.attn.to_out.0", f"{d}.img_attn_proj")
        lin(f"{s}.attn.to_add_out", f"{d}.txt_attn_proj")
        lin(f"{s}.ff.net.0.proj", f"{d}.img_mlp.fc1")
        lin(f"{s}.ff.net.2", f"{d}.img_mlp.fc2")
        lin(f"{s}.ff_context.net.0.proj", f"{d}.txt_mlp.fc1")
        lin(f"{s}.ff_context.net.2", f"{d}.txt_mlp.fc2")
    for i in range(depth_single):
        s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        fused([f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"], f"{d}.linear1")
        lin(f"{s}.proj_out", f"{d}.linear2")
        out[f"{d}.q_norm.weight"] = take(f"{s}.attn.norm_q.weight")
        out[f"{d}.k_norm.weight"] = take(f"{s}.attn.norm_k.weight")
        lin(f"{s}.norm.linear", f"{d}.modulation.linear")
    for p in ("weight", "bias"):  # the release emits [shift, scale], diffusers [scale, shift]
        scale, shift = np.split(take(f"norm_out.linear.{p}"), 2, axis=0)
        out[f"final_layer.adaLN_modulation.1.{p}"] = np.concatenate([shift, scale], axis=0)
    lin("proj_out", "final_layer.linear")
    assert not sd, sorted(sd)
    return out


def _original(sd):
    return to_original(sd, CFG.depth_refiner, CFG.depth_double, CFG.depth_single)


# ---------------------------------------------------------------------------------------------------------
# Parity: diffusers directory -> checkpoint -> model output == diffusers output; original file -> same arrays.


def test_diffusers_directory_converts_to_a_model_matching_diffusers(tiny, tmp_path):
    tm, _ = tiny
    # A pipeline directory: transformer/ with config.json and sharded safetensors + index, as on the Hub.
    tm.save_pretrained(tmp_path / "HunyuanVideo" / "transformer", max_shard_size="40KB", safe_serialization=True)
    assert len(list((tmp_path / "HunyuanVideo" / "transformer").glob("*.safetensors"))) > 1
    m = ch.convert(tmp_path / "HunyuanVideo", tmp_path / "ckpt", dtype="fp32", hash_sources=False)
    assert m["model"] == "hunyuan_video" and m["source_format"] == "diffusers" and m["dtype"] == "float32"
    assert read_config(tmp_path / "ckpt") == CFG  # mlp_ratio from the shapes, RoPE from config.json
    assert m["num_params"] == sum(p.numel() for p in tm.parameters())

    model = load_transformer(tmp_path / "ckpt")
    inputs = hunyuan_inputs(CFG, valid=[6, 9], seed=2)  # one prompt padded, one not
    ref = hunyuan_torch_out(tm, *inputs)
    out, _ = forward(*nnx.split(model), *(jnp.asarray(a) for a in inputs))
    err = rel(out, ref)
    assert err <= 3e-5, err  # measured 1.1e-5 (float32; the same as the transformer test's own mapping)


def test_original_layout_gives_the_same_arrays(tiny, tmp_path):
    _, sd = tiny
    ref = ch.convert_tensors(sd, dtype=np.float32, **ROPE)
    orig = _original(sd)
    # ComfyUI-style file: every key prefixed; the prefix is stripped.
    save_file({f"model.diffusion_model.{k}": v for k, v in orig.items()}, str(tmp_path / "hunyuan.safetensors"))
    m = ch.convert(tmp_path / "hunyuan.safetensors", tmp_path / "ckpt", dtype="fp32", **ROPE)
    assert m["source_format"] == "original" and m["sources"][0]["sha256"] is not None
    assert read_config(tmp_path / "ckpt") == CFG
    got = common.read_checkpoint(tmp_path / "ckpt")
    assert sorted(got) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    # The swap really happened: the release's first half (shift) is the model's second half.
    np.testing.assert_array_equal(
        got["final_mod.bias"][CFG.hidden :], orig["final_layer.adaLN_modulation.1.bias"][: CFG.hidden]
    )


def test_conversion_layouts_against_the_torch_modules(tiny):
    """Spot checks of the target layouts, read directly off the torch modules (independent of the rule table)."""
    tm, sd = tiny
    p = ch.convert_tensors(sd, dtype=np.float32, **ROPE)
    c, h, d = CFG.hidden, CFG.heads, CFG.head_dim
    blk = tm.transformer_blocks[1]
    np.testing.assert_array_equal(
        p["double.txt_qkv_w"][1][:, 2], blk.attn.add_v_proj.weight.detach().numpy().T.reshape(c, h, d)
    )
    np.testing.assert_array_equal(p["double.img_w2"][1], blk.ff.net[2].weight.detach().numpy().T)
    sgl = tm.single_transformer_blocks[0]
    np.testing.assert_array_equal(p["single.proj_w"][0], sgl.proj_out.weight.detach().numpy()[:, :c].T.reshape(h, d, c))
    ref_blk = tm.context_embedder.token_refiner.refiner_blocks[1]
    np.testing.assert_array_equal(p["refiner.blocks.ada_w"][1], ref_blk.norm_out.linear.weight.detach().numpy().T)
    conv = tm.x_embedder.proj.weight.detach().numpy()
    np.testing.assert_array_equal(p["x_embedder.kernel"][:, 5], conv[5].reshape(-1))
    assert p["single.w1"].shape == (2, CFG.mlp_hidden, c) and p["refiner.blocks.w1"].shape == (2, 4 * c, c)


# ---------------------------------------------------------------------------------------------------------
# Strictness.


def test_missing_unknown_and_misshaped_keys_are_all_named(tiny):
    _, sd = tiny
    bad = {k: v for k, v in sd.items() if k != "single_transformer_blocks.1.attn.norm_k.weight"}
    bad["transformer_blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
    bad["transformer_blocks.1.ff_context.net.2.weight"] = np.zeros((CFG.hidden, 7), np.float32)
    with pytest.raises(common.ConversionError) as e:
        ch.convert_tensors(bad, **ROPE)
    msg = str(e.value)
    for key in (
        "single_transformer_blocks.1.attn.norm_k.weight",
        "transformer_blocks.0.attn.extra.weight",
        "transformer_blocks.1.ff_context.net.2.weight",
    ):
        assert key in msg, (key, msg)
    # Original layout: a refiner block's fused qkv missing; an extra block index is not contiguous.
    orig = _original(sd)
    del orig["txt_in.individual_token_refiner.blocks.1.self_attn_qkv.bias"]
    with pytest.raises(common.ConversionError, match=r"blocks\.1\.self_attn_qkv\.bias"):
        ch.convert_tensors(orig, **ROPE)
    orig = _original(sd)
    orig["double_blocks.5.img_attn_q_norm.weight"] = np.ones(CFG.head_dim, np.float32)
    with pytest.raises(common.ConversionError, match="not contiguous"):
        ch.infer_config(orig, **ROPE)


def test_cli_reports_problems_and_writes_nothing(tiny, tmp_path, capsys):
    _, sd = tiny
    orig = {k: v for k, v in _original(sd).items() if k != "final_layer.linear.bias"}
    orig["bogus.key"] = np.zeros(1, np.float32)
    save_file(orig, str(tmp_path / "x.safetensors"))
    argv = ["hunyuan-video", "--src", str(tmp_path / "x.safetensors"), "--dst", str(tmp_path / "out")]
    rc = main([*argv, "--rope-axes-dim", "4,6,6"])
    err = capsys.readouterr().err
    assert rc == 2 and "final_layer.linear.bias" in err and "bogus.key" in err
    assert not (tmp_path / "out").exists()
    rc = main(argv)  # head_dim 16 and no config.json: the RoPE split cannot be guessed
    assert rc == 2 and "--rope-axes-dim" in capsys.readouterr().err


def test_architecture_errors(tiny, tmp_path):
    _, sd = tiny
    with pytest.raises(common.ConversionError, match="not a HunyuanVideo"):
        ch.infer_config({"x_embedder.weight": np.zeros((4, 4))})
    with pytest.raises(common.ConversionError, match="image-to-video"):
        ch.infer_config(sd, diffusers_config={"image_condition_type": "latent_concat"})
    with pytest.raises(common.ConversionError, match="rope_axes_dim"):
        ch.infer_config(sd, rope_axes_dim=(4, 4, 4))


def test_full_size_config_from_diffusers_shapes():
    with torch.device("meta"):
        ref = HunyuanVideoTransformer3DModel()

    class Shapes:  # shapes only: a meta-device state dict has no data
        def __init__(self, sd):
            self.s = {k: tuple(v.shape) for k, v in sd.items()}

        def keys(self):
            return sorted(self.s)

        def shape(self, k):
            return self.s[k]

        def __contains__(self, k):
            return k in self.s

    cfg = ch.infer_config(Shapes(ref.state_dict()))
    assert cfg == HUNYUAN_VIDEO_13B
    assert ch.param_count(cfg) == sum(p.numel() for p in ref.parameters()) == 12_821_012_544


# ---------------------------------------------------------------------------------------------------------
# Files, loader, CLI.


def test_reconversion_identical_dtypes_and_loader(tiny, tmp_path):
    _, sd = tiny
    save_file(_original(sd), str(tmp_path / "x.safetensors"))
    argv = ["hunyuan-video", "--src", str(tmp_path / "x.safetensors"), "--rope-axes-dim", "4,6,6"]
    assert main([*argv, "--rope-theta", "64", "--dst", str(tmp_path / "a")]) == 0  # default dtype: bf16
    a1 = common.read_checkpoint(tmp_path / "a")
    m1 = json.loads((tmp_path / "a" / common.MANIFEST).read_text())
    assert main([*argv, "--rope-theta", "64", "--dst", str(tmp_path / "a")]) == 0  # replaces it whole
    a2 = common.read_checkpoint(tmp_path / "a")
    assert m1 == json.loads((tmp_path / "a" / common.MANIFEST).read_text()) and m1["dtype"] == "bfloat16"
    assert sorted(a1) == sorted(a2)
    for k in a1:
        assert a1[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(a1[k], a2[k])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".a.")]  # no temporary directories left

    model = load_transformer(tmp_path / "a", dtype=jnp.float32, host=True)
    w = model.double.img_qkv_w[...]
    assert w.dtype == jnp.float32 and w.devices() == {jax.devices("cpu")[0]}
    np.testing.assert_array_equal(np.asarray(w), a1["double.img_qkv_w"].astype(np.float32))
    assert load_transformer(tmp_path / "a").x_embedder.kernel[...].dtype == jnp.bfloat16

    with pytest.raises(FileNotFoundError, match="convert_weights hunyuan-video"):
        load_transformer(tmp_path / "nope")
    manifest = json.loads((tmp_path / "a" / common.MANIFEST).read_text())
    (tmp_path / "a" / common.MANIFEST).write_text(json.dumps(dict(manifest, model="wan")))
    with pytest.raises(ValueError, match="not a HunyuanVideo"):
        load_transformer(tmp_path / "a")


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["hunyuan-video", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("--rope-axes-dim", "--dtype", "mp_rank_00_model_states.pt", "load_transformer", "examples:"):
        assert text in out, text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "hunyuan-video" in capsys.readouterr().out
