"""benchmarks/hunyuan_step.py: the --tiny CPU mode runs every step kind and prints its table; bad shapes are
refused before any compute."""

from __future__ import annotations

import re

import pytest

from benchmarks import hunyuan_step

# The smallest run that still has a dense layer of each block kind and a sparse single block (preset: layers
# 0-1 dense), and reaches the warm-up, mask and sparse steps: 4 compilations, which is most of the time.
SMALL = ["--tiny", "--double", "1", "--single", "2", "--frames", "5", "--size", "192x128", "--text-len", "16"]


def test_tiny_runs_every_kind_and_reports(capsys):
    assert hunyuan_step.main([*SMALL, "--valid-text", "12", "--steps", "3", "--dense-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "REDUCED" in out and "(2, 8, 12) = 192 tokens" in out and "12 valid" in out
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(dense|chipmunk \S+)\s+\d+\s+([\d.]+)", out, re.M)}
    kinds = ("attn=warmup,mlp=dense", "attn=mask,mlp=dense", "attn=sparse,mlp=dense", "skip")
    assert set(rows) == {"dense"} | {f"chipmunk {k}" for k in kinds}  # skip: the head, timed after the run
    assert all(v > 0 for v in rows.values())
    density = float(re.search(r"selected key density .*: ([\d.]+)", out).group(1))
    assert 0.0 < density < 1.0  # a real selection (top 5% + 1% random + static text/local columns)
    assert "50-step projection (4 full steps, 25 skipped)" in out and "not reached" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--frames", "16"], "4k+1"),
        (["--size", "200x128"], "multiples of 16"),
        (["--size", "wide"], "WIDTHxHEIGHT"),
        (["--valid-text", "40"], "--valid-text"),
        (["--steps", "2"], "--steps"),
    ],
)
def test_bad_arguments_refused_before_compute(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        hunyuan_step.main([*SMALL, *argv])
    assert message in str(e.value)


def test_full_size_needs_a_gpu():
    with pytest.raises(SystemExit, match="--tiny"):
        hunyuan_step.main([])


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        hunyuan_step.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "118,800 video tokens" in out and "--no-step-caching" in out and "examples:" in out
