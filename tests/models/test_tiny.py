"""The tiny pixel-space Flux: dataset, packing, training, sampling parity with ``generate``, evaluate CLI, checkpoint.

PSNR / SSIM against known values are covered by tests/test_metrics.py.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chipmunk_jax import evaluate
from models.flux.model import Flux, position_ids, rope_table
from models.flux.sampling import unpack_latents
from models.tiny import dataset
from models.tiny import model as tm
from models.tiny import sampling as ts
from models.tiny import train as tt


def test_dataset_is_deterministic_and_labels_match_the_pixels():
    a, la = dataset.batch(7, 100, 24)
    b, lb = dataset.batch(7, 100, 24)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    c, _ = dataset.batch(8, 100, 24)
    assert np.abs(a - c).max() > 0.1
    assert a.dtype == np.float32 and a.shape == (24, 64, 64, 3) and 0.0 <= a.min() and a.max() <= 1.0
    assert len(set(la.tolist())) > 6  # labels vary
    for i in range(24):
        img, label, mask = dataset.example(7, 100 + i)
        np.testing.assert_array_equal(img, a[i])
        shape, colour = dataset.split_label(label)
        assert dataset.read_class(img) == (shape, colour), (i, dataset.class_name(label))
        fg = np.asarray(list(dataset.COLOURS.values())[colour], np.float32)
        np.testing.assert_allclose(img[mask == 1.0], np.broadcast_to(fg, img[mask == 1.0].shape), atol=1e-6)
        # Backgrounds are greyish: far from every saturated class colour.
        assert np.abs(img[mask == 0.0][:, None, :] - np.asarray(list(dataset.COLOURS.values()))).max(-1).min() > 0.1


def test_pixel_token_packing_inverts_flux_unpacking():
    imgs, labels = dataset.batch(0, 0, 3)
    tok = tm.image_to_tokens(jnp.asarray(imgs))
    assert tok.shape == (3, 256, 48)
    np.testing.assert_allclose(np.asarray(tm.latent_to_image(unpack_latents(tok, 16, 16))), imgs, atol=1e-6)
    # A token holds one 4x4 pixel patch: token (r, c) of the 16x16 grid sees pixels [4r:4r+4, 4c:4c+4].
    patch = (imgs[1, 8:12, 20:24] * 2 - 1).reshape(-1)
    np.testing.assert_allclose(np.sort(np.asarray(tok[1, 2 * 16 + 5])), np.sort(patch), atol=1e-6)
    txt, y = tm.conditioning(labels)
    assert txt.shape == (3, tm.TXT_LEN, tm.CONTEXT_DIM) and y.shape == (3, dataset.NUM_CLASSES)
    for i, lab in enumerate(labels):
        s, c = dataset.split_label(lab)
        assert int(jnp.argmax(y[i])) == lab
        assert int(jnp.argmax(txt[i, 0])) == s and int(jnp.argmax(txt[i, 1])) == len(dataset.SHAPES) + c


def test_short_training_reduces_the_loss(tmp_path):
    cfg = tm.tiny_flux_config_for(32, 1, 0)
    tc = tt.TrainConfig(batch=4, lr=3e-3, warmup=3, seed=1, min_lr_frac=1.0)  # no decay over these 15 steps
    rope = rope_table(position_ids(tm.TXT_LEN, 16, 16), cfg.axes_dim, cfg.theta)
    imgs, labels = dataset.batch(99, 0, 8)
    tok, lab = tm.image_to_tokens(jnp.asarray(imgs)), jnp.asarray(labels)

    @jax.jit
    def loss(graphdef, params):
        model = nnx.merge(graphdef, params)
        return jnp.mean(jnp.stack([tt.flow_matching_loss(model, tok, lab, jax.random.key(k), rope) for k in range(4)]))

    def held_out(model):
        return float(loss(*nnx.split(model)))

    before = held_out(tm.init_model(cfg, seed=tc.seed))
    model, hist = tt.train(cfg, tc, budget_s=600.0, max_steps=15, progress=False, log_every=0)
    assert hist["steps"] == 15 and len(hist["loss"]) == 15
    after = held_out(model)
    assert after < 0.8 * before, (before, after)
    out = tm.save_checkpoint(model, tmp_path / "ck", {"command": "test"})
    loaded, meta = tm.load_checkpoint(out)
    assert meta["command"] == "test" and meta["flux_config"] == cfg.to_dict()
    np.testing.assert_allclose(held_out(loaded), after, rtol=2e-2)  # float16 storage
    # Continuing from the checkpoint (train --init) starts from its weights: one more step stays near them.
    more, hist2 = tt.train(cfg, tc, budget_s=600.0, max_steps=1, progress=False, log_every=0, init=loaded)
    assert hist2["steps"] == 1 and held_out(more) < 0.9 * before
    with pytest.raises(ValueError, match="config"):
        tt.train(tm.tiny_flux_config_for(64, 1, 0), tc, budget_s=1.0, max_steps=1, progress=False, init=loaded)


def _random_tiny():
    return Flux(tm.tiny_flux_config_for(32, 1, 2), rngs=nnx.Rngs(5), dtype=jnp.float32)


def test_trajectory_matches_generate_dense_and_chipmunk():
    model, labels, cfg = _random_tiny(), np.array([2, 7]), ts.tiny_preset()
    assert cfg.attn.top_keys == 0.165 and cfg.mlp.top_keys == 0.3 and cfg.attn.counts_multiple_of == 16
    for chip in (None, cfg):
        imgs, gen = ts.generate_images(model, labels, steps=3, seed=5, chipmunk=chip)
        traj = ts.sample_trajectory(model, labels, steps=3, seed=5, chipmunk=chip)
        assert traj.latents.shape == (3, 2, 256, 48)
        np.testing.assert_array_equal(traj.latents[-1], np.asarray(gen.tokens))
        np.testing.assert_array_equal(traj.images, imgs)
        assert set(traj.report.step_times) == set(gen.report.step_times)
    assert traj.report.stats["attention sparsity"] > 0.5


def test_evaluate_cli_end_to_end_on_a_random_model(tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["--random-weights", "--images", "2", "--steps", "3", "--seeds", "5"]
    assert evaluate.main([*args, "--sweep-top-keys", "0.165,0.5", "--out-dir", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert table.count("\n") == 4 and "| top_keys=0.165 |" in table and "| top_keys=0.5 |" in table
    assert table in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["top_keys"] for r in rows] == [0.165, 0.5]
    for r in rows:
        assert len(r["step_rel_err"]) == 3 and r["step_rel_err"][0] < 1e-5  # step 0 is dense everywhere
        assert r["step_rel_err"][-1] > 1e-4 and np.isfinite(r["psnr_mean"])
    assert rows[0]["attn_sparsity"] > rows[1]["attn_sparsity"]  # fewer keys kept at the smaller top_keys
    from PIL import Image

    with Image.open(out / "plot.png") as im:
        assert im.size == (960, 360)
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 4  # something was drawn


def test_evaluate_config_yaml_and_unknown_key(tmp_path):
    yml = tmp_path / "c.yml"
    yml.write_text("attn:\n  top_keys: 0.4\n")
    em = evaluate.TinyEvalModel(_random_tiny(), np.array([0]), steps=3)
    args = evaluate.build_parser().parse_args(["--config", str(yml)])
    cfg = evaluate.run_config(args, em)
    assert cfg.attn.top_keys == 0.4 and cfg.attn.mbm == 16 and cfg.mlp.bm == 64  # tile sizes scaled to the model
    # Tile sizes the YAML sets are kept (they used to be overwritten by the tiny model's scaling).
    yml.write_text("attn:\n  top_keys: 0.4\n  mbm: 64\nmlp:\n  bm: 16\n")
    cfg = evaluate.run_config(args, em)
    assert (cfg.attn.top_keys, cfg.attn.mbm, cfg.mlp.bm, cfg.attn.counts_multiple_of) == (0.4, 64, 16, 16)
    assert evaluate.run_config(evaluate.build_parser().parse_args([]), em) == ts.tiny_preset()
    yml.write_text("attn:\n  top_key: 0.4\n")
    with pytest.raises(ValueError, match="top_keys"):
        evaluate.main(["--random-weights", "--config", str(yml), "--out-dir", str(tmp_path / "x")])


def test_shipped_checkpoint_draws_recognisable_shapes():
    model, meta = tm.load_checkpoint()
    assert meta["weights_dtype"] == "float16" and meta["command"].startswith("python -m models.tiny.train")
    assert model.cfg == tm.tiny_flux_config() and model.dtype == jnp.float32
    labels = np.arange(dataset.NUM_CLASSES)
    imgs, gen = ts.generate_images(model, labels, steps=20, seed=3)
    assert imgs.shape == (12, 64, 64, 3) and np.isfinite(imgs).all()
    assert sum(len(v) for v in gen.report.step_times.values()) == 20
    # Shape and colour read back from the pixels: 11 of 12 when measured (the first shipped model, which drew
    # coloured blobs, got 1 of 12; an untrained one 0).
    rate = dataset.recognition_rate(imgs, labels)
    assert rate["class"] >= 0.75, rate


def test_read_class_rejects_images_without_a_shape():
    rng = np.random.default_rng(0)
    img, _ = dataset.render(5, rng)
    grey = np.full_like(img, 0.5)
    assert dataset.read_class(grey) is None
    tiny_dot = grey.copy()
    tiny_dot[30:34, 30:34] = dataset.COLOURS["red"]  # 16 pixels: too small to be a drawn shape
    assert dataset.read_class(tiny_dot) is None
    assert dataset.recognition_rate(np.stack([img, grey]), [5, 5]) == {"class": 0.5, "shape": 0.5, "colour": 0.5}


def test_tiny_preset_only_changes_tile_sizes():
    base, tiny = evaluate.preset("flux"), ts.tiny_preset()
    changed = {
        (sec, f.name)
        for sec in ("attn", "mlp", "patchify", "step_caching")
        for f in dataclasses.fields(getattr(base, sec))
        if getattr(getattr(base, sec), f.name) != getattr(getattr(tiny, sec), f.name)
    }
    assert changed == {("attn", "counts_multiple_of"), ("attn", "mbm"), ("mlp", "bm"), ("mlp", "counts_multiple_of")}


def test_negative_label_is_the_null_condition():
    txt, y = tm.conditioning(np.array([-1, 6]))
    assert txt.shape == (2, tm.TXT_LEN, tm.CONTEXT_DIM) and y.shape == (2, dataset.NUM_CLASSES)
    assert not np.asarray(txt[0]).any() and not np.asarray(y[0]).any()
    # Class 6 = square (1) in blue (2): shape token one-hot at 1, colour token at 3 + 2, y one-hot at 6.
    assert (
        np.asarray(txt[1, 0]).argmax() == 1 and np.asarray(txt[1, 1]).argmax() == 5 and np.asarray(y[1]).argmax() == 6
    )
    assert np.asarray(txt[1]).sum() == 2 and np.asarray(y[1]).sum() == 1


def test_token_dropping_keeps_tokens_and_rope_rows_aligned():
    n, c, scale = 256, 48, 1000.0
    tokens = jnp.broadcast_to(scale * jnp.arange(n, dtype=jnp.float32)[None, :, None], (2, n, c))
    h, w = tm.token_grid()
    cos, sin = rope_table(position_ids(tm.TXT_LEN, h, w), (4, 14, 14), 10000)
    seen = {}

    def model(xt, txt, y, t, guidance, rope):
        seen.update(xt=xt, txt=txt, t=t, rope=rope)
        return jnp.zeros_like(xt), None

    labels = jnp.array([3, 4])
    loss = tt.flow_matching_loss(model, tokens, labels, jax.random.key(1), (cos, sin), 0.0, 0.25)
    assert seen["xt"].shape == (2, 64, c) and np.isfinite(float(loss))
    # Which image token each kept one is: x_t = (1 - t) x_0 + t eps with x_0 = 1000 * index.
    t = np.asarray(seen["t"])[:, None, None]
    index = np.rint((np.asarray(seen["xt"]) / ((1.0 - t) * scale)).mean(axis=(0, 2))).astype(int)
    assert len(set(index.tolist())) == 64 and (np.diff(index) > 0).all() and index.max() < n
    rc, rs = (np.asarray(a) for a in seen["rope"])
    np.testing.assert_array_equal(rc[: tm.TXT_LEN], np.asarray(cos)[: tm.TXT_LEN])
    np.testing.assert_array_equal(rc[tm.TXT_LEN :], np.asarray(cos)[tm.TXT_LEN + index])
    np.testing.assert_array_equal(rs[tm.TXT_LEN :], np.asarray(sin)[tm.TXT_LEN + index])
    # Label dropout: with p_uncond close to 1 every row gets the null condition.
    tt.flow_matching_loss(model, tokens, labels, jax.random.key(1), (cos, sin), 0.999, 1.0)
    assert seen["xt"].shape == (2, n, c) and not np.asarray(seen["txt"]).any()
    with pytest.raises(ValueError, match="token_keep"):
        tt.TrainConfig(token_keep=0.0)
    with pytest.raises(ValueError, match="p_uncond"):
        tt.TrainConfig(p_uncond=1.0)


def test_guided_sampling_at_scale_one_is_generate():
    model, labels = _random_tiny(), np.array([0, 5, 11])
    imgs, _ = ts.generate_images(model, labels, steps=3, seed=4)
    guided = ts.guided_images(model, labels, [1.0, 3.0], steps=3, seed=4)
    assert guided[1.0].shape == (3, 64, 64, 3)
    np.testing.assert_allclose(guided[1.0], imgs, atol=2e-5)
    assert np.abs(guided[3.0] - imgs).max() > 1e-2  # the null condition changes the velocity
