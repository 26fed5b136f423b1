"""Flux weight conversion: strictness, determinism, dtypes, layouts, error messages."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import models.flux as mf
from convert_weights import common
from convert_weights import flux as cf
from convert_weights.__main__ import main
from tests.models.test_flux_support import tiny_diffusers, to_bfl

AXES = (4, 6, 6)


@pytest.fixture(scope="module")
def bfl_state():
    model = tiny_diffusers(True, seed=5)
    cfg = model.config
    return to_bfl(model.state_dict(), cfg.num_layers, cfg.num_single_layers)


def _write(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _convert(src, dst, **kw):
    return cf.convert(src, dst, axes_dim=AXES, **kw)


def test_unknown_source_key_fails_named(bfl_state, tmp_path):
    sd = dict(bfl_state, **{"double_blocks.0.img_attn.extra.weight": torch.zeros(2)})
    with pytest.raises(common.ConversionError, match=r"double_blocks\.0\.img_attn\.extra\.weight"):
        _convert(_write(sd, tmp_path / "x.safetensors"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_source_key_fails_named(bfl_state, tmp_path):
    sd = {k: v for k, v in bfl_state.items() if k != "single_blocks.1.norm.key_norm.scale"}
    with pytest.raises(common.ConversionError, match=r"single_blocks\.1\.norm\.key_norm\.scale"):
        _convert(_write(sd, tmp_path / "x.safetensors"), tmp_path / "out")


def test_wrong_shape_fails_named(bfl_state, tmp_path):
    sd = dict(bfl_state)
    sd["double_blocks.1.txt_mlp.0.weight"] = torch.zeros(60, 32)
    with pytest.raises(common.ConversionError, match=r"double_blocks\.1\.txt_mlp\.0\.weight"):
        _convert(_write(sd, tmp_path / "x.safetensors"), tmp_path / "out")


def test_all_problems_listed_and_cli_exit_status(bfl_state, tmp_path, capsys):
    sd = {k: v for k, v in bfl_state.items() if k != "img_in.bias"}
    sd["bogus.key"] = torch.zeros(1)
    src = _write(sd, tmp_path / "x.safetensors")
    rc = main(["flux", "--src", str(src), "--dst", str(tmp_path / "out"), "--axes-dim", "4,6,6"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "img_in.bias" in err and "bogus.key" in err


def test_reconversion_is_identical_and_atomic_replace(bfl_state, tmp_path):
    src = _write(bfl_state, tmp_path / "x.safetensors")
    m1 = _convert(src, tmp_path / "a", dtype="fp32")
    a1 = common.read_checkpoint(tmp_path / "a")
    m2 = _convert(src, tmp_path / "a", dtype="fp32")  # replaces the existing directory
    a2 = common.read_checkpoint(tmp_path / "a")
    _convert(src, tmp_path / "b", dtype="fp32")
    assert m1 == m2 == json.loads((tmp_path / "b" / common.MANIFEST).read_text())
    b = common.read_checkpoint(tmp_path / "b")
    assert sorted(a1) == sorted(a2) == sorted(b)
    for k in a1:
        np.testing.assert_array_equal(np.asarray(a1[k]), np.asarray(a2[k]))
        np.testing.assert_array_equal(np.asarray(a1[k]), np.asarray(b[k]))
    assert m1["sources"][0]["sha256"] == common.file_sha256(src)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_bf16_source_and_default_dtype(bfl_state, tmp_path):
    src32 = _write(bfl_state, tmp_path / "f32.safetensors")
    src16 = _write({k: v.bfloat16() for k, v in bfl_state.items()}, tmp_path / "bf16.safetensors")
    m = _convert(src16, tmp_path / "c16")  # default dtype: bf16
    assert m["dtype"] == "bfloat16"
    _convert(src32, tmp_path / "c32", dtype="fp32")
    got, ref = common.read_checkpoint(tmp_path / "c16"), common.read_checkpoint(tmp_path / "c32")
    for k in ref:
        assert np.asarray(got[k]).dtype == ml_dtypes.bfloat16
        want = np.asarray(ref[k]).astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(got[k]).astype(np.float32), want)
    model = mf.load(tmp_path / "c16")
    assert model.single.w2[...].dtype == ml_dtypes.bfloat16


def test_final_layer_swap_and_linear2_bias(bfl_state, tmp_path):
    """BFL [shift, scale] becomes [scale, shift]; linear2's bias lands once, in single.b2."""
    _convert(_write(bfl_state, tmp_path / "x.safetensors"), tmp_path / "c", dtype="fp32")
    arrays = common.read_checkpoint(tmp_path / "c")
    shift, scale = np.split(bfl_state["final_layer.adaLN_modulation.1.bias"].numpy(), 2)
    np.testing.assert_array_equal(np.asarray(arrays["final_mod.bias"]), np.concatenate([scale, shift]))
    np.testing.assert_array_equal(np.asarray(arrays["single.b2"])[2], bfl_state["single_blocks.2.linear2.bias"].numpy())


def test_not_a_flux_checkpoint(tmp_path):
    src = _write({"encoder.block.0.weight": torch.zeros(2, 2)}, tmp_path / "t5.safetensors")
    with pytest.raises(common.ConversionError, match="not a FLUX.1 transformer"):
        cf.convert(src, tmp_path / "out")
    with pytest.raises(common.ConversionError, match="does not exist"):
        cf.convert(tmp_path / "nope.safetensors", tmp_path / "out")


def test_load_rejects_missing_and_other_models(tmp_path):
    with pytest.raises(FileNotFoundError):
        mf.load(tmp_path / "missing")
    other = tmp_path / "vae"
    other.mkdir()
    (other / common.MANIFEST).write_text(json.dumps({"model": "flux_ae"}))
    with pytest.raises(ValueError, match="flux_ae"):
        mf.load(other)


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["flux", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "python -m convert_weights flux --src" in out and "--dtype" in out
