"""CLIP vision tower (transformers ``CLIPVisionModel``) in Flax NNX, and CLIP's image preprocessing in numpy / Pillow.

Wan2.1 image-to-video conditions its transformer on CLIP ViT-H/14 image tokens: diffusers'
``WanImageToVideoPipeline.encode_image`` runs ``CLIPImageProcessor`` then ``CLIPVisionModel`` with
``output_hidden_states=True`` and keeps ``hidden_states[-2]``: the output of the penultimate encoder layer, all
257 tokens (class token + 16 x 16 patches), without the post-layernorm. ``CLIPVisionEncoder.__call__`` returns
that hidden state by default and runs only the layers it needs.

The architecture: a bias-free patch convolution (done here as a reshape + matmul over (row, column, channel)
ordered patches), a learned class token, learned absolute position embeddings, a LayerNorm *before* the
encoder (``pre_layrnorm``, transformers' spelling), pre-norm encoder layers with bidirectional multi-head
attention and a GELU (exact, ViT-H/14 from OpenCLIP) or quick-GELU (OpenAI) MLP, and the post-layernorm of the
class token (+ the optional ``visual_projection`` of ``CLIPVisionModelWithProjection``) for the pooled embedding.
The layers are stored stacked (leading layer axis) and run with ``jax.lax.scan``. LayerNorms and softmax are
computed in float32 whatever the parameter dtype.

``preprocess`` reproduces transformers' ``CLIPImageProcessor`` with its Pillow backend (``CLIPImageProcessorPil``):
RGB, resize of the shortest side to 224 with Pillow bicubic (the long side ``int(224 * long / short)``), centre
crop to 224 x 224, rescale by 1/255, normalise with the CLIP mean / std. The torchvision backend of
``CLIPImageProcessor`` (used by transformers 5 when torchvision is installed) resamples uint8 tensors with its own
antialiased bicubic and differs from Pillow by a few grey levels at edges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (also the OpenCLIP ViT-H/14 preprocessing statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Architecture of a CLIP vision tower and its preprocessing statistics (transformers ``CLIPVisionConfig``).

    Attributes:
      image_size: square input size in pixels (224).
      patch_size: patch side in pixels (14 for ViT-H/14).
      num_channels: image channels (3).
      width: residual width (``hidden_size``).
      num_layers: encoder layers.
      num_heads: attention heads (``width`` divisible by it); no tensor records it, so the converter reads it
        from ``config.json`` (16 for ViT-L/H/bigG).
      mlp_dim: MLP hidden width (``intermediate_size``).
      eps: LayerNorm epsilon.
      activation: ``"gelu"`` (exact; OpenCLIP ViT-H/14, Wan) or ``"quick_gelu"`` (OpenAI CLIP).
      projection_dim: width of ``visual_projection`` (``CLIPVisionModelWithProjection``), or None without it.
      image_mean: per-channel mean of ``preprocess``.
      image_std: per-channel standard deviation of ``preprocess``.
    """

    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    width: int = 1280
    num_layers: int = 32
    num_heads: int = 16
    mlp_dim: int = 5120
    eps: float = 1e-5
    activation: str = "gelu"
    projection_dim: int | None = None
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    def __post_init__(self):
        for name in ("image_mean", "image_std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        for name in ("image_size", "patch_size", "num_channels", "width", "num_layers", "num_heads", "mlp_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CLIPVisionConfig.{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        if self.projection_dim is not None and self.projection_dim <= 0:
            raise ValueError(f"projection_dim must be positive or None, got {self.projection_dim}")
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError(f"image_mean / image_std need {self.num_channels} values each")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image: the class token and grid**2 patches (257 for ViT-H/14 at 224)."""
        return self.grid**2 + 1

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CLIPVisionConfig:
        """Inverse of ``to_dict``; unknown keys are an error."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown CLIPVisionConfig fields {unknown}")
        return cls(**d)


CLIP_VIT_H_14 = CLIPVisionConfig(projection_dim=1024)
"""OpenCLIP ViT-H/14 (laion2B), the image encoder of Wan2.1 I2V (``image_encoder/`` of the diffusers repos)."""

CLIP_VISION_TINY = CLIPVisionConfig(image_size=28, patch_size=14, width=20, num_layers=3, num_heads=4, mlp_dim=36)
"""Test-sized tower: 5 tokens of width 20 (``models.wan.tiny_config(i2v=True)`` takes image_dim 20)."""


def _lead(v: jax.Array, ndim: int) -> jax.Array:
    """``v`` with leading unit axes up to ``ndim`` (explicit broadcasting under strict rank promotion)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis in float32 (two-pass variance, as torch), cast back to x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + jnp.float32(eps))
    y = y * _lead(scale.astype(jnp.float32), x.ndim) + _lead(bias.astype(jnp.float32), x.ndim)
    return y.astype(x.dtype)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
    return jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype) * jnp.asarray(std, dtype)


class CLIPVisionLayers(nnx.Module):
    """All encoder layers, every parameter with a leading layer axis L (run with ``jax.lax.scan``).

    Attributes (shapes without the L axis): ``norm1_scale`` / ``norm1_bias`` [W]; ``qkv_kernel`` [W, 3, W] and
    ``qkv_bias`` [3, W] (q, k, v fused); ``out_kernel`` [W, W], ``out_bias`` [W]; ``norm2_*`` [W];
    ``fc1_kernel`` [W, F], ``fc1_bias`` [F]; ``fc2_kernel`` [F, W], ``fc2_bias`` [W].
    """

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, param_dtype):
        n, w, f = config.num_layers, config.width, config.mlp_dim
        dt = param_dtype
        self.norm1_scale = nnx.Param(jnp.ones((n, w), dt))
        self.norm1_bias = nnx.Param(jnp.zeros((n, w), dt))
        self.qkv_kernel = nnx.Param(_normal(rngs, (n, w, 3, w), w**-0.5, dt))
        self.qkv_bias = nnx.Param(jnp.zeros((n, 3, w), dt))
        self.out_kernel = nnx.Param(_normal(rngs, (n, w, w), w**-0.5, dt))
        self.out_bias = nnx.Param(jnp.zeros((n, w), dt))
        self.norm2_scale = nnx.Param(jnp.ones((n, w), dt))
        self.norm2_bias = nnx.Param(jnp.zeros((n, w), dt))
        self.fc1_kernel = nnx.Param(_normal(rngs, (n, w, f), w**-0.5, dt))
        self.fc1_bias = nnx.Param(jnp.zeros((n, f), dt))
        self.fc2_kernel = nnx.Param(_normal(rngs, (n, f, w), f**-0.5, dt))
        self.fc2_bias = nnx.Param(jnp.zeros((n, w), dt))


def _layer(p: dict[str, jax.Array], x: jax.Array, config: CLIPVisionConfig) -> jax.Array:
    """One pre-norm encoder layer on x [B, N, W] with the per-layer parameters ``p``."""
    b, n, w = x.shape
    h, d = config.num_heads, config.head_dim
    dt = x.dtype
    y = _layer_norm(x, p["norm1_scale"], p["norm1_bias"], config.eps)
    bias = lambda name: _lead(p[name].astype(dt), x.ndim + (name == "qkv_bias"))
    qkv = jnp.einsum("bnc,ckd->bnkd", y, p["qkv_kernel"].astype(dt)) + bias("qkv_bias")  # [B, N, 3, W]
    q, k, v = (qkv[:, :, i].reshape(b, n, h, d) for i in range(3))  # [B, N, H, D]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * jnp.float32(d**-0.5)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)  # [B, H, Q, K]
    attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, w)
    x = x + attn @ p["out_kernel"].astype(dt) + bias("out_bias")
    y = _layer_norm(x, p["norm2_scale"], p["norm2_bias"], config.eps)
    y = _ACTIVATIONS[config.activation](y @ p["fc1_kernel"].astype(dt) + bias("fc1_bias"))
    return x + y @ p["fc2_kernel"].astype(dt) + bias("fc2_bias")


class CLIPVisionEncoder(nnx.Module):
    """CLIP vision transformer: pixels [B, 3, S, S] -> hidden states [B, 1 + (S/p)^2, W] (or pooled embeddings)."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=None):
        """Creates randomly initialised weights.

        Args:
          config: the architecture.
          rngs: initialisation randomness.
          dtype: compute dtype of the matmuls (LayerNorm and softmax run in float32).
          param_dtype: storage dtype of the weights (default: ``dtype``).
        """
        self.config = config
        self.dtype = jnp.dtype(dtype)
        pdt = jnp.dtype(param_dtype if param_dtype is not None else dtype)
        c, p, w = config.num_channels, config.patch_size, config.width
        # The bias-free patch Conv2d as a matmul over patches flattened in (row, column, channel) order.
        self.patch_kernel = nnx.Param(_normal(rngs, (p * p * c, w), (p * p * c) ** -0.5, pdt))
        self.class_embedding = nnx.Param(_normal(rngs, (w,), 0.02, pdt))
        self.position_embedding = nnx.Param(_normal(rngs, (config.num_tokens, w), 0.02, pdt))
        self.pre_norm_scale = nnx.Param(jnp.ones((w,), pdt))
        self.pre_norm_bias = nnx.Param(jnp.zeros((w,), pdt))
        self.layers = CLIPVisionLayers(config, rngs=rngs, param_dtype=pdt)
        self.post_norm_scale = nnx.Param(jnp.ones((w,), pdt))
        self.post_norm_bias = nnx.Param(jnp.zeros((w,), pdt))
        if config.projection_dim is not None:
            self.projection = nnx.Param(_normal(rngs, (w, config.projection_dim), w**-0.5, pdt))
        else:
            self.projection = None

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """Patch + class token + positions, then the pre-layernorm: [B, C, S, S] -> [B, N, W] (hidden_states[0])."""
        cfg = self.config
        s, p, g = cfg.image_size, cfg.patch_size, cfg.grid
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (cfg.num_channels, s, s):
            raise ValueError(
                f"pixel_values must be [B, {cfg.num_channels}, {s}, {s}] (CLIP-preprocessed, see preprocess()), "
                f"got {pixel_values.shape}"
            )
        b = pixel_values.shape[0]
        dt = self.dtype
        x = pixel_values.astype(dt).reshape(b, cfg.num_channels, g, p, g, p)
        x = x.transpose(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * cfg.num_channels)  # [B, G*G, p*p*C]
        x = x @ self.patch_kernel[...].astype(dt)  # [B, G*G, W]
        cls = jnp.broadcast_to(self.class_embedding[...].astype(dt), (b, 1, cfg.width))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(dt)[None]  # [B, N, W]
        return _layer_norm(x, self.pre_norm_scale[...], self.pre_norm_bias[...], cfg.eps)

    def _params(self, start: int, stop: int) -> dict[str, jax.Array]:
        return {k: v[...][start:stop] for k, v in vars(self.layers).items() if isinstance(v, nnx.Param)}

    def _hidden_index(self, hidden_state: int) -> int:
        n = self.config.num_layers + 1
        if not -n <= hidden_state < n:
            raise ValueError(f"hidden_state {hidden_state} is out of range for {n} hidden states (-{n} .. {n - 1})")
        return hidden_state % n

    def __call__(self, pixel_values: jax.Array, *, hidden_state: int = -2) -> jax.Array:
        """The hidden state ``hidden_states[hidden_state]`` of transformers' CLIPVisionModel, [B, N, W].

        Index 0 is the embedding after the pre-layernorm, index i the output of layer i, -1 the last layer's
        output (``last_hidden_state``, no post-layernorm). The default -2 (the penultimate layer) is what Wan2.1
        I2V feeds its transformer. Only the layers up to the requested one run.

        Args:
          pixel_values: [B, C, S, S] preprocessed images (``preprocess``).
          hidden_state: which hidden state, Python indexing over the num_layers + 1 states.
        """
        k = self._hidden_index(hidden_state)
        x = self.embed(pixel_values)
        if k == 0:
            return x
        x, _ = jax.lax.scan(lambda h, p: (_layer(p, h, self.config), None), x, self._params(0, k))
        return x

    def hidden_states(self, pixel_values: jax.Array) -> jax.Array:
        """All num_layers + 1 hidden states stacked, [L + 1, B, N, W] (transformers' ``hidden_states`` tuple)."""
        x = self.embed(pixel_values)
        last, ys = jax.lax.scan(lambda h, p: ((y := _layer(p, h, self.config)), y), x, self._params(0, None))
        del last
        return jnp.concatenate([x[None], ys])

    def pooled(self, pixel_values: jax.Array) -> jax.Array:
        """The post-layernormed class token [B, W] (``pooler_output``), projected to [B, P] when the tower has
        ``visual_projection`` (``CLIPVisionModelWithProjection.image_embeds``)."""
        x = self(pixel_values, hidden_state=-1)
        pooled = _layer_norm(x[:, 0], self.post_norm_scale[...], self.post_norm_bias[...], self.config.eps)
        if self.projection is None:
            return pooled
        return pooled @ self.projection[...].astype(pooled.dtype)


@nnx.jit(static_argnames=("hidden_state",))
def encode(encoder: CLIPVisionEncoder, pixel_values: jax.Array, hidden_state: int = -2) -> jax.Array:
    """Jitted ``encoder(pixel_values, hidden_state=...)`` (one compilation per shape and index)."""
    return encoder(pixel_values, hidden_state=hidden_state)


# ---------------------------------------------------------------------------------------------------------
# Preprocessing (transformers CLIPImageProcessor, Pillow backend).


def _as_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4) or a.dtype != np.uint8:
        raise ValueError(f"images must be PIL images or uint8 arrays [H, W, 3 or 4], got {a.dtype} {a.shape}")
    return Image.fromarray(a[..., :3])


def resize_shortest_side(image, size: int):
    """Pillow bicubic resize making the shortest side ``size`` (the long side ``int(size * long / short)``)."""
    from PIL import Image

    img = _as_pil(image)
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img.resize(new, resample=Image.Resampling.BICUBIC)


def center_crop(a: np.ndarray, size: int) -> np.ndarray:
    """Centre crop of [H, W, C] (H, W >= size) to [size, size, C], top = (H - size) // 2 as transformers."""
    h, w = a.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop a {h}x{w} image to {size}x{size}; resize its shortest side first")
    top, left = (h - size) // 2, (w - size) // 2
    return a[top : top + size, left : left + size]


def preprocess(images: Sequence[Any] | Any, config: CLIPVisionConfig = CLIP_VIT_H_14) -> np.ndarray:
    """CLIP pixel values [B, 3, S, S] float32 of PIL images or uint8 arrays [H, W, 3] (S = config.image_size).

    RGB conversion, shortest side to S (Pillow bicubic), centre crop S x S, x / 255, (x - mean) / std: transformers'
    ``CLIPImageProcessor`` with its Pillow backend for a processor config of ``shortest_edge = crop = S``.
    """
    if not isinstance(images, (list, tuple)):
        images = [images]
    s = config.image_size
    mean = np.asarray(config.image_mean, np.float32)
    std = np.asarray(config.image_std, np.float32)
    out = []
    for image in images:
        a = center_crop(np.asarray(resize_shortest_side(image, s)), s)
        x = (a.astype(np.float64) * (1 / 255)).astype(np.float32)  # rescaled in float64 as transformers
        out.append(((x - mean) / std).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)
