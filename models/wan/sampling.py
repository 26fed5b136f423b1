"""Wan2.1 text-to-video and image-to-video sampling: CFG on the batch axis, UniPC / flow Euler, Chipmunk step
kinds, step caching.

The generation runs through ``chipmunk_jax.sampler.EulerSampler`` with a Wan solver (``models.wan.scheduler``):
one step function is compiled per distinct ``StepPlan`` (warm-up, mask, sparse, skip for the Wan preset) and
reused for every step of that kind. A step is one model call on the batch [cond; uncond] (2B, cond first,
as ``WanTransformer3D`` expects): each CFG branch has its own slice of every cache, the step kinds are shared
(SPEC §1.6). On a step skipped by step caching (SPEC §4) only ``model.final_layer`` runs, on the hidden states
both branches recorded at their latest computed step; the solver update runs as usual.

Latents stay in the diffusers / VAE layout [B, C, F, H, W] (float32) throughout; the voxel reordering of the
video tokens happens inside the transformer.

Image-to-video (an I2V transformer, ``cfg.is_i2v``) follows diffusers' ``WanImageToVideoPipeline``: the model input
of every step is the noisy latents [B, 16, F, H, W] followed by a fixed conditioning tensor [B, 4 + 16, F, H, W]
(``image_condition``: a first-frame mask in 4 channels per latent frame, then the normalised VAE latents of the
video [first image, zeros for the other frames]), and the CLIP image tokens (penultimate layer of ViT-H/14,
[B, 257, 1280]) join the text in every cross-attention; both CFG branches get the same image tokens and the same
conditioning, only the text differs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from chipmunk_jax import parallel
from chipmunk_jax.config import ChipmunkConfig
from chipmunk_jax.indices import StaticMask
from chipmunk_jax.sampler import EulerSampler, Report, SamplerState
from chipmunk_jax.schedules import step_kinds
from models.video import attention_stats, cfg_batch, dense_plan_config, guide, initial_latents, video_latent_size
from models.wan.scheduler import SOLVERS, flow_sigmas
from models.wan.transformer import (
    ChipmunkRun,
    WanCache,
    WanTransformer3D,
    init_wan_cache,
    post_patch_grid,
    wan_static_mask,
)

# The Wan VAE compresses time by 4 (first frame kept) and space by 8; the transformer patch adds 2 x 2.
VAE_TEMPORAL, VAE_SPATIAL = 4, 8
PIXEL_MULTIPLE = 16


def latent_size(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent (F, H, W) of a video of ``frames`` x ``height`` x ``width`` pixels; raises ValueError if invalid.

    Frames must be 4k + 1 (the VAE keeps the first frame and compresses the rest in groups of 4); height and
    width must be multiples of 16 (VAE 8 x patch 2). The message names the nearest valid values.
    """
    return video_latent_size(frames, height, width, temporal=VAE_TEMPORAL, spatial=VAE_SPATIAL, multiple=PIXEL_MULTIPLE)


def default_shift(height: int, width: int) -> float:
    """Wan's flow shift: 3.0 up to 480p-sized videos (832 x 480 pixels), 5.0 above (720p)."""
    return 3.0 if height * width <= 832 * 480 else 5.0


def first_frame_mask(batch: int, frames: int, height: int, width: int) -> np.ndarray:
    """I2V mask channels [B, 4, F_lat, H/8, W/8] float32: 1 where the pixel frame is given (the first), else 0.

    Built as diffusers' ``WanImageToVideoPipeline.prepare_latents`` does: a per-pixel-frame mask [B, 1, frames,
    h, w] (1 on frame 0), the first frame repeated 4 times so that 4k + 4 frames fold into [B, F_lat, 4, h, w],
    then channels first. Every channel of latent frame 0 is 1, the other latent frames are 0.
    """
    f, h, w = latent_size(frames, height, width)
    pixel = np.zeros((batch, 1, frames, h, w), np.float32)
    pixel[:, :, 0] = 1.0
    first = np.repeat(pixel[:, :, :1], VAE_TEMPORAL, axis=2)
    mask = np.concatenate([first, pixel[:, :, 1:]], axis=2)  # [B, 1, 4 F_lat, h, w]
    return mask.reshape(batch, f, VAE_TEMPORAL, h, w).transpose(0, 2, 1, 3, 4)


def video_image(image, width: int, height: int) -> np.ndarray:
    """The first frame for the VAE: [1, 3, height, width] float32 in [-1, 1] from a PIL image or uint8 array.

    As diffusers' ``VideoProcessor.preprocess(image, height, width)`` in ``WanImageToVideoPipeline``: a plain
    Pillow Lanczos resize to width x height (the aspect ratio is not kept, nothing is cropped), x / 255 * 2 - 1.
    Non-RGB images (RGBA, grey) are converted to RGB first (diffusers would pass their channels through).
    """
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    img = img.convert("RGB").resize((width, height), resample=Image.Resampling.LANCZOS)
    x = np.asarray(img).astype(np.float32) / 255.0
    return (2.0 * x - 1.0).transpose(2, 0, 1)[None]


def image_condition(vae, image: np.ndarray | jax.Array, frames: int) -> jax.Array:
    """The I2V conditioning [B, 4 + z, F_lat, H/8, W/8] float32 of first frames ``image`` [B, 3, H, W] in [-1, 1].

    diffusers' ``WanImageToVideoPipeline.prepare_latents``: the video [image, zeros for the other frames - 1
    frames] is VAE-encoded (posterior mean), normalised with the VAE's latents_mean / latents_std, and put after
    the ``first_frame_mask`` channels. The transformer takes it after the noisy latents (C_in = C_out + 4 + z).

    Args:
      vae: a ``models.vae.wan_vae.WanVAE``.
      image: [B, 3, H, W] first frames (``video_image``), H and W multiples of 16.
      frames: video frames (4k + 1).
    """
    from models.vae import wan_vae

    image = jnp.asarray(image, jnp.float32)
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be [B, 3, H, W] in [-1, 1], got {image.shape}")
    b, _, height, width = image.shape
    mask = first_frame_mask(b, frames, height, width)  # validates frames / size
    zeros = jnp.zeros((b, 3, frames - 1, height, width), jnp.float32)
    video = jnp.concatenate([image[:, :, None], zeros], axis=2)  # [B, 3, frames, H, W]
    latents = wan_vae.encode(vae, video)  # normalised posterior mean [B, z, F_lat, H/8, W/8]
    return jnp.concatenate([jnp.asarray(mask), latents.astype(jnp.float32)], axis=1)


@flax.struct.dataclass
class WanCond:
    """Per-generation conditioning (traced: new prompts or guidance do not recompile).

    Attributes:
      text: [B', L, text_dim] UMT5 embeddings; B' = 2B with CFG (cond rows first, then uncond), else B.
      guidance: float32 [] guidance scale (unused without CFG).
      static_mask: (mask [H, G, N] bool, sparse_group [H, G] bool) of the Chipmunk static mask, or None.
      image: I2V: [B, L_img, image_dim] CLIP image tokens (the same for both CFG branches), else None.
      condition: I2V: [B, C_in - C_out, F, H, W] float32 first-frame conditioning (``image_condition``), else None.
    """

    text: jax.Array
    guidance: jax.Array
    static_mask: tuple[jax.Array, jax.Array] | None = None
    image: jax.Array | None = None
    condition: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class WanDenoiser:
    """The guided Wan velocity for ``chipmunk_jax.sampler`` (static and hashable: holds the graphdef).

    Attributes:
      graphdef: ``nnx.split(model)[0]``.
      chipmunk: the Chipmunk config, or None for the dense model.
      cfg: classifier-free guidance on (one model call on the 2B batch [cond; uncond]).
      backend: Chipmunk operator backend.
      attention_impl: ``implementation`` of jax.nn.dot_product_attention for dense attention.
      mesh: ``chipmunk_jax.parallel.make_mesh`` mesh (CFG branches over 'cfg', video tokens over 'sp'), or None.
    """

    graphdef: Any
    chipmunk: ChipmunkConfig | None = None
    cfg: bool = True
    backend: str = "auto"
    attention_impl: str | None = None
    mesh: Mesh | None = None

    def _guide(self, out: jax.Array, guidance: jax.Array) -> jax.Array:
        return guide(out, guidance, self.cfg)

    def velocity(self, params, cond: WanCond, latents, timestep, cache: WanCache, rng, step, plan):
        """Guided velocity [B, C, F, H, W] float32 at the model ``timestep`` and the new cache (a computed step)."""
        model: WanTransformer3D = nnx.merge(self.graphdef, params)
        if cond.condition is not None:  # I2V: [noisy latents; mask; image latents] on the channel axis
            latents = jnp.concatenate([latents, cond.condition.astype(latents.dtype)], axis=1)
        x = cfg_batch(latents, self.cfg)
        image = None if cond.image is None else cfg_batch(cond.image, self.cfg)
        run = None
        if self.chipmunk is not None and self.chipmunk.attn.is_enabled:
            run = ChipmunkRun(self.chipmunk, plan, self.backend)
        sm = (
            None if cond.static_mask is None else StaticMask(mask=cond.static_mask[0], sparse_group=cond.static_mask[1])
        )
        ts = jnp.full((x.shape[0],), timestep, jnp.float32)
        out, cache = model(
            x,
            ts,
            cond.text,
            cache,
            image=image,
            chipmunk=run,
            rng=rng,
            step=step,
            static_mask=sm,
            attention_impl=self.attention_impl,
            mesh=self.mesh,
        )
        return self._guide(out, cond.guidance), cache

    def skip_velocity(self, params, cond: WanCond, latents, timestep, cache: WanCache):
        """Velocity of a skipped step: the output head on each branch's cached hidden states (SPEC §4)."""
        model: WanTransformer3D = nnx.merge(self.graphdef, params)
        if cache.hidden is None:
            raise ValueError("a skipped step needs cache.hidden (init_wan_cache(..., step_caching=True))")
        grid = post_patch_grid(model.cfg, *latents.shape[2:])
        ts = jnp.full((cache.hidden.shape[0],), timestep, jnp.float32)
        return self._guide(model.final_layer(cache.hidden, ts, grid), cond.guidance)

    def stats(self, cache: WanCache) -> dict[str, float]:
        """Achieved attention density on sparse steps (keys computed per query group / keys), both branches."""
        return attention_stats(self.chipmunk, cache.attn)


@dataclasses.dataclass
class WanGeneration:
    """Result of ``generate``: final latents [B, C, F, H, W] float32 (the transformer's normalised latent space;
    ``models.vae.wan_vae.decode`` undoes the normalisation), the report, the final sampler state."""

    latents: jax.Array
    report: Report
    state: SamplerState


def _pad_tokens(x: np.ndarray | jax.Array, length: int) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0)))


def _i2v_inputs(cfg, b: int, latent: tuple[int, int, int], image, condition):
    """(image tokens [B, L, D], condition [B, C, F, H, W] float32), both None for T2V; raises on bad shapes."""
    if not cfg.is_i2v:
        if image is not None or condition is not None:
            raise ValueError("image / condition are for image-to-video; this is a T2V model (cfg.image_dim is None)")
        return None, None
    if image is None or condition is None:
        raise ValueError(
            "this is an image-to-video model: pass image= (CLIP tokens, models.image_encoders.clip_vision) and "
            "condition= (models.wan.sampling.image_condition(vae, first_frame, frames))"
        )
    c = cfg.in_channels - cfg.out_channels
    if image.ndim != 3 or image.shape[0] not in (1, b) or image.shape[2] != cfg.image_dim:
        raise ValueError(f"image must be [1 or {b}, L_img, {cfg.image_dim}] CLIP tokens, got {image.shape}")
    if condition.ndim != 5 or condition.shape[0] not in (1, b) or condition.shape[1:] != (c, *latent):
        raise ValueError(
            f"condition must be [1 or {b}, {c}, {', '.join(map(str, latent))}] (mask + VAE latents for this "
            f"size and frame count; image_condition), got {condition.shape}"
        )
    image = jnp.broadcast_to(jnp.asarray(image), (b, *image.shape[1:]))
    condition = jnp.broadcast_to(jnp.asarray(condition, jnp.float32), (b, *condition.shape[1:]))
    return image, condition


def generate(
    model: WanTransformer3D,
    text: jax.Array,
    negative_text: jax.Array | None = None,
    *,
    frames: int,
    height: int,
    width: int,
    steps: int = 50,
    guidance: float = 5.0,
    shift: float | None = None,
    solver: str | Any = "unipc",
    seed: int = 0,
    chipmunk: ChipmunkConfig | None = None,
    backend: str = "auto",
    attention_impl: str | None = None,
    noise: jax.Array | None = None,
    progress: bool = True,
    mesh: Mesh | None = None,
    image: jax.Array | None = None,
    condition: jax.Array | None = None,
) -> WanGeneration:
    """Samples Wan2.1 text-to-video or image-to-video latents with CFG, UniPC (or flow Euler) and optionally Chipmunk.

    Args:
      model: a ``WanTransformer3D``, T2V or I2V (``model.cfg.is_i2v``: then ``image`` and ``condition`` are
        required).
      text: [B, L, text_dim] UMT5 prompt embeddings (diffusers pads them with zeros to 512 tokens).
      negative_text: [B or 1, L', text_dim] negative-prompt embeddings; required when ``guidance > 1``
        (CFG on, as in diffusers). Both are zero-padded to the longer length.
      frames, height, width: video size in pixels (frames 4k+1, height/width multiples of 16).
      steps: denoising steps.
      guidance: CFG scale; <= 1 runs the conditional branch only.
      shift: flow shift (default ``default_shift(height, width)``: 5.0 at 720p, 3.0 at 480p).
      solver: 'unipc' (Wan's default), 'euler', or a solver object (``models.wan.scheduler``).
      seed: initial noise (numpy ``default_rng(seed)``) and the per-(step, layer) random keys of Chipmunk.
      chipmunk: Chipmunk config (``chipmunk_jax.preset('wan')``), or None for the dense model. Its
        step_caching section is honoured; its MLP section must be disabled (Wan sparsifies self-attention only).
      backend: Chipmunk operator backend.
      attention_impl: jax.nn.dot_product_attention implementation for dense attention.
      noise: optional initial noise [B, C_out, F_lat, H/8, W/8] instead of one drawn from ``seed``.
      progress: tqdm progress bar.
      mesh: a ``chipmunk_jax.parallel.make_mesh(cfg=..., sp=...)`` mesh: the model batch (2B with CFG: the two
        branches) is split over 'cfg', video tokens over 'sp' (Ulysses attention), caches by heads/tokens.
        Independently of the mesh, cache fields chosen by ``chipmunk.offloading`` are kept in host memory.
      image: I2V only: [1 or B, L_img, image_dim] CLIP image tokens (``models.image_encoders.clip_vision``,
        penultimate hidden state; 257 x 1280 for ViT-H/14), given to both CFG branches as diffusers does.
      condition: I2V only: [1 or B, C_in - C_out, F_lat, H/8, W/8] first-frame conditioning from
        ``image_condition`` (mask channels, then the normalised VAE latents of the first frame).

    Returns:
      A WanGeneration.
    """
    cfg = model.cfg
    f, h, w = latent_size(frames, height, width)
    post_patch_grid(cfg, f, h, w)
    if chipmunk is not None and chipmunk.mlp.is_enabled:
        raise ValueError("Wan sparsifies self-attention only: set mlp.is_enabled = false in the Chipmunk config")
    if text.ndim != 3 or text.shape[2] != cfg.text_dim:
        raise ValueError(f"text must be [B, L, {cfg.text_dim}], got {text.shape}")
    b = text.shape[0]
    use_cfg = guidance > 1.0
    if use_cfg:
        if negative_text is None:
            raise ValueError(f"guidance {guidance} > 1 needs negative_text (CFG); pass guidance <= 1 to disable CFG")
        if negative_text.ndim != 3 or negative_text.shape[0] not in (1, b) or negative_text.shape[2] != cfg.text_dim:
            raise ValueError(f"negative_text must be [1 or {b}, L, {cfg.text_dim}], got {negative_text.shape}")
        length = max(text.shape[1], negative_text.shape[1])
        neg = jnp.broadcast_to(_pad_tokens(negative_text, length), (b, length, cfg.text_dim))
        ctx = jnp.concatenate([_pad_tokens(text, length), neg])
    else:
        ctx = jnp.asarray(text, jnp.float32)
    image, condition = _i2v_inputs(cfg, b, (f, h, w), image, condition)
    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)} or pass a solver object")
        solver = SOLVERS[solver]
    shift = default_shift(height, width) if shift is None else shift
    tables = solver.tables(*flow_sigmas(steps, shift))

    key = jax.random.key(seed)
    x = initial_latents(noise, (b, cfg.out_channels, f, h, w), seed)

    grid = post_patch_grid(cfg, f, h, w)
    dt = model.dtype
    sm = None
    if chipmunk is not None and chipmunk.attn.is_enabled:
        mask = wan_static_mask(cfg, chipmunk, grid, jax.random.fold_in(key, 1_000_000))
        sm = (jnp.asarray(mask.mask), jnp.asarray(mask.sparse_group))
    cond = WanCond(
        text=ctx.astype(dt),
        guidance=jnp.asarray(guidance, jnp.float32),
        static_mask=sm,
        image=None if image is None else image.astype(dt),
        condition=condition,
    )
    plan_cfg = chipmunk if chipmunk is not None else dense_plan_config()
    schedule = step_kinds(plan_cfg, steps, cfg.num_layers)
    batch = 2 * b if use_cfg else b
    if mesh is not None:
        parallel.check_attention_shapes(mesh, batch, cfg.heads, math.prod(grid))
    cache = init_wan_cache(cfg, chipmunk, batch=batch, grid=grid, dtype=dt)
    offload = parallel.offloaded_fields(chipmunk.offloading if chipmunk is not None else None)
    cache = parallel.place_cache(cache, mesh=mesh, offload=offload)
    graphdef, params = nnx.split(model)
    if mesh is not None:
        # Parameters, conditioning and the (small) latents replicated; the model shards its activations.
        params, cond, x = jax.device_put((params, cond, x), parallel.replicated(mesh))
    denoiser = WanDenoiser(graphdef, chipmunk, use_cfg, backend, attention_impl, mesh)
    state = SamplerState(
        step=jnp.zeros((), jnp.int32),
        latents=x,
        cache=cache,
        rng=jax.random.fold_in(key, 1),
        solver=solver.init_state(x),
    )
    state, report = EulerSampler(denoiser, schedule, solver).run(params, cond, tables, state, progress=progress)
    return WanGeneration(latents=state.latents, report=report, state=state)
