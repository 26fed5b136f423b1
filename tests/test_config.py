"""Tests of chipmunk_jax.config: reference-format YAML loading, validation, presets, hashability.

The YAML texts below are written for these tests; they use the key layout of the reference's
chipmunk-config.yml files (SPEC §8): dotted offloading keys, ``!!set`` schedules, tea_cache/token_cache
sections switched off.
"""

import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import pytest

from chipmunk_jax.config import ChipmunkConfig, ConfigError, config_from_dict, load_config, preset

SKIP_SET = {7, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26, 27, 29, 31, 33, 34, 35, 37, 38, 39, 41, 42, 43}


def _yaml_set(values, indent: int) -> str:
    pad = " " * indent
    return "\n".join(f"{pad}? {v}" for v in sorted(values))


FLUX_YAML = textwrap.dedent(
    """\
    mlp:
      is_enabled: true
      is_fp8: false
      top_keys: 0.3
      random_keys: 0.05
      full_step_every: 10
      block_mask_cache: 2
      first_n_dense_layers: 2

    attn:
      is_enabled: true
      top_keys: 0.165
      full_step_every: 10
      first_n_dense_layers: 2
      recompute_mask: false
      should_compress_indices: false
      pad_qkv_before_kernel: false
      counts_multiple_of: 112

    patchify:
      is_enabled: true
      # a comment, as reference files have
      chunk_size_1: 8
      chunk_size_2: 4

    offloading:
      global_disable_offloading: false
      mlp.out_cache: false
      mlp.indices: false
      mlp.counts: true
      mlp.sparse_act_T: false
      mlp.blockmean_mid_cache: false
      attn.out_cache: true
      attn.indices: false
      attn.counts: false
      attn.lse_constants: true
      text_encoders: false
    """
)

HUNYUAN_YAML = (
    textwrap.dedent(
        """\
        patchify:
          is_enabled: true

        mlp:
          is_enabled: false

        attn:
          is_enabled: true
          top_keys: 0.05
          random_keys: 0.01
          local_voxels: 0
          local_1d_window: 0
          first_n_dense_layers: 2
          recompute_mask: true
          should_compress_indices: true
          full_step_schedule: !!set
            ? 0
            ? 1
            ? 10
            ? 40
          pad_qkv_before_kernel: true
          counts_multiple_of: 128

        offloading:
          attn.out_cache: true
          attn.indices: true
          text_encoders: true

        step_caching:
          is_enabled: true
          skip_step_schedule: !!set
        """
    )
    + _yaml_set(SKIP_SET, 4)
    + "\n"
)

WAN_YAML = (
    textwrap.dedent(
        """\
        num_model_invocations_per_inference_step: 2
        model_name: 'wan'

        patchify:
          is_enabled: true

        mlp:
          is_enabled: false

        attn:
          is_enabled: true
          top_keys: 0.1
          random_keys: 0.01
          local_voxels: 5
          local_1d_window: 0
          first_n_dense_layers: 3
          recompute_mask: true
          should_compress_indices: true
          full_step_every: 7
          full_step_schedule: !!set
            ? 0
            ? 1
            ? 12
            ? 33
          pad_qkv_before_kernel: true
          counts_multiple_of: 128

        tea_cache:
          is_enabled: false
          debug: true
          threshold: 0.3

        token_cache:
          is_enabled: false
          cache_ratio: 0.85
          full_every: 3

        offloading:
          global_disable_offloading: false
          attn.out_cache: true
          attn.indices: true
          attn.counts: true
          text_encoders: true

        step_caching:
          is_enabled: true
          skip_step_schedule: !!set
        """
    )
    + _yaml_set({5, 9, 21}, 4)
    + "\n"
)


def _load(tmp_path, text: str, name: str = "chipmunk-config.yml", **kwargs) -> ChipmunkConfig:
    path = tmp_path / name
    path.write_text(text)
    return load_config(path, **kwargs)


def test_flux_like_file(tmp_path):
    cfg = _load(tmp_path, FLUX_YAML)
    assert cfg.num_model_invocations_per_inference_step == 1
    assert cfg.steps == 50 and cfg.world_size == 1
    assert cfg.mlp.is_enabled and not cfg.mlp.is_fp8
    assert cfg.mlp.top_keys == 0.3 and cfg.mlp.random_keys == 0.05
    assert cfg.mlp.full_step_every == 10 and cfg.mlp.block_mask_cache == 2 and cfg.mlp.first_n_dense_layers == 2
    assert cfg.mlp.counts_multiple_of == 256 and cfg.mlp.bm == 128  # SPEC §8 defaults for keys not in the file
    assert cfg.attn.is_enabled and cfg.attn.top_keys == 0.165
    assert cfg.attn.full_step_every == 10 and cfg.attn.full_step_schedule is None
    assert not cfg.attn.recompute_mask and not cfg.attn.should_compress_indices
    assert not cfg.attn.pad_qkv_before_kernel and cfg.attn.counts_multiple_of == 112
    assert cfg.attn.random_keys == 0.01 and cfg.attn.local_voxels == 0 and cfg.attn.mbm == 192
    assert cfg.patchify.is_enabled and (cfg.patchify.chunk_size_1, cfg.patchify.chunk_size_2) == (8, 4)
    off = cfg.offloading
    assert not off.global_disable_offloading
    assert off.mlp_counts and off.attn_out_cache and off.attn_lse_constants
    assert not (off.mlp_out_cache or off.mlp_indices or off.mlp_sparse_act_T or off.mlp_blockmean_mid_cache)
    assert not (off.attn_indices or off.attn_counts or off.text_encoders)
    assert not cfg.step_caching.is_enabled


def test_hunyuan_like_file(tmp_path):
    cfg = _load(tmp_path, HUNYUAN_YAML)
    assert not cfg.mlp.is_enabled and cfg.mlp.top_keys is None
    assert cfg.attn.top_keys == 0.05 and cfg.attn.random_keys == 0.01
    assert cfg.attn.local_voxels == 0 and cfg.attn.local_1d_window == 0
    assert cfg.attn.full_step_schedule == frozenset({0, 1, 10, 40})
    assert isinstance(cfg.attn.full_step_schedule, frozenset)
    assert cfg.attn.recompute_mask and cfg.attn.should_compress_indices and cfg.attn.counts_multiple_of == 128
    assert cfg.offloading.attn_out_cache and cfg.offloading.attn_indices and cfg.offloading.text_encoders
    assert not cfg.offloading.attn_counts
    assert cfg.step_caching.is_enabled
    assert cfg.step_caching.skip_step_schedule == frozenset(SKIP_SET)
    assert isinstance(cfg.step_caching.skip_step_schedule, frozenset)


def test_wan_like_file(tmp_path):
    cfg = _load(tmp_path, WAN_YAML)
    assert cfg.num_model_invocations_per_inference_step == 2
    assert cfg.model_name == "wan"
    assert cfg.attn.top_keys == 0.1 and cfg.attn.local_voxels == 5 and cfg.attn.first_n_dense_layers == 3
    assert cfg.attn.full_step_every == 7
    assert cfg.attn.full_step_schedule == frozenset({0, 1, 12, 33})
    assert cfg.offloading.attn_counts and not cfg.offloading.global_disable_offloading
    assert cfg.step_caching.skip_step_schedule == frozenset({5, 9, 21})


def test_empty_file_gives_reference_defaults(tmp_path):
    cfg = _load(tmp_path, "# nothing but a comment\n")
    assert cfg == ChipmunkConfig()
    a, m = cfg.attn, cfg.mlp
    assert (a.top_keys, a.random_keys, a.local_voxels, a.local_1d_window) == (0.05, 0.01, 0, 0.0)
    assert (a.first_n_dense_layers, a.full_step_every, a.full_step_schedule) == (2, 10, None)
    assert a.recompute_mask and a.should_compress_indices and a.pad_qkv_before_kernel
    assert (a.counts_multiple_of, a.mbm) == (128, 192)
    assert (m.random_keys, m.full_step_every, m.block_mask_cache, m.first_n_dense_layers) == (0.05, 10, 2, 2)
    assert (m.counts_multiple_of, m.bm, m.mbm) == (256, 128, 128)
    assert (cfg.patchify.is_enabled, cfg.patchify.chunk_size_1, cfg.patchify.chunk_size_2) == (True, 8, 4)


def test_file_on_top_of_preset(tmp_path):
    cfg = _load(tmp_path, "attn:\n  top_keys: 0.2\n", base="hunyuan")
    assert cfg.attn.top_keys == 0.2
    assert cfg.attn.full_step_schedule == frozenset({0, 1, 10, 40})
    assert cfg.step_caching.is_enabled


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "does-not-exist.yml")


def _message_before_listing(err: pytest.ExceptionInfo) -> str:
    # The message may end with the list of all valid keys; the suggestion must come before it.
    return str(err.value).split("valid keys")[0]


@pytest.mark.parametrize(
    "text, bad, nearest",
    [
        (
            "num_model_invocation_per_inference_step: 2\n",
            "num_model_invocation_per_inference_step",
            "num_model_invocations_per_inference_step",
        ),
        ("model_nam: flux\n", "model_nam", "model_name"),
        ("atn:\n  top_keys: 0.1\n", "atn", "attn"),
        ("attn:\n  top_key: 0.1\n", "top_key", "top_keys"),
        ("attn:\n  full_step_shedule: !!set {0, 1}\n", "full_step_shedule", "full_step_schedule"),
        ("mlp:\n  block_mask_cach: 2\n", "block_mask_cach", "block_mask_cache"),
        ("patchify:\n  chunk_size1: 8\n", "chunk_size1", "chunk_size_1"),
        ("step_caching:\n  skip_steps_schedule: !!set {7}\n", "skip_steps_schedule", "skip_step_schedule"),
        ("offloading:\n  attn.out_cach: true\n", "attn.out_cach", "attn.out_cache"),
        ("offloading:\n  text_encoder: true\n", "text_encoder", "text_encoders"),
        ("offloading:\n  global_disable_offload: true\n", "global_disable_offload", "global_disable_offloading"),
    ],
)
def test_unknown_key_names_it_and_the_nearest_valid_key(tmp_path, text, bad, nearest):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    head = _message_before_listing(err)
    assert repr(bad) in head
    assert repr(nearest) in head


@pytest.mark.parametrize(
    "data",
    [
        {"attn": {"top_keys": 0.0}},
        {"attn": {"top_keys": -0.1}},
        {"attn": {"top_keys": 1.01}},
        {"mlp": {"is_enabled": True, "top_keys": 0.0}},
        {"mlp": {"is_enabled": True, "top_keys": 1.5}},
        {"attn": {"full_step_every": 0}},
        {"attn": {"full_step_every": -10}},
        {"mlp": {"full_step_every": 0}},
        {"mlp": {"full_step_every": -1}},
        {"mlp": {"block_mask_cache": 0}},
        {"patchify": {"chunk_size_1": 8, "chunk_size_2": 3}},
        {"patchify": {"chunk_size_1": 6, "chunk_size_2": 4}},
        {"patchify": {"chunk_size_2": 0}},
        {"attn": {"full_step_schedule": {0, 10, 40}}},
        {"attn": {"full_step_schedule": {1, 10, 40}}},
        {"attn": {"full_step_schedule": {-1, 0, 1}}},
        {"attn": {"random_keys": 1.5}},
        {"attn": {"local_voxels": -1}},
        {"attn": {"local_1d_window": 2.0}},
        {"attn": {"counts_multiple_of": 0}},
        {"mlp": {"is_enabled": True}},
        {"mlp": {"is_enabled": True, "top_keys": 0.3, "is_fp8": True}},
        {"mlp": {"is_fp8": True}},
        {"step_caching": {"is_enabled": True, "skip_step_schedule": {0, 7}}},
        {"tea_cache": {"is_enabled": True}},
        {"tea_cache": 5},
        {"token_cache": {"is_enabled": True, "cache_ratio": 0.85}},
        {"num_model_invocations_per_inference_step": 0},
        {"steps": 0},
    ],
)
def test_out_of_range_values_are_errors(data):
    with pytest.raises(ConfigError):
        config_from_dict(data)


@pytest.mark.parametrize(
    "text",
    [
        "attn:\n  top_keys: 0\n",
        "attn:\n  full_step_every: 0\n",
        "patchify:\n  chunk_size_1: 8\n  chunk_size_2: 3\n",
        "attn:\n  full_step_schedule: !!set\n    ? 0\n    ? 10\n",
        "mlp:\n  is_enabled: true\n",
        "mlp:\n  is_enabled: true\n  is_fp8: true\n  top_keys: 0.3\n",
    ],
)
def test_out_of_range_values_in_yaml_are_errors(tmp_path, text):
    with pytest.raises(ConfigError):
        _load(tmp_path, text)


def test_boundary_values_are_accepted():
    cfg = config_from_dict(
        {
            "attn": {"top_keys": 1.0, "full_step_every": 1, "full_step_schedule": [0, 1]},
            "mlp": {"is_enabled": True, "top_keys": 1.0},
            "patchify": {"chunk_size_1": 4, "chunk_size_2": 4},
        }
    )
    assert cfg.attn.top_keys == 1.0 and cfg.attn.full_step_schedule == frozenset({0, 1})
    assert cfg.mlp.top_keys == 1.0 and cfg.patchify.chunk_size_2 == 4


def test_presets_have_spec_values():
    flux = preset("flux")
    assert flux.attn.top_keys == 0.165 and flux.attn.full_step_every == 10 and flux.attn.full_step_schedule is None
    assert not flux.attn.recompute_mask and not flux.attn.should_compress_indices
    assert flux.attn.counts_multiple_of == 112 and flux.attn.first_n_dense_layers == 2
    assert flux.mlp.is_enabled and flux.mlp.top_keys == 0.3 and flux.mlp.random_keys == 0.05
    assert flux.mlp.full_step_every == 10 and flux.mlp.block_mask_cache == 2 and flux.mlp.first_n_dense_layers == 2
    assert flux.patchify.is_enabled and (flux.patchify.chunk_size_1, flux.patchify.chunk_size_2) == (8, 4)
    assert flux.num_model_invocations_per_inference_step == 1 and flux.steps == 50

    hy = preset("hunyuan")
    assert hy.attn.top_keys == 0.05 and hy.attn.random_keys == 0.01
    assert hy.attn.full_step_schedule == frozenset({0, 1, 10, 40})
    assert hy.attn.recompute_mask and hy.attn.should_compress_indices
    assert hy.step_caching.is_enabled and hy.step_caching.skip_step_schedule == frozenset(SKIP_SET)
    assert not hy.mlp.is_enabled and hy.num_model_invocations_per_inference_step == 1

    wan = preset("wan")
    assert wan.attn.top_keys == 0.1 and wan.attn.local_voxels == 5
    assert wan.attn.recompute_mask and wan.attn.should_compress_indices
    assert wan.num_model_invocations_per_inference_step == 2
    assert wan.step_caching.is_enabled and wan.step_caching.skip_step_schedule == frozenset(SKIP_SET)
    assert not wan.mlp.is_enabled

    mochi = preset("mochi")
    assert mochi.attn.top_keys == 0.15 and mochi.attn.local_voxels == 1
    assert mochi.attn.full_step_schedule == frozenset({0, 1, 15, 30, 45, 60})
    assert mochi.num_model_invocations_per_inference_step == 2

    assert preset("FLUX") == flux
    with pytest.raises(ConfigError):
        preset("sd3")


@pytest.mark.parametrize("name", ["flux", "hunyuan", "wan", "mochi"])
def test_configs_are_frozen(name):
    cfg = preset(name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.attn.top_keys = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mlp.top_keys = 0.5


def test_configs_are_hashable_and_equal_by_value(tmp_path):
    a = _load(tmp_path, HUNYUAN_YAML, name="a.yml")
    b = _load(tmp_path, HUNYUAN_YAML, name="b.yml")
    assert a is not b and a == b and hash(a) == hash(b)
    c = _load(tmp_path, WAN_YAML, name="c.yml")
    assert a != c
    assert len({a, b, c, preset("flux"), preset("flux")}) == 3


def test_config_as_static_jit_argument(tmp_path):
    traces = []

    def f(x, cfg):
        traces.append(cfg)
        return x * jnp.float32(cfg.attn.top_keys)

    g = jax.jit(f, static_argnums=1)
    x = jnp.ones((3,), jnp.float32)
    a = _load(tmp_path, FLUX_YAML, name="a.yml")
    b = _load(tmp_path, FLUX_YAML, name="b.yml")
    ya = g(x, a)
    yb = g(x, b)
    assert len(traces) == 1  # equal configs hit the same compiled function
    assert float(ya[0]) == float(yb[0]) == pytest.approx(0.165)
    yc = g(x, a.replace(attn=dataclasses.replace(a.attn, top_keys=0.5)))
    assert len(traces) == 2
    assert float(yc[0]) == 0.5


@pytest.mark.parametrize(
    "data",
    [
        {"attn": {"top_keys": "high"}},
        {"mlp": {"is_enabled": True, "top_keys": "0.3x"}},
        {"patchify": {"chunk_size_1": "eight"}},
        {"attn": {"full_step_schedule": 10}},
        {"attn": 3},
    ],
)
def test_wrong_value_types_are_config_errors(data):
    with pytest.raises(ConfigError):
        config_from_dict(data)
