"""``python -m convert_weights mochi``: diffusers and genmo-original checkpoints -> orbax -> ``load_transformer``.

A tiny diffusers ``MochiTransformer3DModel`` (48 layers like the release, so that diffusers' own original ->
diffusers converter, which hard-codes 48, can check this file's inverse table) with EVERY parameter randomised
(norm weights 1 + 0.1 randn, pos_frequencies random: diffusers initialises them to zero) is saved as a sharded
diffusers transformer directory and as a synthetic original ``dit.safetensors``; both are converted through the
CLI, loaded, and run against the torch model in float32.

Measured (float32, batch 2 with 5 and 2 valid text tokens of 7, 4 x 6 x 9 token grid): max |ours - torch| /
max |torch| = 1.4e-6 for both sources; the bound is 2e-5.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import MochiTransformer3DModel
from diffusers.loaders.single_file_utils import convert_mochi_transformer_checkpoint_to_diffusers
from flax import nnx
from safetensors.numpy import save_file

from convert_weights import common
from convert_weights import mochi as cm
from convert_weights.__main__ import main as convert_main
from models.mochi import MOCHI_1_PREVIEW, MochiConfig, forward, tiny_config
from models.mochi.load import load_transformer
from tests.models.helpers import mochi_diffusers_module, rel

REL_TOL = 2e-5
LAYERS = 48  # diffusers' original -> diffusers converter is written for the release depth
LATENT = (4, 12, 18)  # -> token grid (4, 6, 9)
TEXT_SLOTS = 7


def _diffusers(cfg: MochiConfig, seed: int) -> MochiTransformer3DModel:
    """A diffusers model of ``cfg`` with every parameter drawn at random (none left at its init)."""
    m = mochi_diffusers_module(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight") and p.ndim == 1:
                p.copy_(1.0 + 0.1 * noise)  # RMS scales
            elif name == "pos_frequencies":
                p.copy_(0.3 * noise)
            else:
                p.copy_(noise / (p.shape[-1] if p.ndim >= 2 else 16) ** 0.5)
    return m


def _to_original(sd: dict[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    """diffusers names -> genmo release names: this test's own inverse table (independent of the converter).

    The release fuses q/k/v, stores SwiGLU w1 as [gate; up] (diffusers [up; gate]) and the output modulation as
    [shift; scale] (diffusers [scale; shift]); the last block's text modulation is plain ``mod_y``.
    """
    swap = lambda a: np.concatenate(np.split(a, 2, axis=0)[::-1], axis=0)  # noqa: E731
    top = {
        "x_embedder.proj": "patch_embed.proj",
        "t_embedder.mlp.0": "time_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_embed.timestep_embedder.linear_2",
        "t5_y_embedder.to_kv": "time_embed.pooler.to_kv",
        "t5_y_embedder.to_q": "time_embed.pooler.to_q",
        "t5_y_embedder.to_out": "time_embed.pooler.to_out",
        "t5_yproj": "time_embed.caption_proj",
        "final_layer.linear": "proj_out",
    }
    out = {f"{o}.{wb}": sd[f"{d}.{wb}"] for o, d in top.items() for wb in ("weight", "bias")}
    out["final_layer.mod.weight"] = swap(sd["norm_out.linear.weight"])
    out["final_layer.mod.bias"] = swap(sd["norm_out.linear.bias"])
    out["pos_frequencies"] = sd["pos_frequencies"]
    for i in range(layers):
        o, d, last = f"blocks.{i}.", f"transformer_blocks.{i}.", i == layers - 1
        renames = {
            "mod_x.weight": "norm1.linear.weight",
            "mod_x.bias": "norm1.linear.bias",
            "attn.q_norm_x.weight": "attn1.norm_q.weight",
            "attn.k_norm_x.weight": "attn1.norm_k.weight",
            "attn.q_norm_y.weight": "attn1.norm_added_q.weight",
            "attn.k_norm_y.weight": "attn1.norm_added_k.weight",
            "attn.proj_x.weight": "attn1.to_out.0.weight",
            "attn.proj_x.bias": "attn1.to_out.0.bias",
            "mlp_x.w2.weight": "ff.net.2.weight",
        }
        ctx = "norm1_context.linear_1" if last else "norm1_context.linear"
        renames.update({"mod_y.weight": f"{ctx}.weight", "mod_y.bias": f"{ctx}.bias"})
        if not last:
            renames.update(
                {
                    "attn.proj_y.weight": "attn1.to_add_out.weight",
                    "attn.proj_y.bias": "attn1.to_add_out.bias",
                    "mlp_y.w2.weight": "ff_context.net.2.weight",
                }
            )
            out[o + "mlp_y.w1.weight"] = swap(sd[d + "ff_context.net.0.proj.weight"])
        out.update({o + k: sd[d + v] for k, v in renames.items()})
        out[o + "attn.qkv_x.weight"] = np.concatenate([sd[f"{d}attn1.to_{x}.weight"] for x in "qkv"])
        out[o + "attn.qkv_y.weight"] = np.concatenate([sd[f"{d}attn1.add_{x}_proj.weight"] for x in "qkv"])
        out[o + "mlp_x.w1.weight"] = swap(sd[d + "ff.net.0.proj.weight"])
    assert len(out) == len(sd) - 4 * layers  # q/k/v: 6 tensors -> 2 per block
    return out


def _write_diffusers_dir(sd: dict[str, np.ndarray], root) -> None:
    """A diffusers pipeline directory whose ``transformer/`` holds two shards and their index."""
    d = root / "transformer"
    d.mkdir(parents=True)
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2]}
    shards["diffusion_pytorch_model-00002-of-00002.safetensors"] = keys[1::2]
    for name, ks in shards.items():
        save_file({k: np.ascontiguousarray(sd[k]) for k in ks}, str(d / name))
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (d / "config.json").write_text("{}")


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(num_layers=LAYERS)
    tm = _diffusers(cfg, seed=0)
    sd = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
    return cfg, tm, sd


@pytest.fixture(scope="module")
def reference(tiny):
    """Inputs (padded text) and the torch output."""
    cfg, tm, _ = tiny
    rs = np.random.RandomState(0)
    lat = rs.randn(2, cfg.in_channels, *LATENT).astype(np.float32)
    ts = rs.uniform(0, 1000, size=(2,)).astype(np.float32)
    txt = rs.randn(2, TEXT_SLOTS, cfg.text_dim).astype(np.float32)
    mask = np.arange(TEXT_SLOTS)[None, :] < np.array([5, 2])[:, None]
    with torch.no_grad():
        ref = tm(torch.tensor(lat), torch.tensor(txt), torch.tensor(ts), torch.tensor(mask), return_dict=False)[0]
    return (lat, ts, txt, mask), ref.numpy()


def _run(model, inputs) -> np.ndarray:
    graphdef, state = nnx.split(model)
    out, _ = forward(graphdef, state, *(jnp.asarray(a) for a in inputs))
    return np.asarray(out)


def test_diffusers_directory_matches_torch(tiny, reference, tmp_path):
    cfg, _, sd = tiny
    _write_diffusers_dir(sd, tmp_path / "mochi-1-preview")
    dst = tmp_path / "ckpt"
    args = ["mochi", "--src", str(tmp_path / "mochi-1-preview"), "--dst", str(dst), "--dtype", "fp32"]
    assert convert_main(args) == 0
    manifest = json.loads((dst / common.MANIFEST).read_text())
    assert manifest["model"] == "mochi" and manifest["source_format"] == "diffusers"
    assert MochiConfig.from_dict(manifest["config"]) == cfg and manifest["variant"] == "custom"
    assert len(manifest["sources"]) == 2 and all(s["sha256"] for s in manifest["sources"])
    model = load_transformer(dst)
    assert model.cfg == cfg and model.dtype == jnp.float32
    inputs, ref = reference
    err = rel(_run(model, inputs), ref)
    assert err < REL_TOL, err


def test_original_file_matches_torch(tiny, reference, tmp_path):
    cfg, _, sd = tiny
    orig = _to_original(sd, LAYERS)
    release = tmp_path / "release"
    release.mkdir()
    save_file(orig, str(release / "dit.safetensors"))
    save_file({"decoder.conv_in.weight": np.zeros(3, np.float32)}, str(release / "decoder.safetensors"))  # ignored
    m = cm.convert(release, tmp_path / "ckpt", dtype="fp32", hash_sources=False)
    assert m["source_format"] == "original" and [s["file"] for s in m["sources"]] == ["dit.safetensors"]
    inputs, ref = reference
    err = rel(_run(load_transformer(tmp_path / "ckpt"), inputs), ref)
    assert err < REL_TOL, err
    # ComfyUI single file: the original names behind a prefix; same parameters as from diffusers names.
    comfy = tmp_path / "mochi_comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in orig.items()}, str(comfy))
    a = cm.convert_tensors(cm.open_source(comfy))
    b = cm.convert_tensors(sd)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_inverse_table_agrees_with_diffusers_converter(tiny):
    """This file's original-format table, run back through diffusers' own converter, gives the state dict."""
    _, _, sd = tiny
    back = convert_mochi_transformer_checkpoint_to_diffusers(
        {k: torch.from_numpy(v) for k, v in _to_original(sd, LAYERS).items()}
    )
    assert sorted(back) == sorted(sd)
    assert all(np.array_equal(back[k].numpy(), sd[k]) for k in sd)


def test_swaps_land_where_the_model_expects(tiny):
    """SwiGLU: diffusers [up; gate] and original [gate; up] give the same gate; final modulation [scale; shift]."""
    _, _, sd = tiny
    orig = _to_original(sd, LAYERS)
    p = cm.convert_tensors(sd)
    up, gate = np.split(sd["transformer_blocks.3.ff.net.0.proj.weight"], 2)
    np.testing.assert_array_equal(p["blocks.ff_gate_w"][3], gate.T)
    np.testing.assert_array_equal(p["blocks.ff_up_w"][3], up.T)
    ogate, oup = np.split(orig["blocks.3.mlp_x.w1.weight"], 2)
    np.testing.assert_array_equal(ogate, gate)
    shift, scale = np.split(orig["final_layer.mod.bias"], 2)
    np.testing.assert_array_equal(p["norm_out.bias"], np.concatenate([scale, shift]))
    np.testing.assert_array_equal(
        p["last_block.ctx_scale_w"], sd[f"transformer_blocks.{LAYERS - 1}.norm1_context.linear_1.weight"].T
    )
    q, k, v = (sd[f"transformer_blocks.0.attn1.add_{x}_proj.weight"] for x in "qkv")
    np.testing.assert_array_equal(p["blocks.ctx_qkv_w"][0], np.stack([q.T, k.T, v.T], axis=1))


def test_converter_is_strict_and_names_keys(tiny, tmp_path, capsys):
    _, _, sd = tiny
    bad = dict(sd)
    bad["transformer_blocks.1.attn1.extra.weight"] = np.zeros(3, np.float32)
    del bad["transformer_blocks.2.attn1.norm_k.weight"]
    del bad[f"transformer_blocks.{LAYERS - 1}.norm1_context.linear_1.bias"]
    bad["proj_out.weight"] = np.zeros((5, 32), np.float32)
    with pytest.raises(common.ConversionError) as e:
        cm.convert_tensors(bad, tiny[0])
    msg = str(e.value)
    assert "transformer_blocks.1.attn1.extra.weight" in msg  # unknown key
    assert "transformer_blocks.2.attn1.norm_k.weight" in msg and "blocks.norm_k" in msg  # missing, unassigned layer
    assert f"transformer_blocks.{LAYERS - 1}.norm1_context.linear_1.bias" in msg  # the last block, real index
    assert "last_block.ctx_scale_b" in msg
    assert "shape mismatch" in msg and "proj_out.kernel" in msg
    # A non-last layout in the last block is an unknown key too.
    extra = dict(sd, **{f"transformer_blocks.{LAYERS - 1}.attn1.to_add_out.bias": np.zeros(24, np.float32)})
    with pytest.raises(common.ConversionError, match=rf"transformer_blocks\.{LAYERS - 1}\.attn1\.to_add_out\.bias"):
        cm.convert_tensors(extra)
    with pytest.raises(common.ConversionError, match="not a Mochi 1"):
        cm.convert_tensors({"encoder.block.0.weight": np.zeros(1, np.float32)})
    # Through the CLI: exit status 2, every problem printed, nothing written.
    # (proj_out sets out_channels when the config is inferred: mis-shape a feed-forward instead.)
    bad["proj_out.weight"] = sd["proj_out.weight"]
    bad["transformer_blocks.4.ff.net.2.weight"] = np.zeros((32, 60), np.float32)
    src = tmp_path / "bad.safetensors"
    save_file(bad, str(src))
    assert convert_main(["mochi", "--src", str(src), "--dst", str(tmp_path / "out"), "--no-hash"]) == 2
    err = capsys.readouterr().err
    assert "transformer_blocks.1.attn1.extra.weight" in err and "transformer_blocks.4.ff.net.2.weight" in err
    assert "transformer_blocks.2.attn1.norm_k.weight" in err and "blocks.ff_down_w[4]" in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_reconversion_identical_bf16_and_load(tiny, tmp_path):
    _, _, sd = tiny
    src = tmp_path / "dit.safetensors"
    save_file(_to_original(sd, LAYERS), str(src))
    m1 = cm.convert(src, tmp_path / "a")  # default bf16
    a1 = common.read_checkpoint(tmp_path / "a")
    m2 = cm.convert(src, tmp_path / "a")  # replaces the directory
    a2 = common.read_checkpoint(tmp_path / "a")
    assert m1 == m2 and m1["dtype"] == "bfloat16" and m1["sources"][0]["sha256"] == common.file_sha256(src)
    assert sorted(a1) == sorted(a2)
    for k in a1:
        np.testing.assert_array_equal(np.asarray(a1[k]), np.asarray(a2[k]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"
    # bf16 everywhere except the RoPE frequencies, kept exact in float32.
    assert np.asarray(a1["blocks.qkv_w"]).dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(a1["pos_frequencies"]), sd["pos_frequencies"])
    model = load_transformer(tmp_path / "a")
    assert model.dtype == jnp.bfloat16 and model.pos_frequencies[...].dtype == jnp.float32
    model32 = load_transformer(tmp_path / "a", dtype=jnp.float32, host=True)
    assert model32.last_block.ff_up_w[...].dtype == jnp.float32
    assert {d.platform for d in model32.blocks.qkv_w[...].devices()} == {"cpu"}


def test_infer_config_other_depth_and_load_errors(tmp_path):
    cfg = tiny_config(num_layers=3, heads=3, head_dim=8, text_pool_heads=4, text_dim=40)
    sd = {k: v.detach().numpy() for k, v in _diffusers(cfg, seed=1).state_dict().items()}
    assert cm.infer_config(sd, text_pool_heads=4) == cfg
    assert cm.infer_config(_to_original(sd, 3), text_pool_heads=4) == cfg
    params = cm.convert_tensors(sd, text_pool_heads=4)
    assert params["blocks.qkv_w"].shape == (2, 24, 3, 24) and params["last_block.qkv_w"].shape == (24, 3, 24)
    with pytest.raises(FileNotFoundError, match="convert_weights mochi"):
        load_transformer(tmp_path / "missing")
    other = tmp_path / "wan"
    other.mkdir()
    (other / common.MANIFEST).write_text(json.dumps({"model": "wan"}))
    with pytest.raises(ValueError, match="'wan' checkpoint"):
        load_transformer(other)


def test_full_size_config_inferred_from_shapes():
    """The release architecture read off diffusers' full-size state dict (meta device: shapes only)."""
    with torch.device("meta"):
        sd = MochiTransformer3DModel().state_dict()
    assert cm.infer_config(sd) == MOCHI_1_PREVIEW
    shapes = cm.target_shapes(MOCHI_1_PREVIEW)
    assert sum(int(np.prod(s)) for s, _ in shapes.values()) == sum(v.numel() for v in sd.values())


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        convert_main(["mochi", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "python -m convert_weights mochi --src" in out and "dit.safetensors" in out and "--dtype" in out
