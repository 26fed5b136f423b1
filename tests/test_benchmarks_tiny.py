"""benchmarks/tiny_recipes.py: recipe checks, a two-stage guided smoke run, --throughput and --score."""

from __future__ import annotations

import json

import pytest

from benchmarks import tiny_recipes

SMALL = {"name": "small", "hidden": 32, "dd": 1, "ds": 1, "p_uncond": 0.2, "keep": 0.5, "scales": [1, 3]}


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_recipes_are_checked_before_any_work():
    with pytest.raises(ValueError, match="p_uncond"):
        tiny_recipes.main(
            ["--recipes", json.dumps([{"name": "a", "hidden": 32, "batch": 2, "steps": 1, "scales": [3]}])]
        )
    with pytest.raises(ValueError, match="batch and steps"):
        tiny_recipes.main(
            ["--recipes", json.dumps([{"name": "b", "hidden": 32, "stages": [{"size": 32, "steps": 1}]}])]
        )
    stages = tiny_recipes._stages(tiny_recipes.CPU20_RECIPES[1])
    assert [(s["size"], s["lr"]) for s in stages] == [(32, 2e-3), (64, 2e-3)]  # stages inherit the recipe's lr


def test_two_stage_guided_smoke_run_then_score(tmp_path, capsys):
    recipe = dict(SMALL, lr=2e-3, stages=[{"size": 32, "batch": 2, "steps": 3}, {"size": 64, "batch": 2, "steps": 3}])
    argv = [
        "--recipes",
        json.dumps([recipe]),
        "--smoke",
        "--workers",
        "1",
        "--sample-steps",
        "4",
        "--out",
        str(tmp_path),
    ]
    assert tiny_recipes.main(argv) == 0
    (row,) = _rows(capsys.readouterr().out)
    assert row["steps_done"] == [5, 5] and row["params"] > 0 and row["loss"] > 0
    assert all(0.0 <= row[f"{k}@{s}"] <= 1.0 for k in ("class", "shape") for s in ("1", "3"))
    ckpt = tmp_path / "small_ckpt"
    assert tiny_recipes.main(["--score", str(ckpt), "--scales", "1,2", "--sample-steps", "4"]) == 0
    (scored,) = _rows(capsys.readouterr().out)
    assert scored["ckpt"] == str(ckpt) and {"class@1", "class@2", "shape@2"} <= set(scored)


def test_throughput_fits_steps_into_the_budget(capsys):
    recipe = dict(SMALL, batch=2, steps=1)
    argv = ["--recipes", json.dumps([recipe]), "--throughput", "0.5", "--cpu-minutes", "1"]
    assert tiny_recipes.main(argv) == 0
    (row,) = _rows(capsys.readouterr().out)
    assert row["name"] == "small" and row["images_per_s"] > 0 and row["compile_s"] > 0
    # Steps that fit: (60 s - compile) x images/s / batch, rounded down (a minute is plenty at this size).
    want = int((60.0 - row["compile_s"]) * row["images_per_s"] / 2)
    assert abs(row["steps_fit"] - want) <= max(2, 0.02 * want)
