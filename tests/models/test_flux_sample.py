"""The sampling CLI rejects bad requests before any compute, with messages that say what to do."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.flux import sample


def _err(capsys, argv) -> str:
    assert sample.main(argv) == 2
    return capsys.readouterr().err


def test_size_not_multiple_of_128(capsys):
    err = _err(capsys, ["--random-weights", "--tiny", "--width", "1000", "--height", "256"])
    assert "width 1000" in err and "896 or 1024" in err


def test_dense_allows_multiples_of_16():
    args = sample.build_parser().parse_args(
        ["--random-weights", "--tiny", "--dense", "--width", "272", "--height", "144"]
    )
    cfg, dtype, chipmunk, t5, pooled = sample.prepare(args)
    assert chipmunk is None and t5.shape == (1, 512, cfg.context_dim)


def test_missing_and_foreign_checkpoints(capsys, tmp_path):
    err = _err(capsys, ["--ckpt", str(tmp_path / "nope"), "--embeddings", "x.npz"])
    assert "does not exist" in err
    (tmp_path / "manifest.json").write_text(json.dumps({"model": "t5"}))
    err = _err(capsys, ["--ckpt", str(tmp_path), "--embeddings", "x.npz"])
    assert "'t5' checkpoint" in err


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(t5=np.zeros((1, 8, 4096)), clip_pooled=np.zeros((1, 768))), "'t5' must be [B, L, 24]"),
        (dict(t5=np.zeros((2, 8, 24)), clip_pooled=np.zeros((1, 12))), "'clip_pooled' must be [2, 12]"),
        (dict(t5=np.zeros((1, 8, 24))), "lacks ['clip_pooled']"),
    ],
)
def test_bad_embeddings(capsys, tmp_path, arrays, message):
    path = tmp_path / "emb.npz"
    np.savez(path, **arrays)
    args = ["--random-weights", "--tiny", "--width", "256", "--height", "256", "--embeddings", str(path)]
    assert message in _err(capsys, args)


def test_batch_repeats_single_prompt(tmp_path):
    path = tmp_path / "emb.npz"
    np.savez(path, t5=np.ones((1, 8, 24)), clip_pooled=np.ones((1, 12)))
    args = sample.build_parser().parse_args(["--random-weights", "--tiny", "--embeddings", str(path), "--batch", "3"])
    _, _, chipmunk, t5, pooled = sample.prepare(args)
    assert t5.shape == (3, 8, 24) and pooled.shape == (3, 12)
    assert chipmunk is not None and chipmunk.model_name == "flux"
