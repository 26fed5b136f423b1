"""FLUX.1 text-to-image: tokenizers + T5 + CLIP -> Flux sampling (``models.flux.sampling``) -> autoencoder decode.

Load a directory written by ``python -m convert_weights flux-pipeline`` with ``FluxPipeline.load``. Denoising
steps are compiled once per (step kind, shapes) by ``chipmunk_jax.sampler`` and reused by later calls; the encoders
and the decoder are jitted once per pipeline and batch size.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chipmunk_jax.config import ChipmunkConfig
from models.flux.model import Flux
from models.text_encoders.clip import CLIPTextConfig, CLIPTextEncoder
from models.text_encoders.t5 import T5Config, T5Encoder
from models.text_encoders.tokenizers import (
    CLIP_MAX_LENGTH,
    T5_MAX_LENGTH_DEV,
    T5_MAX_LENGTH_SCHNELL,
    TextTokenizer,
    load_clip_tokenizer,
    load_t5_tokenizer,
)
from models.vae.flux_ae import AutoencoderConfig, FluxAutoencoder

# component dir -> (manifest model name, config class, module class)
_ENCODERS = {
    "text_encoder_t5": ("t5", T5Config, T5Encoder),
    "text_encoder_clip": ("clip_text", CLIPTextConfig, CLIPTextEncoder),
    "vae": ("flux_ae", AutoencoderConfig, FluxAutoencoder),
}
REQUIRED = ("manifest.json", "transformer", *_ENCODERS, "tokenizer", "tokenizer_2")


def check_pipeline_dir(path: str | os.PathLike) -> None:
    """Raises FileNotFoundError naming every missing part of a converted pipeline directory (no compute)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"pipeline directory {path} does not exist")
    missing = [p for p in REQUIRED if not (path / p).exists()]
    for c in ("transformer", *_ENCODERS):
        if (path / c).is_dir() and not (path / c / "manifest.json").exists():
            missing.append(f"{c}/manifest.json")
    if missing:
        raise FileNotFoundError(
            f"{path} is not a complete converted FLUX.1 pipeline; missing {missing} "
            "(convert one with `python -m convert_weights flux-pipeline --src <diffusers dir> --dst DIR`)"
        )


def _load_component(path: Path, model_name: str, config_cls, module_cls, dtype=None):
    """Builds ``module_cls(config)`` abstractly and fills it from a ``write_checkpoint`` directory."""
    from convert_weights.common import fill_module, read_checkpoint, read_manifest

    m = read_manifest(path)
    if m.get("model") != model_name:
        raise ValueError(f"{path} holds a {m.get('model')!r} checkpoint, not {model_name!r}")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(m["config"]) - set(fields))
    if unknown:
        raise ValueError(f"{path}: unknown {config_cls.__name__} fields {unknown}")
    cfg = config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in m["config"].items()})
    dt = jnp.dtype(dtype) if dtype is not None else jnp.dtype(m["dtype"])
    abstract = nnx.eval_shape(lambda: module_cls(cfg, rngs=nnx.Rngs(0), dtype=dt, param_dtype=dt))
    return fill_module(abstract, read_checkpoint(path), where=str(path))


@jax.jit
def _to_uint8(images: jax.Array) -> jax.Array:
    x = (jnp.clip(images.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5
    return jnp.round(x).astype(jnp.uint8)


@dataclasses.dataclass
class PipelineOutput:
    """Result of ``FluxPipeline.generate``.

    Attributes:
      images: uint8 [B, H, W, 3].
      generation: the ``models.flux.sampling.Generation`` (latents, report, final sampler state).
    """

    images: np.ndarray
    generation: object


class FluxPipeline:
    """The converted transformer, T5 and CLIP encoders, autoencoder and tokenizers of one FLUX.1 model."""

    def __init__(
        self,
        transformer: Flux,
        t5: T5Encoder,
        clip: CLIPTextEncoder,
        vae: FluxAutoencoder,
        t5_tokenizer: TextTokenizer,
        clip_tokenizer: TextTokenizer,
    ):
        """Assembles a pipeline; checks that the encoder widths match the transformer's inputs."""
        cfg = transformer.cfg
        if t5.config.d_model != cfg.context_dim or clip.config.width != cfg.vec_dim:
            raise ValueError(
                f"encoders give T5 {t5.config.d_model} / CLIP {clip.config.width} features; the transformer "
                f"needs {cfg.context_dim} / {cfg.vec_dim}"
            )
        if vae.config.latent_channels * 4 != cfg.in_channels:
            raise ValueError(
                f"autoencoder latent channels {vae.config.latent_channels} x 4 != transformer in_channels "
                f"{cfg.in_channels}"
            )
        if vae.config.downsample_factor != 8:
            raise ValueError(f"autoencoder downsamples by {vae.config.downsample_factor}; FLUX.1 needs 8")
        self.transformer = transformer
        self.t5, self.clip, self.vae = t5, clip, vae
        self.t5_tokenizer, self.clip_tokenizer = t5_tokenizer, clip_tokenizer
        # Jitted once per pipeline; nnx.split keeps the parameters as traced arguments (no constant folding).
        self._t5_fn = self._jit_module(t5, lambda m, ids: m(ids))
        self._clip_fn = self._jit_module(clip, lambda m, ids: m(ids)[1])
        self._decode_fn = self._jit_module(vae, lambda m, z: _to_uint8(m.decode(z)))

    @staticmethod
    def _jit_module(module: nnx.Module, fn):
        graphdef, state = nnx.split(module)

        @jax.jit
        def run(state, x):
            return fn(nnx.merge(graphdef, state), x)

        return lambda x: run(state, x)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        dtype=None,
        t5_max_length: int | None = None,
        clip_max_length: int = CLIP_MAX_LENGTH,
    ) -> FluxPipeline:
        """Loads a ``python -m convert_weights flux-pipeline`` output directory.

        Args:
          path: the converted directory.
          dtype: cast the transformer's parameters to this dtype (default: as stored); the encoders and the
            autoencoder run in their stored dtype.
          t5_max_length: T5 tokens per prompt (default 512 for dev, 256 for schnell).
          clip_max_length: CLIP tokens per prompt (77; capped at the CLIP position table).

        Raises:
          FileNotFoundError: naming every missing part of the directory.
          ValueError: a component whose stored arrays do not match its config.
        """
        from models.flux.load import load as load_flux

        check_pipeline_dir(path)
        path = Path(path)
        transformer = load_flux(path / "transformer", dtype=dtype)
        comps = {name: _load_component(path / name, *spec) for name, spec in _ENCODERS.items()}
        if t5_max_length is None:
            t5_max_length = T5_MAX_LENGTH_DEV if transformer.cfg.guidance_embed else T5_MAX_LENGTH_SCHNELL
        clip = comps["text_encoder_clip"]
        clip_tok = load_clip_tokenizer(str(path / "tokenizer"), min(clip_max_length, clip.config.max_positions))
        t5_tok = load_t5_tokenizer(str(path / "tokenizer_2"), t5_max_length)
        return cls(transformer, comps["text_encoder_t5"], clip, comps["vae"], t5_tok, clip_tok)

    def encode(self, prompts: str | Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """Prompt embeddings as FLUX.1 uses them (T5 without a mask, CLIP's pooled output).

        Args:
          prompts: one prompt or a non-empty list.

        Returns:
          (t5 [B, L, context_dim], clip pooled [B, vec_dim]), float32.
        """
        t5_ids = self.t5_tokenizer(prompts).input_ids
        clip_ids = self.clip_tokenizer(prompts).input_ids
        for name, ids, vocab in (
            ("T5", t5_ids, self.t5.config.vocab_size),
            ("CLIP", clip_ids, self.clip.config.vocab_size),
        ):
            if ids.max() >= vocab:
                raise ValueError(f"{name} tokenizer produced id {int(ids.max())} >= encoder vocab size {vocab}")
        t5 = self._t5_fn(jnp.asarray(t5_ids))
        pooled = self._clip_fn(jnp.asarray(clip_ids))
        return t5.astype(jnp.float32), pooled.astype(jnp.float32)

    def decode(self, latents: jax.Array) -> np.ndarray:
        """VAE-layout latents [B, c, h, w] (Flux's normalised latent space) -> uint8 images [B, 8h, 8w, 3]."""
        z = jnp.transpose(latents, (0, 2, 3, 1)).astype(self._vae_dtype())
        return np.asarray(self._decode_fn(z))

    def _vae_dtype(self):
        return jax.tree.leaves(nnx.state(self.vae, nnx.Param))[0].dtype

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        width: int = 1024,
        height: int = 1024,
        steps: int | None = None,
        seed: int = 0,
        guidance: float = 3.5,
        chipmunk: ChipmunkConfig | None = None,
        num_images: int = 1,
        backend: str = "auto",
        attention_impl: str | None = None,
        progress: bool = False,
    ) -> PipelineOutput:
        """Text -> images.

        Args:
          prompts: one prompt or a non-empty list; each gives ``num_images`` images (consecutive in the output).
          width, height: image size in pixels (multiples of 16; of 128 with Chipmunk's patchify on).
          steps: denoising steps (default 50 for dev, 4 for schnell).
          seed: noise seed.
          guidance: embedded guidance (dev; ignored by schnell).
          chipmunk: Chipmunk config (e.g. ``chipmunk_jax.preset('flux')``), or None for the dense model.
          num_images: images per prompt.
          backend: Chipmunk operator backend.
          attention_impl: dense attention implementation (None: XLA's / ``default_attention_impl``).
          progress: tqdm progress bar over the denoising steps.

        Returns:
          A PipelineOutput with uint8 images [len(prompts) * num_images, height, width, 3].
        """
        from models.flux.sampling import check_size, generate

        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts must contain at least one string, got an empty list")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        patchify_on = chipmunk is not None and chipmunk.patchify.is_enabled
        check_size(width, height, patchify_on, chipmunk.patchify.chunk_size_1 if chipmunk else 8)
        if steps is None:
            steps = 50 if self.transformer.cfg.guidance_embed else 4
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        t5, pooled = self.encode(prompts)
        if num_images > 1:
            t5, pooled = jnp.repeat(t5, num_images, axis=0), jnp.repeat(pooled, num_images, axis=0)
        gen = generate(
            self.transformer,
            t5,
            pooled,
            width=width,
            height=height,
            steps=steps,
            seed=seed,
            guidance=guidance,
            chipmunk=chipmunk,
            backend=backend,
            attention_impl=attention_impl,
            progress=progress,
        )
        return PipelineOutput(images=self.decode(gen.latents), generation=gen)
