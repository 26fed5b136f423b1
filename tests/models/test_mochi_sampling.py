"""Mochi sampler: the schedule against diffusers' scheduler, a CFG run against diffusers' MochiPipeline, Chipmunk
with every key selected against dense (text groups of different lengths, step caching), no retrace, the CLI."""

from __future__ import annotations

import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline
from flax import nnx

import chipmunk_jax as cj
from chipmunk_jax import sampler as sampler_mod
from chipmunk_jax.indices import attn_top_k, unpack_bits
from convert_weights.mochi import convert_tensors
from models.mochi import MochiCache, forward
from models.mochi.generate import tiny_model_config
from models.mochi.sampling import (
    MochiDenoiser,
    MochiGeneration,
    generate,
    latent_size,
    linear_quadratic_sigmas,
    mochi_schedule,
    text_groups,
)
from tests.models.helpers import mochi_diffusers_model, mochi_from_diffusers, rel

FRAMES, HEIGHT, WIDTH = 7, 32, 32  # latents 2 x 4 x 4 -> token grid (2, 2, 2): 8 video tokens
LATENT = (2, 4, 4)
SLOTS, COND_VALID, NEG_VALID = 8, 5, 1  # as the CLI's random embeddings (the CLI test reuses the compiled step)
STEPS, GUIDE = 6, 4.5
SKIP = frozenset({3})


# ---------------------------------------------------------------------------------------------------------
# The schedule (no model).


def _diffusers_linear_quadratic(n: int, thr: float, linear: int) -> list[float]:
    """genmo's schedule as diffusers writes it (pipeline_mochi.linear_quadratic_schedule), for the comparison."""
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule

    return linear_quadratic_schedule(n, thr, linear)


@pytest.mark.parametrize("n, linear", [(2, None), (5, None), (7, 2), (64, None), (100, 30)])
def test_schedule_matches_diffusers_scheduler(n, linear):
    ref = _diffusers_linear_quadratic(n, 0.025, linear)
    np.testing.assert_allclose(linear_quadratic_sigmas(n, 0.025, linear), ref, rtol=0, atol=1e-15)
    sched = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)  # as genmo/mochi-1-preview's scheduler_config
    sched.set_timesteps(sigmas=np.asarray(ref), device="cpu")
    tau, ts = mochi_schedule(n, 0.025, linear)
    # Bit-identical: the same float32 casts in the same order.
    np.testing.assert_array_equal(tau, sched.sigmas.numpy())
    np.testing.assert_array_equal(ts, sched.timesteps.numpy())
    assert tau[0] == 0.0 and tau[-1] == 1.0 and np.all(np.diff(tau) > 0)


def test_schedule_and_sizes_errors():
    with pytest.raises(ValueError, match="at least 2 steps"):
        mochi_schedule(1)
    with pytest.raises(ValueError, match=r"linear_steps must be in \[1, 4\]"):
        mochi_schedule(5, linear_steps=5)
    assert latent_size(163, 480, 848) == (28, 60, 106)
    with pytest.raises(ValueError, match=r"frames 160 is not 6k\+1 \(nearest valid: 157 or 163\)"):
        latent_size(160, 480, 848)
    with pytest.raises(ValueError, match="height 470 is not a multiple of 16 .nearest valid: 464 or 480"):
        latent_size(163, 470, 848)


def test_text_groups():
    counts = np.array([5, 5, 1, 1])
    assert text_groups(counts, False) == (text_groups(counts, False)[0],)
    assert text_groups(counts, False)[0].rows == (0, 1, 2, 3) and text_groups(counts, False)[0].text_len is None
    split = text_groups(counts, True)
    assert [(g.rows, g.text_len) for g in split] == [((0, 1), 5), ((2, 3), 1)]
    assert [(g.rows, g.text_len) for g in text_groups(counts, True, "pad")] == [((0, 1, 2, 3), 5)]
    with pytest.raises(ValueError, match="unknown text_groups mode 'x'"):
        text_groups(counts, True, "x")


def test_numpy_random_draws_matrices_named_norm_as_matrices():
    """``numpy_random`` (random CLI weights): Mochi's ``norm_out`` is a [C, 2C] projection, not a norm scale; the
    per-layer RMS scales of the scanned blocks ([L, D]) and the last block's ([D]) stay around 1."""
    from models.mochi.transformer import MochiTransformer3D
    from models.video_io import numpy_random

    cfg = tiny_model_config()
    model = numpy_random(lambda: MochiTransformer3D(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32), seed=1)
    kernel = np.asarray(model.norm_out.kernel[...])
    assert kernel.shape == (cfg.dim, 2 * cfg.dim)
    assert abs(kernel.mean()) < 0.05 and 0.5 < kernel.std() * np.sqrt(kernel.shape[-1]) < 1.5  # N(0, 1/fan_in)
    for scale in (model.blocks.norm_q[...], model.last_block.norm_k[...]):
        scale = np.asarray(scale)
        assert abs(scale.mean() - 1.0) < 0.1 and 0.05 < scale.std() < 0.2  # 1 + 0.1 noise (16 to 32 values)
    pos = np.asarray(model.pos_frequencies[...])  # [3, H, D/2]: a matrix whose path names no norm
    assert abs(pos.mean()) < 0.1 and 0.5 < pos.std() * np.sqrt(pos.shape[-1]) < 1.5


def test_group_outputs_return_to_batch_order_before_guidance():
    """Two prompts of 1 and 5 tokens and two 1-token negatives: groups (rows 0, 2, 3) and (row 1), whose
    concatenated outputs must be put back in [cond; uncond] order before the CFG combination."""
    groups = text_groups(np.array([1, 5, 1, 1]), True)
    assert [g.rows for g in groups] == [(0, 2, 3), (1,)]
    den = MochiDenoiser(None, groups, cfg=True)
    per_row = np.array([10.0, 20.0, 1.0, 2.0], np.float32)  # model output of batch rows 0..3
    outs = [jnp.asarray(per_row[list(g.rows)])[:, None] for g in groups]
    got = np.asarray(den._guide(outs, jnp.float32(3.0)))[:, 0]
    np.testing.assert_allclose(got, [1.0 + 3.0 * (10.0 - 1.0), 2.0 + 3.0 * (20.0 - 2.0)])


# ---------------------------------------------------------------------------------------------------------
# Sampling with a tiny random model (the diffusers weights converted into ours).


@pytest.fixture(scope="module")
def setup():
    # The CLI's --tiny config (one scanned block and the last block, 12 latent channels): the CLI test below then
    # reuses the dense step compiled here.
    cfg = tiny_model_config()
    tm = mochi_diffusers_model(cfg, seed=0)  # every parameter random, pos_frequencies and norm weights included
    model = mochi_from_diffusers(cfg, tm)
    rng = np.random.default_rng(0)
    text = rng.standard_normal((1, SLOTS, cfg.text_dim)).astype(np.float32)
    neg = rng.standard_normal((1, SLOTS, cfg.text_dim)).astype(np.float32)
    mask = np.arange(SLOTS)[None] < COND_VALID
    neg_mask = np.arange(SLOTS)[None] < NEG_VALID
    noise = rng.standard_normal((1, cfg.in_channels, *LATENT)).astype(np.float32)
    return cfg, tm, model, (text, mask, neg, neg_mask), noise


def _run(setup, chipmunk=None, **kw) -> MochiGeneration:
    """The module's CFG generation on the setup's weights and embeddings (its noise unless ``noise=`` is given)."""
    _, _, model, (text, mask, neg, neg_mask), noise = setup
    kw = {"noise": noise, **kw}
    return generate(
        model,
        text,
        mask,
        negative_embeddings=neg,
        negative_mask=neg_mask,
        frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        steps=STEPS,
        guidance_scale=GUIDE,
        chipmunk=chipmunk,
        progress=False,
        **kw,
    )


@pytest.fixture(scope="module")
def dense_run(setup):
    return _run(setup)


def test_dense_run_matches_diffusers_mochi_pipeline(setup, dense_run):
    """CFG with a 5-token prompt and a 1-token negative prompt, 6 steps: diffusers' MochiPipeline (scheduler as
    the release configures it, output_type='latent') on the same random weights, every step's latents."""
    cfg, tm, _, (text, mask, neg, neg_mask), noise = setup
    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=tm,
    )
    steps = []

    def record(_pipe, i, t, kw):
        steps.append(kw["latents"].numpy().copy())
        return {}

    with torch.no_grad():
        want = pipe(
            prompt_embeds=torch.tensor(text),
            prompt_attention_mask=torch.tensor(mask),
            negative_prompt_embeds=torch.tensor(neg),
            negative_prompt_attention_mask=torch.tensor(neg_mask),
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_inference_steps=STEPS,
            guidance_scale=GUIDE,
            latents=torch.tensor(noise),
            output_type="latent",
            callback_on_step_end=record,
        ).frames.numpy()
    assert len(steps) == STEPS and dense_run.latents.shape == want.shape == (1, cfg.in_channels, *LATENT)
    assert set(dense_run.report.step_times) == {"attn=dense,mlp=dense"}
    assert rel(dense_run.latents, want) <= 5e-6  # measured 4.8e-7
    # The trajectory moved far from the noise (the comparison above could fail).
    assert rel(want, noise) > 0.5 and rel(steps[2], steps[-1]) > 0.05


def _all_keys_chipmunk(*, skip=SKIP, attn: bool = True) -> cj.ChipmunkConfig:
    """Mochi preset whose sparse steps select every key: top_keys 0.9 at tile 16 rounds up to all 13 / 9 columns
    of the two text groups, while each group still passes the static-mask sparsity test (static text columns +
    floor(0.9 * 8) < N), so the top-k selection really is used."""
    base = cj.preset("mochi")
    a = dataclasses.replace(
        base.attn,
        is_enabled=attn,
        top_keys=0.9,
        counts_multiple_of=16,
        random_keys=0.0,
        local_voxels=0,
        full_step_schedule=frozenset({0, 1, 4}),
        first_n_dense_layers=1,
    )
    return base.replace(attn=a, step_caching=cj.StepCachingConfig(is_enabled=bool(skip), skip_step_schedule=skip))


@pytest.fixture(scope="module")
def cached_dense_run(setup):
    return _run(setup, _all_keys_chipmunk(attn=False))


def test_step_caching_runs_the_head_on_the_latest_hidden_states(setup, dense_run, cached_dense_run):
    """Dense + step caching against a loop written out: the transformer on computed steps, on step 3 the output
    head on step 2's hidden states at step 3's timestep (SPEC §4), diffusers' scheduler for the update."""
    cfg, _, model, (text, mask, neg, neg_mask), noise = setup
    assert set(cached_dense_run.report.step_times) == {"attn=dense,mlp=dense", "skip"}
    graphdef, state = nnx.split(model)
    sched = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    sched.set_timesteps(sigmas=linear_quadratic_sigmas(STEPS), device="cpu")
    ctx = jnp.asarray(np.concatenate([text, neg])[:, :COND_VALID])  # [cond; uncond], cut to the longest prompt
    cmask = jnp.asarray(np.concatenate([mask, neg_mask])[:, :COND_VALID])
    x = torch.tensor(noise)
    hidden = None
    for i, t in enumerate(sched.timesteps):
        ts = jnp.full((2,), float(t), jnp.float32)
        if i in SKIP:
            out = model.final_layer(hidden, ts, ctx, cmask, (2, 2, 2))
        else:
            xj = jnp.asarray(x.numpy())
            cache = MochiCache(hidden=jnp.zeros((2, 8, cfg.dim), jnp.float32))
            out, cache = forward(graphdef, state, jnp.concatenate([xj, xj]), ts, ctx, cmask, cache)
            hidden = cache.hidden
        out = np.asarray(out, np.float32)
        v = out[1:] + GUIDE * (out[:1] - out[1:])
        x = sched.step(torch.tensor(v), t, x).prev_sample
    assert rel(cached_dense_run.latents, x.numpy()) <= 5e-6  # measured 3.4e-7
    assert rel(cached_dense_run.latents, dense_run.latents) > 1e-3  # the skipped step changed the result


def test_chipmunk_with_all_keys_selected_equals_dense(setup, cached_dense_run):
    cfg, _, model, *_ = setup
    chip = _all_keys_chipmunk()
    for n in (8 + COND_VALID, 8 + NEG_VALID):
        assert attn_top_k(chip.attn, n) >= n
    got = _run(setup, chip, backend="xla")
    # Prompt (5 tokens) and negative prompt (1 token) differ: two exact model calls per step.
    assert [(g.rows, g.text_len) for g in got.groups] == [((0,), COND_VALID), ((1,), NEG_VALID)]
    labels = list(got.report.step_times)
    for kind in ("attn=warmup", "attn=mask", "attn=sparse", "skip"):
        assert any(kind in label for label in labels), (kind, labels)
    assert len(got.report.step_times["skip"]) == len(SKIP)
    for cache, valid in zip(got.state.cache, (COND_VALID, NEG_VALID), strict=True):
        n = 8 + valid
        assert cache.attn.out.shape == (cfg.num_layers - 1, 1, cfg.heads, n, cfg.head_dim)
        assert np.asarray(unpack_bits(cache.attn.mask_bits, n)).all()
    assert got.report.stats["attention density (keys kept / keys)"] == pytest.approx(1.0)
    assert rel(got.latents, cached_dense_run.latents) <= 5e-6  # measured 3.7e-7


def test_pad_mode_marks_every_row_valid_up_to_the_longest_prompt(setup, dense_run):
    """text_group_mode='pad': one call in which the 1-token negative prompt is treated as 5 tokens long (T5's
    padding outputs included): the dense model with the negative mask extended to 5 tokens. The preset keeps the
    first 2 layers dense, so on this 2-layer model only the text handling (cut to text_len, voxel order) differs."""
    _, _, model, (text, mask, neg, _), noise = setup
    pad = _run(setup, cj.preset("mochi"), text_group_mode="pad")
    assert [(g.rows, g.text_len) for g in pad.groups] == [((0, 1), COND_VALID)]
    want = generate(
        model,
        text,
        mask,
        negative_embeddings=neg,
        negative_mask=np.arange(SLOTS)[None] < COND_VALID,
        frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        steps=STEPS,
        guidance_scale=GUIDE,
        noise=noise,
        progress=False,
    )
    assert rel(pad.latents, want.latents) <= 5e-6
    assert rel(pad.latents, dense_run.latents) > 1e-3  # not what diffusers computes: an approximation


def test_second_generation_does_not_retrace(setup, dense_run):
    before = dict(sampler_mod.TRACE_COUNTS)
    again = _run(setup)
    assert dict(sampler_mod.TRACE_COUNTS) == before
    assert again.report.compile_s == {}
    np.testing.assert_array_equal(np.asarray(again.latents), np.asarray(dense_run.latents))


def test_generate_argument_errors(setup):
    _, _, model, (text, mask, neg, neg_mask), noise = setup
    kw = dict(frames=FRAMES, height=HEIGHT, width=WIDTH, steps=2, progress=False)
    with pytest.raises(ValueError, match="needs negative_embeddings and negative_mask"):
        generate(model, text, mask, **kw)
    bad = mask.copy()
    bad[0, 0] = False
    with pytest.raises(ValueError, match="valid tokens of each row must come first"):
        generate(model, text, bad, negative_embeddings=neg, negative_mask=neg_mask, **kw)
    with pytest.raises(ValueError, match=r"text_mask must be \(1, 8\)"):
        generate(model, text, mask[:, :4], guidance_scale=1.0, **kw)
    with pytest.raises(ValueError, match="no sharded attention"):
        generate(model, text, mask, guidance_scale=1.0, mesh=object(), **kw)
    with pytest.raises(ValueError, match="mlp.is_enabled = false"):
        generate(model, text, mask, guidance_scale=1.0, chipmunk=cj.preset("flux"), **kw)
    with pytest.raises(ValueError, match=r"noise must be \(1, 12, 2, 4, 4\)"):
        generate(model, text, mask, guidance_scale=1.0, noise=noise[:, :, :1], **kw)
    with pytest.raises(ValueError, match=r"frames 8 is not 6k\+1"):
        generate(model, text, mask, **{**kw, "frames": 8})


# ---------------------------------------------------------------------------------------------------------
# The CLI.


def _cli(tmp_path, *extra):
    from models.mochi.generate import main

    return main(["--random-weights", "--tiny", "--no-progress", "--out-dir", str(tmp_path), *extra])


# subprocess starts ffmpeg by fork + exec; JAX warns on any fork, harmless here as exec follows at once.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called")
def test_cli_end_to_end_tiny(tmp_path, capsys):
    """Random tiny transformer and VAE: latents, both reports and a decoded MP4 of 6 (F - 1) + 1 frames."""
    import imageio_ffmpeg

    size = ["--frames", str(FRAMES), "--size", f"{WIDTH}x{HEIGHT}", "--steps", str(STEPS)]
    assert _cli(tmp_path, *size, "--dense", "--dtype", "float32", "--random-vae") == 0
    lat = np.load(tmp_path / "latents.npy")
    assert lat.shape == (1, 12, *LATENT) and np.isfinite(lat).all()
    report = (tmp_path / "report.txt").read_text()
    assert "dense Mochi 1" in report and "attn=dense,mlp=dense" in report and f"{STEPS} steps" in report
    rj = json.loads((tmp_path / "report.json").read_text())
    assert (
        rj["text_groups"] == [{"rows": [0, 1], "text_len": None}]
        and len(rj["step_times_s"]["attn=dense,mlp=dense"]) == STEPS
    )
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "video_0.mp4"))
    assert tuple(next(reader)["size"]) == (WIDTH, HEIGHT)
    assert sum(1 for _ in reader) == FRAMES
    assert "wrote" in capsys.readouterr().out


def test_cli_embeddings_file_is_checked(tmp_path, capsys):
    from models.mochi.generate import main

    emb = np.zeros((1, 5, 32), np.float32)
    path = tmp_path / "emb.npz"
    base = ["--random-weights", "--tiny", "--embeddings", str(path), "--frames", "7", "--size", "32x32"]
    np.savez(path, prompt_embeds=emb)
    assert main(base) == 2
    assert "lacks ['prompt_attention_mask']" in capsys.readouterr().err
    np.savez(path, prompt_embeds=emb, prompt_attention_mask=np.ones((1, 5), bool))
    assert main(base) == 2
    assert "needs 'negative_prompt_embeds'" in capsys.readouterr().err
    np.savez(path, prompt_embeds=emb, prompt_attention_mask=np.ones((1, 4), bool))
    assert main([*base, "--guidance", "1"]) == 2
    assert "'prompt_attention_mask' must be (1, 5)" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "nope"), "--embeddings", str(path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_checkpoint_and_embeddings_reproduce_generate(setup, dense_run, tmp_path):
    """--checkpoint (a converted directory, read by models.mochi.load) + --embeddings with the masks give
    generate()'s latents (same noise seed, dense)."""
    from convert_weights.common import make_manifest, write_checkpoint
    from models.mochi.generate import main

    cfg, tm, _, (text, mask, neg, neg_mask), _ = setup
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    params = convert_tensors(sd, cfg)
    manifest = make_manifest(
        model="mochi",
        variant="mochi",
        source_format="diffusers",
        config=cfg,
        dtype=np.float32,
        params=params,
        files=[],
        hash_sources=False,
    )
    write_checkpoint(tmp_path / "ckpt", params, manifest)
    np.savez(
        tmp_path / "emb.npz",
        prompt_embeds=text,
        prompt_attention_mask=mask,
        negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask,
    )
    size = ["--frames", str(FRAMES), "--size", f"{WIDTH}x{HEIGHT}", "--steps", str(STEPS), "--guidance", str(GUIDE)]
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--embeddings", str(tmp_path / "emb.npz"), *size]
    assert main([*argv, "--seed", "3", "--dense", "--no-progress", "--out-dir", str(tmp_path / "o")]) == 0
    got = np.load(tmp_path / "o" / "latents.npy")
    want = _run(setup, seed=3, noise=None)  # the seed's noise, as the CLI draws it
    np.testing.assert_array_equal(got, np.asarray(want.latents))
    assert rel(got, dense_run.latents) > 0.1  # another seed: the comparison above could fail


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frames", "8"], r"frames 8 is not 6k\+1 \(nearest valid: 7 or 13\)"),
        (["--size", "840x480"], "width 840 is not a multiple of 16"),
        (["--size", "big"], "WIDTHxHEIGHT"),
        (["--steps", "1"], "--steps must be >= 2"),
        (["--prompt", "a fox"], "--prompt needs --t5, --tokenizer"),
    ],
)
def test_cli_rejects_bad_arguments_before_compute(tmp_path, capsys, args, message):
    assert _cli(tmp_path, *args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "latents.npy").exists()


def test_cli_help_teaches():
    from models.mochi.generate import build_parser

    text = build_parser().format_help()
    for needle in ("examples:", "6k+1", "prompt_attention_mask", "--random-weights --tiny", "--t5", "imageio-ffmpeg"):
        assert needle in text, needle
