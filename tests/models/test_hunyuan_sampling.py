"""HunyuanVideo sampler: schedule and trajectory against diffusers' HunyuanVideoPipeline, step caching,
Chipmunk with every key selected against dense, no retrace on a second generation, argument errors, the CLI.

Float32, tiny config, every diffusers parameter random. Measured max |ours - ref| / max |ref|: 6-step trajectory
vs the pipeline 8.3e-6 (bound 2e-5), true CFG 4.9e-6, step caching vs a hand loop 1.8e-7, all-keys Chipmunk vs
dense 1.8e-7 (bound 1e-5), --prompt embeddings vs diffusers' encode_prompt 3.3e-7 (Llama) / 8.5e-7 (CLIP).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

import chipmunk_jax as cj
from chipmunk_jax import parallel
from chipmunk_jax import sampler as cj_sampler
from chipmunk_jax.indices import unpack_bits
from models.hunyuan_video import tiny_config
from models.hunyuan_video.sampling import generate, hunyuan_sigmas
from tests.models.helpers import (
    clip_tokenizer_files,
    hf_llama_tokenizer,
    hunyuan_from_diffusers,
    hunyuan_torch_model,
    rel,
    tokenizer_dir_fixture,  # noqa: F401  (the tokenizer_dir fixture)
    torch_clip,
    torch_llama,
    torch_state,
    write_sharded,
)

# Video 5 frames x 64 x 64 px -> latents 2 x 8 x 8 -> token grid (2, 4, 4): 32 video tokens. With 16 valid prompt
# tokens the sparse sequence has 48 tokens (one query group), which the all-keys Chipmunk test below relies on.
FRAMES, HEIGHT, WIDTH = 5, 64, 64
LATENT = (2, 8, 8)
N_VID = 32
TEXT_LEN, VALID = 20, 16  # padded prompt length, valid tokens of the Chipmunk runs
STEPS, GUIDE, SHIFT = 6, 6.0, 7.0
SKIP = frozenset({3, 5})


def _prompt(cfg, valid: list[int], seed: int):
    rs = np.random.RandomState(seed)
    b = len(valid)
    text = rs.randn(b, TEXT_LEN, cfg.text_dim).astype(np.float32)
    mask = (np.arange(TEXT_LEN)[None, :] < np.asarray(valid)[:, None]).astype(np.int64)
    pooled = rs.randn(b, cfg.pooled_dim).astype(np.float32)
    return text, mask, pooled


@pytest.fixture(scope="module")
def tiny():
    """(cfg, diffusers transformer, our float32 model with the same random weights)."""
    cfg = tiny_config()
    tm = hunyuan_torch_model(cfg, seed=3)
    return cfg, tm, hunyuan_from_diffusers(cfg, torch_state(tm))


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The release's scheduler (hunyuanvideo-community/HunyuanVideo scheduler_config.json: shift 7.0)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)


# ---------------------------------------------------------------------------------------------------------
# The schedule and the trajectory against diffusers.


@pytest.mark.parametrize("steps", [50, 7, 1])
def test_sigmas_and_timesteps_equal_diffusers(steps):
    sched = _scheduler()
    # What HunyuanVideoPipeline passes to retrieve_timesteps.
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    ours = hunyuan_sigmas(steps, SHIFT)
    np.testing.assert_array_equal(ours, sched.sigmas.numpy())
    np.testing.assert_array_equal(ours[:-1] * np.float32(1000), sched.timesteps.numpy())
    assert ours[0] == 1.0 and ours[-1] == 0.0 and (np.diff(ours) < 0).all()
    with pytest.raises(ValueError, match="steps must be >= 1"):
        hunyuan_sigmas(0)


def _pipeline_latents(tm, noise, prompt, negative=None, true_cfg=1.0, steps=STEPS) -> np.ndarray:
    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=tm,
        vae=None,
        scheduler=_scheduler(),
        text_encoder_2=None,
        tokenizer_2=None,
    )
    text, mask, pooled = prompt
    kw = {}
    if negative is not None:
        nt, nm, npool = negative
        kw = dict(
            negative_prompt_embeds=torch.tensor(nt),
            negative_prompt_attention_mask=torch.tensor(nm),
            negative_pooled_prompt_embeds=torch.tensor(npool),
            true_cfg_scale=true_cfg,
        )
    with torch.no_grad():
        out = pipe(
            prompt_embeds=torch.tensor(text),
            prompt_attention_mask=torch.tensor(mask),
            pooled_prompt_embeds=torch.tensor(pooled),
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_inference_steps=steps,
            guidance_scale=GUIDE,
            latents=torch.tensor(noise),
            output_type="latent",
            **kw,
        ).frames
    return out.numpy()


def test_dense_trajectory_matches_diffusers_pipeline(tiny):
    """Batch 2 with prompts padded by different amounts (fine for the dense model), embedded guidance 6."""
    cfg, tm, model = tiny
    prompt = _prompt(cfg, [VALID, 9], seed=0)
    noise = np.random.default_rng(1).standard_normal((2, cfg.in_channels, *LATENT), np.float32)
    want = _pipeline_latents(tm, noise, prompt)
    got = generate(model, *prompt, frames=FRAMES, height=HEIGHT, width=WIDTH, steps=STEPS, noise=noise, progress=False)
    assert got.latents.shape == want.shape == (2, cfg.in_channels, *LATENT)
    assert set(got.report.step_times) == {"attn=dense,mlp=dense"}
    err = rel(got.latents, want)
    assert err <= 2e-5, err
    # The trajectory moved far from the noise: the comparison above could fail.
    assert rel(got.latents, noise) > 0.1


def test_true_cfg_matches_diffusers_pipeline(tiny):
    """diffusers' optional true CFG (negative prompt, true_cfg_scale > 1): one call on [cond; uncond]."""
    cfg, tm, model = tiny
    prompt = _prompt(cfg, [VALID], seed=2)
    negative = _prompt(cfg, [5], seed=3)
    noise = np.random.default_rng(4).standard_normal((1, cfg.in_channels, *LATENT), np.float32)
    want = _pipeline_latents(tm, noise, prompt, negative, true_cfg=3.0, steps=3)
    kw = dict(frames=FRAMES, height=HEIGHT, width=WIDTH, steps=3, noise=noise, progress=False)
    got = generate(model, *prompt, negative=negative, true_cfg=3.0, **kw)
    assert rel(got.latents, want) <= 2e-5
    # True CFG changed the result: the comparison above could fail.
    assert rel(_pipeline_latents(tm, noise, prompt, steps=3), want) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Step caching and Chipmunk.


def _step_caching_only(skip) -> cj.ChipmunkConfig:
    base = cj.preset("hunyuan")
    return base.replace(
        attn=dataclasses.replace(base.attn, is_enabled=False),
        step_caching=cj.StepCachingConfig(is_enabled=True, skip_step_schedule=skip),
    )


def _all_keys_chipmunk() -> cj.ChipmunkConfig:
    # 48 tokens [32 video; 16 valid text], one query group. top_keys 0.9 with tile 16 selects
    # 16 * round(43.2 / 16) = 48 keys (all), while the group still passes the static-mask sparsity test
    # (16 text + floor(0.9 * 32) = 44 < 48), so the top-k path runs.
    base = cj.preset("hunyuan")
    attn = dataclasses.replace(
        base.attn,
        top_keys=0.9,
        counts_multiple_of=16,
        random_keys=0.0,
        full_step_schedule=frozenset({0, 1, 4}),
        first_n_dense_layers=0,  # every layer sparse: one scan per block stack (compile time)
    )
    return base.replace(attn=attn, step_caching=cj.StepCachingConfig(is_enabled=True, skip_step_schedule=SKIP))


def _hand_loop_with_step_caching(model, prompt, noise) -> np.ndarray:
    """The sampler written out: diffusers' scheduler, our model eagerly, and on a skipped step the output head
    on the hidden states of the latest computed step (SPEC §4)."""
    from flax import nnx

    from models.hunyuan_video import forward, init_hunyuan_cache

    graphdef, state = nnx.split(model)
    text, mask, pooled = (jnp.asarray(a) for a in prompt)
    sched = _scheduler()
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, STEPS + 1)[:-1])
    b = text.shape[0]
    guidance = jnp.full((b,), GUIDE * 1000.0, jnp.float32)
    grid = (LATENT[0], LATENT[1] // 2, LATENT[2] // 2)
    x = torch.tensor(noise)
    hidden = None
    for i, t in enumerate(sched.timesteps):
        ts = jnp.full((b,), float(t), jnp.float32)
        if i in SKIP:
            out = model.final_layer(hidden, ts, pooled, guidance, grid)
        else:
            cache = init_hunyuan_cache(model.cfg, None, batch=b, grid=grid, text_len=0, dtype=jnp.float32)
            cache = dataclasses.replace(cache, hidden=jnp.zeros((b, N_VID, model.cfg.hidden), jnp.float32))
            out, cache = forward(graphdef, state, jnp.asarray(x.numpy()), ts, text, mask, pooled, guidance, cache)
            hidden = cache.hidden
        x = sched.step(torch.tensor(np.asarray(out)), t, x).prev_sample
    return x.numpy()


@pytest.fixture(scope="module")
def chipmunk_setup(tiny):
    cfg, _, model = tiny
    prompt = _prompt(cfg, [VALID, VALID], seed=5)
    noise = np.random.default_rng(6).standard_normal((2, cfg.in_channels, *LATENT), np.float32)
    kw = dict(frames=FRAMES, height=HEIGHT, width=WIDTH, steps=STEPS, noise=noise, progress=False)
    cached = generate(model, *prompt, chipmunk=_step_caching_only(SKIP), **kw)
    return model, prompt, noise, kw, cached


def test_step_caching_replays_the_head_on_cached_hidden_states(chipmunk_setup):
    model, prompt, noise, kw, cached = chipmunk_setup
    assert set(cached.report.step_times) == {"attn=dense,mlp=dense", "skip"}
    assert len(cached.report.step_times["skip"]) == len(SKIP)
    want = _hand_loop_with_step_caching(model, prompt, noise)
    assert rel(cached.latents, want) <= 2e-5


def test_chipmunk_all_keys_equals_dense_and_does_not_retrace(chipmunk_setup):
    model, prompt, noise, kw, cached = chipmunk_setup
    ck = _all_keys_chipmunk()
    got = generate(model, *prompt, chipmunk=ck, backend="xla", **kw)
    labels = list(got.report.step_times)
    for kind in ("attn=warmup", "attn=mask", "attn=sparse", "skip"):
        assert any(kind in label for label in labels), (kind, labels)
    attn = got.state.cache.attn
    n = N_VID + VALID
    # Every layer (2 double, 2 single blocks) keeps a cache over [video (voxel order); valid text] only.
    assert attn.out.shape == (model.cfg.num_layers, 2, model.cfg.heads, n, model.cfg.head_dim)
    assert np.asarray(unpack_bits(attn.mask_bits, n)).all()
    assert got.report.stats["attention density (keys kept / keys)"] == pytest.approx(1.0)
    err = rel(got.latents, cached.latents)
    assert err <= 1e-5, err

    # A second generation (new prompts with the same valid length, new seed) reuses every compiled step.
    before = dict(cj_sampler.TRACE_COUNTS)
    prompt2 = _prompt(model.cfg, [VALID, VALID], seed=9)
    again = generate(model, *prompt2, chipmunk=ck, backend="xla", seed=1, **kw)
    assert dict(cj_sampler.TRACE_COUNTS) == before
    assert again.report.compile_s == {}
    assert rel(again.latents, got.latents) > 1e-3


def test_argument_errors(tiny):
    cfg, _, model = tiny
    prompt = _prompt(cfg, [VALID, 9], seed=0)
    kw = dict(frames=FRAMES, height=HEIGHT, width=WIDTH, steps=2, progress=False)
    with pytest.raises(ValueError, match="one valid prompt length.*generate the samples separately"):
        generate(model, *prompt, chipmunk=cj.preset("hunyuan"), **kw)
    one = _prompt(cfg, [VALID], seed=0)
    with pytest.raises(ValueError, match="the prompt and the negative prompt differ"):
        generate(model, *one, negative=_prompt(cfg, [3], seed=1), true_cfg=2.0, chipmunk=cj.preset("hunyuan"), **kw)
    mlp = cj.preset("flux").mlp
    with pytest.raises(ValueError, match="attention only"):
        generate(model, *one, chipmunk=cj.preset("hunyuan").replace(mlp=mlp), **kw)
    with pytest.raises(ValueError, match=r"frames 6 is not 4k\+1"):
        generate(model, *one, **{**kw, "frames": 6})
    with pytest.raises(ValueError, match="height 60 is not a multiple of 16"):
        generate(model, *one, **{**kw, "height": 60})
    with pytest.raises(ValueError, match=r"text mask must be \[1, 20\]"):
        generate(model, one[0], one[1][:, :5], one[2], **kw)
    with pytest.raises(ValueError, match="pooled embeddings must be"):
        generate(model, one[0], one[1], one[2][:, :3], **kw)
    with pytest.raises(ValueError, match="one device"):
        generate(model, *one, mesh=parallel.make_mesh(cfg=2), **kw)


# ---------------------------------------------------------------------------------------------------------
# The CLI.


ALL_KEYS_YAML = """\
attn:
  top_keys: 0.9
  counts_multiple_of: 16
  random_keys: 0.0
  full_step_schedule: [0, 1, 4]
  first_n_dense_layers: 0
step_caching:
  is_enabled: true
  skip_step_schedule: [3, 5]
"""


# subprocess starts ffmpeg by fork + exec; JAX warns on any fork, harmless here as exec follows at once.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called")
def test_cli_end_to_end_tiny(tmp_path, capsys):
    """--random-weights --tiny with a --chipmunk-config file (the all-keys config above, so that the step functions
    compiled by the Chipmunk test are reused) and a random tiny VAE; the latents equal generate() on the same
    random model and embeddings."""
    import json

    from models.hunyuan_video.generate import _embeddings, build_parser, main, random_model

    (tmp_path / "ck.yml").write_text(ALL_KEYS_YAML)
    assert cj.load_config(tmp_path / "ck.yml", base="hunyuan") == _all_keys_chipmunk()
    argv = ["--random-weights", "--tiny", "--random-vae", "--frames", "5", "--size", "64x64", "--steps", str(STEPS)]
    argv += ["--batch", "2", "--chipmunk-config", str(tmp_path / "ck.yml"), "--dtype", "float32", "--backend", "xla"]
    argv += ["--no-progress", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    lat = np.load(tmp_path / "latents.npy")
    assert lat.shape == (2, 4, *LATENT) and np.isfinite(lat).all()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mode"] == "chipmunk" and report["steps"] == STEPS and report["guidance"] == 6.0
    assert len(report["step_times_s"]["skip"]) == len(SKIP)
    assert report["chipmunk"]["attn"]["full_step_schedule"] == [0, 1, 4]
    assert report["stats"]["attention density (keys kept / keys)"] == pytest.approx(1.0)
    assert "attn=sparse" in (tmp_path / "report.txt").read_text()
    for b in range(2):
        assert (tmp_path / f"video_{b}.mp4").stat().st_size > 0
    assert "video_1.mp4 (5 frames 64x64)" in capsys.readouterr().out

    # The same generation through the library: identical latents, and no step function is compiled again.
    args = build_parser().parse_args(argv)
    cfg = tiny_config()
    prompt, _ = _embeddings(args, cfg)
    assert prompt[1].shape == (2, TEXT_LEN) and (prompt[1].sum(1) == VALID).all()
    model = random_model(cfg, "float32", 0)
    kw = dict(frames=FRAMES, height=HEIGHT, width=WIDTH, steps=STEPS, backend="xla", progress=False)
    gen = generate(model, *prompt, chipmunk=_all_keys_chipmunk(), **kw)
    assert gen.report.compile_s == {}
    np.testing.assert_array_equal(np.asarray(gen.latents), lat)


def test_cli_checkpoint_and_embeddings_reproduce_generate(tiny, tmp_path):
    """--checkpoint (a converted-format directory) + --embeddings + --no-decode give generate()'s latents."""
    from flax import nnx

    from convert_weights.common import make_manifest, write_checkpoint
    from models.hunyuan_video.generate import main

    cfg, _, model = tiny
    params = {".".join(str(x) for x in p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}

    class _Config:
        def to_dict(self):
            return {**dataclasses.asdict(cfg), "rope_axes_dim": list(cfg.rope_axes_dim)}

    manifest = make_manifest(
        model="hunyuan_video",
        variant="t2v",
        source_format="diffusers",
        config=_Config(),
        dtype=np.float32,
        params=params,
        files=[],
        hash_sources=False,
    )
    write_checkpoint(tmp_path / "ckpt", params, manifest)
    text, mask, pooled = _prompt(cfg, [VALID, 9], seed=0)
    np.savez(tmp_path / "emb.npz", prompt_embeds=text, prompt_attention_mask=mask, pooled_prompt_embeds=pooled)
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--embeddings", str(tmp_path / "emb.npz"), "--no-decode"]
    argv += ["--frames", str(FRAMES), "--size", f"{WIDTH}x{HEIGHT}", "--steps", str(STEPS), "--seed", "3"]
    argv += ["--dense", "--no-progress", "--out-dir", str(tmp_path / "o")]
    assert main(argv) == 0
    want = generate(
        model, text, mask, pooled, frames=FRAMES, height=HEIGHT, width=WIDTH, steps=STEPS, seed=3, progress=False
    )
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "latents.npy"), np.asarray(want.latents))
    # Chipmunk refuses these prompts (16 and 9 valid tokens) before any compute.
    argv_ck = [a for a in argv if a != "--dense"]
    assert main(argv_ck) == 2


def _cli(tmp_path, *extra):
    from models.hunyuan_video.generate import main

    return main(["--random-weights", "--tiny", "--no-progress", "--out-dir", str(tmp_path), *extra])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frames", "128"], r"frames 128 is not 4k\+1 \(nearest valid: 125 or 129\)"),
        (["--size", "1280x712"], "height 712 is not a multiple of 16"),
        (["--size", "big"], "WIDTHxHEIGHT"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--flow-shift", "0"], "--flow-shift must be > 0"),
        (["--prompt", "a cat"], "--prompt needs --llama, --tokenizer, --clip, --clip-tokenizer"),
        (["--negative-prompt", "blur"], "--negative-prompt goes with --prompt"),
        (["--vae", "/nonexistent/vae"], "VAE directory /nonexistent/vae does not exist"),
        (["--embeddings", "/nonexistent.npz"], "does not exist"),
    ],
)
def test_cli_rejects_bad_arguments_before_compute(tmp_path, capsys, args, message):
    import re

    assert _cli(tmp_path, *args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "latents.npy").exists()


def test_cli_embeddings_file_is_checked(tmp_path, capsys):
    from models.hunyuan_video.generate import main

    cfg = tiny_config()
    text, mask, pooled = _prompt(cfg, [VALID, 9], seed=0)
    emb = tmp_path / "emb.npz"
    base = ["--random-weights", "--tiny", "--embeddings", str(emb), "--frames", "5", "--size", "64x64"]
    np.savez(emb, prompt_embeds=text, pooled_prompt_embeds=pooled)
    assert main(base) == 2
    assert "lacks ['prompt_attention_mask']" in capsys.readouterr().err
    np.savez(emb, prompt_embeds=text, prompt_attention_mask=mask[:, :5], pooled_prompt_embeds=pooled)
    assert main(base) == 2
    assert "'prompt_attention_mask' must be [2, 20]" in capsys.readouterr().err
    np.savez(emb, prompt_embeds=text[..., :7], prompt_attention_mask=mask, pooled_prompt_embeds=pooled)
    assert main(base) == 2
    assert f"'prompt_embeds' must be [B, L, {cfg.text_dim}]" in capsys.readouterr().err
    np.savez(emb, prompt_embeds=text, prompt_attention_mask=mask, pooled_prompt_embeds=pooled)
    assert main(base) == 2  # Chipmunk (the default) and two different valid lengths
    assert "one valid prompt length for the whole batch, the prompts have [9, 16]" in capsys.readouterr().err
    assert main([*base, "--true-cfg", "2"]) == 2
    assert "needs ['negative_prompt_embeds'" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "nope"), "--embeddings", str(emb)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "manifest.json").write_text('{"model": "hunyuan_vae", "config": {"latent_channels": 16}}')
    assert main([*base, "--dense", "--vae", str(tmp_path / "vae")]) == 2
    assert "the VAE has 16 latent channels, the model 4" in capsys.readouterr().err


def test_cli_help_teaches():
    from models.hunyuan_video.generate import build_parser

    text = build_parser().format_help()
    for needle in (
        "examples:",
        "4k+1",
        "prompt_attention_mask",
        "--random-weights --tiny",
        "--vae-tiling",
        "--no-decode",
    ):
        assert needle in text, needle


def test_cli_prompt_path_matches_diffusers_encode_prompt(tmp_path, tokenizer_dir, capsys):
    """--prompt: a converted tiny Llama, a transformers CLIP directory and both tokenizers give the embeddings of
    diffusers' HunyuanVideoPipeline.encode_prompt (template, crop, hidden state -3, CLIP pooled); then the CLI
    runs the tiny transformer on them (widths chosen to match it)."""
    import transformers

    from convert_weights import llama as conv_llama
    from models.hunyuan_video.generate import _prompt_embeddings, build_parser, main
    from models.text_encoders.clip import CLIPTextConfig
    from models.text_encoders.llama import tiny_config as llama_tiny

    cfg = tiny_config()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    lcfg = llama_tiny(vocab_size=len(tok), hidden_size=cfg.text_dim, num_layers=4)
    llama = torch_llama(lcfg, seed=5)
    hf = llama.config.to_dict()
    hf.pop("rope_parameters")
    hf.update(rope_theta=lcfg.rope_theta, rope_scaling=None)
    write_sharded(llama, tmp_path / "llama_src", "", {}, hf)
    conv_llama.convert(tmp_path / "llama_src", tmp_path / "llama", dtype="fp32", hash_sources=False)
    (tmp_path / "clip_tok").mkdir()
    vocab = clip_tokenizer_files(tmp_path / "clip_tok")
    ccfg = CLIPTextConfig(vocab_size=len(vocab), width=cfg.pooled_dim, num_layers=2, num_heads=4, mlp_dim=40)
    clip = torch_clip(ccfg, seed=6)
    clip.save_pretrained(str(tmp_path / "clip"))

    prompt, negative = "A chipmunk eats a nut in the autumn forest.", "blurry, low quality"
    argv = ["--random-weights", "--tiny", "--prompt", prompt, "--negative-prompt", negative, "--true-cfg", "2"]
    argv += ["--llama", str(tmp_path / "llama"), "--tokenizer", str(tokenizer_dir), "--clip", str(tmp_path / "clip")]
    argv += ["--clip-tokenizer", str(tmp_path / "clip_tok"), "--max-sequence-length", str(TEXT_LEN), "--batch", "2"]
    got, got_neg = _prompt_embeddings(build_parser().parse_args(argv), 2)

    pipe = HunyuanVideoPipeline(
        text_encoder=llama,
        tokenizer=hf_llama_tokenizer(tokenizer_dir),
        transformer=None,
        vae=None,
        scheduler=None,
        text_encoder_2=clip,
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "clip_tok")),
    )
    for texts, ours in (([prompt, prompt], got), ([negative], got_neg)):
        with torch.no_grad():
            emb, pooled, mask = pipe.encode_prompt(texts, device=torch.device("cpu"), max_sequence_length=TEXT_LEN)
        assert ours[0].shape == (len(texts), TEXT_LEN, cfg.text_dim) and ours[2].shape == (len(texts), cfg.pooled_dim)
        assert ours[1].tolist() == mask.numpy().astype(int).tolist()
        assert rel(ours[0], emb.numpy()) <= 1e-5
        assert rel(ours[2], pooled.numpy()) <= 1e-5

    # The whole CLI on these encoders (dense, embedded guidance only; the shapes of the dense parity test above,
    # whose compiled step it reuses when run after it).
    out = tmp_path / "out"
    i = argv.index("--negative-prompt")
    argv = argv[:i] + argv[i + 4 :]  # drop --negative-prompt NEG --true-cfg 2
    tail = ["--frames", str(FRAMES), "--size", f"{WIDTH}x{HEIGHT}", "--steps", str(STEPS), "--dense"]
    assert main([*argv, *tail, "--dtype", "float32", "--no-progress", "--out-dir", str(out)]) == 0
    lat = np.load(out / "latents.npy")
    assert lat.shape == (2, cfg.out_channels, *LATENT) and np.isfinite(lat).all()
    assert "dense HunyuanVideo" in capsys.readouterr().out
