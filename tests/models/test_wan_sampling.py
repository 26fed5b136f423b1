"""Wan sampler: dense CFG + UniPC against a hand-written loop over the model and diffusers' scheduler, step
caching on skipped steps, Chipmunk with every key selected against dense, sizes, the CLI end to end."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import chipmunk_jax as cj
from chipmunk_jax.indices import unpack_bits
from models.video_io import numpy_random, to_uint8_frames, write_pngs, write_video
from models.wan import WanCache, WanTransformer3D, forward, tiny_config
from models.wan.sampling import default_shift, generate, latent_size
from tests.models.helpers import diffusers_unipc, rel, torch_state, wan_torch_model

FRAMES, HEIGHT, WIDTH = 5, 64, 96  # latents 2 x 8 x 12 -> token grid (2, 4, 6), 48 tokens
LATENT = (2, 8, 12)
GRID = (2, 4, 6)
STEPS, SHIFT, GUIDE = 7, 5.0, 4.0
SKIP = frozenset({3, 5})


def _randomised(cfg, seed: int) -> WanTransformer3D:
    """A float32 tiny Wan with every parameter (norm scales and modulation tables included) drawn at random."""
    # Drawn with numpy on the abstract model: compiling jax.random for every leaf takes seconds on CPU.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WanTransformer3D(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)))
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, new))


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    model = _randomised(cfg, 0)
    rng = np.random.default_rng(0)
    # 16 text tokens, as the CLI's random embeddings: the CLI test below then reuses the compiled dense step.
    text = jnp.asarray(rng.standard_normal((1, 16, cfg.text_dim)), jnp.float32)
    neg = jnp.asarray(rng.standard_normal((1, 16, cfg.text_dim)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((1, cfg.in_channels, *LATENT)), jnp.float32)
    return model, text, neg, noise


def _step_caching_only(skip) -> cj.ChipmunkConfig:
    base = cj.preset("wan")
    return base.replace(
        attn=dataclasses.replace(base.attn, is_enabled=False),
        step_caching=cj.StepCachingConfig(is_enabled=True, skip_step_schedule=skip),
    )


def _run(setup, chipmunk, *, model=None, **kw):
    """The module's CFG generation at the test size on the setup's prompt embeddings; the setup's model and noise
    unless ``model=`` / ``noise=`` are given."""
    setup_model, text, neg, noise = setup
    kw = {"noise": noise, **kw}
    return generate(
        setup_model if model is None else model,
        text,
        neg,
        frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        steps=STEPS,
        guidance=GUIDE,
        shift=SHIFT,
        chipmunk=chipmunk,
        progress=False,
        **kw,
    )


def _hand_loop(setup, skip=frozenset()) -> np.ndarray:
    """Wan's CFG loop written out: the transformer (jitted forward), diffusers' UniPC in float64, and on a
    skipped step the output head on the hidden states of the latest computed step (SPEC §4)."""
    model, text, neg, noise = setup
    sched = diffusers_unipc(SHIFT)
    sched.set_timesteps(STEPS)
    graphdef, state = nnx.split(model)
    ctx = jnp.concatenate([text, neg])
    x = torch.tensor(np.asarray(noise), dtype=torch.float64)
    hidden = None
    for i, t in enumerate(sched.timesteps):
        ts = jnp.full((2,), float(t), jnp.float32)
        if i in skip:
            out = model.final_layer(hidden, ts, GRID)
        else:
            xj = jnp.asarray(x.numpy(), jnp.float32)
            cache = WanCache(hidden=jnp.zeros((2, 48, model.cfg.dim), jnp.float32)) if skip else None
            out, cache = forward(graphdef, state, jnp.concatenate([xj, xj]), ts, ctx, cache)
            hidden = cache.hidden
        out = np.asarray(out, np.float64)
        v = out[1:] + GUIDE * (out[:1] - out[1:])
        x = sched.step(torch.tensor(v), t, x).prev_sample
    return x.numpy()


@pytest.fixture(scope="module")
def dense_run(setup):
    return _run(setup, None)


@pytest.fixture(scope="module")
def cached_run(setup):
    return _run(setup, _step_caching_only(SKIP))


def test_dense_sampler_equals_hand_written_loop(setup, dense_run):
    want = _hand_loop(setup)
    assert dense_run.latents.shape == (1, 4, *LATENT)
    assert set(dense_run.report.step_times) == {"attn=dense,mlp=dense"}
    assert rel(dense_run.latents, want) <= 1e-5


def test_step_caching_reuses_latest_hidden_states_per_branch(setup, dense_run, cached_run):
    want = _hand_loop(setup, skip=SKIP)
    assert set(cached_run.report.step_times) == {"attn=dense,mlp=dense", "skip"}
    assert len(cached_run.report.step_times["skip"]) == len(SKIP)
    assert rel(cached_run.latents, want) <= 1e-5
    # The skipped steps changed the trajectory: the comparison above could fail.
    assert rel(cached_run.latents, dense_run.latents) > 1e-3


def test_chipmunk_with_all_keys_selected_equals_dense(setup, cached_run):
    base = cj.preset("wan")
    # 48 tokens, one query group. top_keys 0.9 with tile 16 selects 16 * round(43.2 / 16) = 48 keys (all), while
    # the group still passes the static-mask sparsity test (0 static + 43 < 48), so the top-k part is used.
    attn = dataclasses.replace(
        base.attn,
        top_keys=0.9,
        counts_multiple_of=16,
        random_keys=0.0,
        local_voxels=0,
        full_step_schedule=frozenset({0, 1, 4}),
        first_n_dense_layers=1,
    )
    chip = base.replace(attn=attn, step_caching=cj.StepCachingConfig(is_enabled=True, skip_step_schedule=SKIP))
    got = _run(setup, chip)
    labels = list(got.report.step_times)
    for kind in ("attn=warmup", "attn=mask", "attn=sparse", "skip"):
        assert any(kind in label for label in labels), (kind, labels)
    assert len(got.report.step_times["skip"]) == len(SKIP)
    cache = got.state.cache.attn
    assert cache.out.shape[:2] == (2, 2)  # layers 1-2 keep a cache; batch 2 = cond + uncond
    assert np.asarray(unpack_bits(cache.mask_bits, 48)).all()
    assert got.report.stats["attention density (keys kept / keys)"] == pytest.approx(1.0)
    assert rel(got.latents, cached_run.latents) <= 1e-5


def test_guidance_one_runs_the_conditional_branch_only(setup):
    model, text, _, noise = setup
    got = generate(
        model,
        text,
        None,
        frames=FRAMES,
        height=HEIGHT,
        width=WIDTH,
        steps=2,
        guidance=1.0,
        noise=noise,
        solver="euler",
        progress=False,
    )
    assert got.latents.shape == noise.shape and np.isfinite(np.asarray(got.latents)).all()
    with pytest.raises(ValueError, match="unknown solver 'dpm'"):
        generate(model, text, None, frames=FRAMES, height=HEIGHT, width=WIDTH, guidance=1.0, solver="dpm")
    with pytest.raises(ValueError, match="negative_text"):
        generate(model, text, None, frames=FRAMES, height=HEIGHT, width=WIDTH, steps=2, guidance=5.0)


def test_sizes_are_checked_with_clear_errors():
    assert latent_size(81, 480, 832) == (21, 60, 104)
    assert latent_size(1, 16, 16) == (1, 2, 2)
    with pytest.raises(ValueError, match=r"frames 80 is not 4k\+1 \(nearest valid: 77 or 81\)"):
        latent_size(80, 480, 832)
    with pytest.raises(ValueError, match="width 830 is not a multiple of 16 .nearest valid: 816 or 832"):
        latent_size(81, 480, 830)
    assert default_shift(480, 832) == 3.0 and default_shift(720, 1280) == 5.0


# ---------------------------------------------------------------------------------------------------------
# The CLI.


def _cli(tmp_path, *extra):
    from models.wan.generate import main

    return main(["--random-weights", "--tiny", "--no-progress", "--out-dir", str(tmp_path), *extra])


def test_cli_end_to_end_tiny(tmp_path, capsys):
    rc = _cli(tmp_path, "--frames", "5", "--size", "96x64", "--steps", str(STEPS), "--dense", "--dtype", "float32")
    assert rc == 0
    lat = np.load(tmp_path / "latents.npy")
    assert lat.shape == (1, 4, 2, 8, 12) and np.isfinite(lat).all()
    report = (tmp_path / "report.txt").read_text()
    assert "dense Wan2.1" in report and "attn=dense,mlp=dense" in report and f"{STEPS} unipc steps" in report
    assert "latents only" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frames", "80"], r"frames 80 is not 4k\+1"),
        (["--size", "830x480"], "width 830 is not a multiple of 16"),
        (["--size", "big"], "WIDTHxHEIGHT"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--prompt", "a fox"], "--prompt needs --umt5, --tokenizer"),
        (["--frames", "5", "--size", "1280x720"], "exceeds the RoPE table"),
    ],
)
def test_cli_rejects_bad_arguments_before_compute(tmp_path, capsys, args, message):
    import re

    assert _cli(tmp_path, *args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "latents.npy").exists()


def test_cli_embeddings_file_is_checked(tmp_path, capsys):
    from models.wan.generate import main

    cond = np.zeros((1, 5, 24), np.float32)
    np.savez(tmp_path / "emb.npz", prompt_embeds=cond)
    argv = ["--random-weights", "--tiny", "--embeddings", str(tmp_path / "emb.npz"), "--frames", "5", "--size", "64x64"]
    assert main(argv) == 2
    assert "needs 'negative_prompt_embeds'" in capsys.readouterr().err
    np.savez(tmp_path / "emb.npz", prompt_embeds=cond[..., :20], negative_prompt_embeds=cond)
    assert main(argv) == 2
    assert "must be [B, L, 24]" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "nope"), "--embeddings", str(tmp_path / "emb.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "manifest.json").write_text('{"model": "wan_vae", "config": {"z_dim": 16}}')
    assert main(["--random-weights", "--tiny", "--vae", str(tmp_path / "vae"), "--frames", "5", "--size", "64x64"]) == 2
    assert "the VAE has 16 latent channels, the model 4" in capsys.readouterr().err


def test_cli_help_teaches():
    from models.wan.generate import build_parser

    text = build_parser().format_help()
    for needle in ("examples:", "4k+1", "prompt_embeds", "--random-weights --tiny", "--vae", "imageio-ffmpeg"):
        assert needle in text, needle


# subprocess starts ffmpeg by fork + exec; JAX warns on any fork, harmless here as exec follows at once.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called")
def test_video_writers_round_trip(tmp_path):
    import imageio_ffmpeg
    from PIL import Image

    rng = np.random.default_rng(0)
    video = np.clip(rng.standard_normal((1, 3, 5, 32, 48)), -1, 1).astype(np.float32)
    frames = to_uint8_frames(video)
    assert frames.shape == (1, 5, 32, 48, 3) and frames.dtype == np.uint8
    assert frames[0, 2, 3, 4, 1] == np.uint8(np.clip(np.round((video[0, 1, 2, 3, 4] + 1) * 127.5), 0, 255))
    path = write_video(frames[0], tmp_path / "v.mp4", fps=16)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    assert tuple(meta["size"]) == (48, 32)
    assert sum(1 for _ in reader) == 5
    d = write_pngs(frames[0], tmp_path / "png")
    assert sorted(p.name for p in d.iterdir()) == [f"{i:04d}.png" for i in range(5)]
    np.testing.assert_array_equal(np.asarray(Image.open(d / "0003.png")), frames[0, 3])


def test_prompt_embeddings_are_zero_past_the_tokens():
    """--prompt path: UMT5 hidden states of the real tokens, zeros after them (diffusers' WanPipeline)."""
    import tokenizers

    from models.text_encoders.t5 import UMT5_TINY, T5Encoder
    from models.text_encoders.tokenizers import TextTokenizer
    from models.wan.generate import encode_prompts

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "red": 4, "fox": 5}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = TextTokenizer(tok, 8, "<pad>")
    encoder = numpy_random(lambda: T5Encoder(UMT5_TINY, rngs=nnx.Rngs(0)))
    emb = np.asarray(encode_prompts(encoder, tokenizer, ["a red fox", "fox"]))
    assert emb.shape == (2, 8, UMT5_TINY.d_model)
    ids = tokenizer(["a red fox", "fox"])
    want = np.asarray(encoder(jnp.asarray(ids.input_ids), jnp.asarray(ids.attention_mask)))
    np.testing.assert_allclose(emb[0, :4], want[0, :4], rtol=1e-6)
    np.testing.assert_allclose(emb[1, :2], want[1, :2], rtol=1e-6)
    assert not emb[0, 4:].any() and not emb[1, 2:].any() and np.abs(emb[1, :2]).min() > 0


def test_cli_checkpoint_and_embeddings_reproduce_generate(setup, tmp_path):
    """--checkpoint (a converted-format directory) + --embeddings give generate()'s latents for the same seed."""
    from convert_weights.common import make_manifest, write_checkpoint
    from models.wan.generate import main

    model, text, neg, _ = setup
    params = {".".join(str(x) for x in p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    manifest = make_manifest(
        model="wan",
        variant="t2v",
        source_format="diffusers",
        config=model.cfg,
        dtype=np.float32,
        params=params,
        files=[],
        hash_sources=False,
    )
    write_checkpoint(tmp_path / "ckpt", params, manifest)
    np.savez(tmp_path / "emb.npz", prompt_embeds=np.asarray(text), negative_prompt_embeds=np.asarray(neg))
    size = ["--frames", str(FRAMES), "--size", f"{WIDTH}x{HEIGHT}", "--steps", str(STEPS), "--guidance", str(GUIDE)]
    common = ["--shift", str(SHIFT), "--seed", "3", "--dense", "--no-progress", "--out-dir", str(tmp_path / "o")]
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--embeddings", str(tmp_path / "emb.npz"), *size, *common]
    assert main(argv) == 0
    got = np.load(tmp_path / "o" / "latents.npy")
    want = _run(setup, None, seed=3, noise=None)  # the seed's noise, as the CLI draws it
    np.testing.assert_array_equal(got, np.asarray(want.latents))


def test_generate_matches_diffusers_wan_pipeline(setup):
    """End to end against diffusers' WanPipeline (CFG, UniPC as Wan configures it, output_type='latent') on a
    tiny random WanTransformer3DModel converted into ours."""
    from diffusers import WanPipeline

    from convert_weights import wan as cw

    cfg = setup[0].cfg
    tm = wan_torch_model(cfg, seed=5)  # every parameter random, norm scales around 1
    model = cw.to_model(cfg, cw.convert_tensors(torch_state(tm), cfg), dtype=jnp.float32)

    sched = diffusers_unipc(SHIFT)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=sched, transformer=tm)
    _, text, neg, _ = setup
    noise = np.random.default_rng(11).standard_normal((1, cfg.in_channels, *LATENT), np.float32)
    with torch.no_grad():
        want = pipe(
            prompt_embeds=torch.tensor(np.asarray(text)),
            negative_prompt_embeds=torch.tensor(np.asarray(neg)),
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_inference_steps=STEPS,
            guidance_scale=GUIDE,
            latents=torch.tensor(noise),
            output_type="latent",
        ).frames
    got = _run(setup, None, model=model, noise=jnp.asarray(noise))
    assert rel(got.latents, want.numpy()) <= 1e-5


def test_sampling_on_a_mesh_matches_one_device(setup):
    """CFG branches over 'cfg' and Ulysses over 'sp' (2 x 2 of the 8 CPU devices): the same latents and masks."""
    from chipmunk_jax import parallel

    base = cj.preset("wan")
    attn = dataclasses.replace(
        base.attn, top_keys=0.3, counts_multiple_of=16, local_voxels=1, full_step_schedule=frozenset({0, 1})
    )
    chip = base.replace(attn=attn, step_caching=cj.StepCachingConfig(is_enabled=True, skip_step_schedule=SKIP))
    mesh = parallel.make_mesh(cfg=2, sp=2)
    one = _run(setup, chip, backend="xla")
    sharded = _run(setup, chip, backend="xla", mesh=mesh)
    assert "skip" in sharded.report.step_times and any("attn=sparse" in k for k in sharded.report.step_times)
    assert rel(sharded.latents, one.latents) <= 1e-5
    got, want = sharded.state.cache.attn, one.state.cache.attn
    np.testing.assert_array_equal(np.asarray(got.mask_bits), np.asarray(want.mask_bits))
    assert got.out.sharding.spec[1:3] == ("cfg", "sp")  # [L, B, H, ...]: branches and heads split
    with pytest.raises(ValueError, match="heads"):
        _run(setup, chip, backend="xla", mesh=parallel.make_mesh(cfg=1, sp=8))


@pytest.mark.parametrize(
    "text",
    [
        "  a red\tfox\n\n in the   snow ",
        "Tom &amp;amp; Jerry &lt;3 &quot;cartoon&quot; &#39;90s",
        "wide\u3000space\xa0and\u2009thin\u200aones\u2028line",
        "separators\x1ckept\x1fas in the reference",
        "",
        "\t\n",
    ],
)
def test_prompt_clean_matches_wan_pipelines(monkeypatch, text):
    """diffusers' Wan prompt_clean (ftfy stubbed: it is not installed) and ours agree, whitespace and entities."""
    import types

    from diffusers.pipelines.wan import pipeline_wan_i2v as ref

    from models.wan.generate import prompt_clean

    monkeypatch.setattr(ref, "ftfy", types.SimpleNamespace(fix_text=lambda s: s), raising=False)
    assert prompt_clean(text) == ref.prompt_clean(text)


def test_prompt_clean_uses_ftfy_when_installed(monkeypatch):
    import sys
    import types

    from models.wan.generate import prompt_clean

    assert prompt_clean("Tom &amp;amp; Jerry\u3000 ") == "Tom & Jerry"
    monkeypatch.setitem(sys.modules, "ftfy", types.SimpleNamespace(fix_text=lambda s: s.replace("Ã©", "é")))
    assert prompt_clean(" cafÃ©  au lait ") == "café au lait"
