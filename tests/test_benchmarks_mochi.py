"""benchmarks/mochi_step.py: the --tiny CPU mode runs end to end and reports every step kind side by side."""

from __future__ import annotations

import json

import jax
import pytest

from benchmarks import mochi_step


def test_tiny_runs_and_reports_every_kind(tmp_path, capsys):
    # 3 layers (2 dense in the preset + 1 sparse) and 3 Chipmunk steps: the fewest compilations that still time
    # warm-up, mask and sparse steps against the dense model.
    out = tmp_path / "mochi.json"
    argv = ["--tiny", "--layers", "3", "--steps", "3", "--dense-steps", "1", "--json", str(out)]
    assert mochi_step.main(argv) == 0
    text = capsys.readouterr().out
    assert "REDUCED" in text and "dense / kind" in text and "64-step projection" in text
    record = json.loads(out.read_text())
    assert sorted(record["step_s"]) == ["dense", "mask", "sparse", "warmup"]
    assert all(len(v) == 1 and v[0] > 0 for v in record["step_s"].values())
    assert record["projection"]["kinds"] == {"warmup": 1, "mask": 5, "sparse": 58}
    assert record["video"]["latent"] == [4, 24, 32] and record["video"]["tokens"] == 4 * 12 * 16


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="the refusal is for machines without a GPU")
def test_release_shape_needs_a_gpu_and_help(capsys):
    assert mochi_step.main([]) == 2
    assert "--tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        mochi_step.main(["--help"])
    assert e.value.code == 0
    assert "python benchmarks/mochi_step.py --tiny" in capsys.readouterr().out
    with pytest.raises(ValueError, match="6k"):
        mochi_step.latent_shape(160, 480, 848)
    assert mochi_step.latent_shape(163, 480, 848) == (28, 60, 106)
