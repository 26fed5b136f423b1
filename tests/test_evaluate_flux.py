"""``python -m chipmunk_jax.evaluate --model flux``: the CLI sweep on the tiny random pipeline, the per-step
trajectory against a plain ``generate`` (dense and Chipmunk), and a converted pipeline directory against
``FluxPipeline.generate``.

The tiny random pipeline is 128x128 px (8x8 latent tokens, one patchify chunk) and 3 steps, the fewest that run
the preset's three step kinds (warm-up, mask, sparse). Compiling the Chipmunk steps dominates the run time, so
the sweep runs the Flux preset with the sparse MLP off (a reference YAML through ``--config``; the sparse MLP
goes through the same ``generate`` and is covered by tests/models/test_flux_sample.py and the tiny evaluate
test), and the trajectory test reuses the sweep's compiled steps (same shapes and configs).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from chipmunk_jax import evaluate
from models.flux.sampling import generate

PROMPTS = ["a fox in snow", "a cat on a sofa"]
SMALL = ["--width", "128", "--height", "128", "--steps", "3"]


@pytest.fixture(scope="module")
def mlp_off(tmp_path_factory):
    """A reference-style YAML: the Flux preset with the sparse MLP disabled."""
    path = tmp_path_factory.mktemp("flux_eval_cfg") / "attn-only.yml"
    path.write_text("mlp:\n  is_enabled: false\n")
    return path


def test_cli_sweep_on_the_random_pipeline(tmp_path, capsys, mlp_off):
    out = tmp_path / "ev"
    argv = ["--model", "flux", "--random-weights", "--seeds", "0", "--config", str(mlp_off), *SMALL]
    argv += [a for p in PROMPTS for a in ("--prompt", p)]
    assert evaluate.main([*argv, "--sweep-top-keys", "0.165,0.5", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model flux: 3 steps" in printed
    table = (out / "table.md").read_text()
    assert table.count("\n") == 4 and "| top_keys=0.165 |" in table and "| top_keys=0.5 |" in table
    assert table in printed
    results = json.loads((out / "results.json").read_text())
    assert results["args"]["model"] == "flux" and results["args"]["prompt"] == PROMPTS
    rows = results["rows"]
    assert [r["top_keys"] for r in rows] == [0.165, 0.5]
    for r in rows:
        # Step 0 (warm-up) is dense in both runs; only the token order differs (patchify): measured 4e-8.
        assert len(r["step_rel_err"]) == 3 and r["step_rel_err"][0] < 1e-5
        assert r["step_rel_err"][-1] > 1e-4  # the sparse steps did change the result
        assert np.isfinite(r["psnr_mean"]) and np.isfinite(r["psnr_min"]) and 0.0 < r["ssim_mean"] <= 1.0
        assert r["mlp_sparsity"] is None  # MLP dense (the YAML)
    assert rows[0]["attn_sparsity"] > rows[1]["attn_sparsity"] > 0.0  # fewer keys kept at the smaller top_keys
    from PIL import Image

    with Image.open(out / "plot.png") as im:
        assert im.size == (960, 360)
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 4  # something was drawn


def _random_eval_model(**kw) -> evaluate.FluxEvalModel:
    transformer, vae = evaluate.tiny_random_flux_pipeline(0)
    cfg = transformer.cfg
    txt, pooled = evaluate.random_prompt_embeddings(PROMPTS, 8, cfg.context_dim, cfg.vec_dim)
    base = dict(width=128, height=128, steps=3, scale_tiles=True)
    return evaluate.FluxEvalModel(transformer, evaluate.float_decoder(vae), txt, pooled, **{**base, **kw})


def test_trajectory_matches_plain_generate_dense_and_chipmunk(mlp_off):
    em = _random_eval_model()
    from models.tiny.sampling import tiny_preset

    base = evaluate.load_config(mlp_off, base="flux")
    chip = em.adapt(base)
    assert chip == tiny_preset(base) and chip.attn.top_keys == 0.165  # tile sizes scaled for the tiny model only
    for config in (None, chip):
        s = em.sample(0, config)
        gen = generate(
            em.transformer, em.txt, em.pooled, width=128, height=128, steps=3, seed=0, chipmunk=config, progress=False
        )
        assert gen.trajectory is None  # the default path keeps nothing
        assert s.latents.shape == (3, 2, 64, 16) and s.images.shape == (2, 128, 128, 3)
        np.testing.assert_array_equal(s.latents[-1], np.asarray(gen.tokens))
        np.testing.assert_array_equal(s.images, em.decode(gen.latents))
        assert set(s.report.step_times) == set(gen.report.step_times)
        assert s.report.stats == gen.report.stats
        assert np.isfinite(s.latents).all() and 0.0 <= s.images.min() and s.images.max() <= 1.0
        assert all(np.abs(s.latents[i + 1] - s.latents[i]).max() > 1e-3 for i in range(2))  # every step kept
        assert np.abs(s.images[0] - s.images[1]).max() > 1e-2  # two prompts, two images
    assert s.report.stats["attention sparsity"] > 0.5


def test_random_prompt_embeddings_are_per_prompt():
    a_txt, a_pool = evaluate.random_prompt_embeddings(["x", "y", "x"], 4, 6, 3)
    assert a_txt.shape == (3, 4, 6) and a_pool.shape == (3, 3)
    np.testing.assert_array_equal(a_txt[0], a_txt[2])
    assert np.abs(np.asarray(a_txt[0] - a_txt[1])).max() > 0.1


def test_bad_arguments():
    parse = evaluate.build_parser().parse_args
    assert evaluate.MODELS["flux"](parse(["--model", "flux", "--random-weights"])).steps == 50  # dev default
    with pytest.raises(ValueError, match="--ckpt PIPELINE_DIR"):
        evaluate.MODELS["flux"](parse(["--model", "flux"]))
    with pytest.raises(ValueError, match="only apply to --model flux"):
        evaluate.MODELS["tiny"](parse(["--random-weights", "--prompt", "a cat"]))
    with pytest.raises(ValueError, match="width 120 is not a multiple of 128"):  # checked before loading
        evaluate.MODELS["flux"](parse(["--model", "flux", "--ckpt", "/nonexistent", "--width", "120"]))
    with pytest.raises(ValueError, match="width 192 is not a multiple of 128"):  # patchify on: 128 px
        evaluate.main(["--model", "flux", "--random-weights", "--width", "192", "--height", "128", "--steps", "1"])
    with pytest.raises(FileNotFoundError, match="convert_weights flux-pipeline"):
        evaluate.MODELS["flux"](parse(["--model", "flux", "--ckpt", "/nonexistent/pipeline"]))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny FLUX.1-dev diffusers download converted with ``convert_weights flux-pipeline`` (as the pipeline
    tests build it)."""
    from convert_weights import __main__ as convert_cli
    from tests.models.test_flux_pipeline import _download

    base = tmp_path_factory.mktemp("flux_eval_pipeline")
    src, dst = _download(base / "FLUX.1-tiny"), base / "converted"
    argv = ["flux-pipeline", "--src", str(src), "--dst", str(dst), "--dtype", "fp32", "--no-hash"]
    assert convert_cli.main(argv) == 0
    return dst


def test_pipeline_dir_matches_flux_pipeline(converted, monkeypatch):
    """--ckpt: the prompts encoded and the images decoded by the converted pipeline, sampled one prompt per call
    (--batch-size 1) against ``FluxPipeline.generate`` of both prompts in one batch (the noise is split from the
    whole batch's, so the images agree)."""
    from models.flux.pipeline import FluxPipeline

    loaded = []
    load = FluxPipeline.load
    # Keep the pipeline the evaluator loads (and its compiled encoders) as the reference.
    monkeypatch.setattr(FluxPipeline, "load", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    argv = ["--model", "flux", "--ckpt", str(converted), "--t5-max-length", "8", "--width", "128", "--height", "128"]
    argv += [a for p in PROMPTS for a in ("--prompt", p)] + ["--steps", "2", "--batch-size", "1"]
    em = evaluate.MODELS["flux"](evaluate.build_parser().parse_args(argv))
    s = em.sample(1, None)
    ref = loaded[0].generate(PROMPTS, width=128, height=128, steps=2, seed=1)
    assert s.latents.shape == (2, 2, 64, 16) and s.images.shape == (2, 128, 128, 3) and ref.images.std() > 0
    assert sum(len(v) for v in s.report.step_times.values()) == 4  # 2 steps x 2 calls
    # Batch 1 against batch 2: equal up to float reassociation (measured max 1.4e-6 on latents up to 7.6).
    np.testing.assert_allclose(s.latents[-1], np.asarray(ref.generation.tokens), rtol=0, atol=1e-5)
    # Float images against the pipeline's uint8 ones: equal up to the 8-bit rounding.
    assert np.abs(np.round(s.images * 255.0) - ref.images.astype(np.float32)).max() <= 1.0
    assert np.abs(s.images[0] - s.images[1]).max() > 1e-2  # the two prompts differ
    small = dataclasses.replace(em, width=32, height=48)  # fine for dense (16 px multiples)
    with pytest.raises(ValueError, match="width 32 is not a multiple of 128"):
        small.adapt(evaluate.preset("flux"))  # patchify needs 128 px multiples
    with pytest.raises(ValueError, match="width 40 is not a multiple of 16"):
        dataclasses.replace(em, width=40)
