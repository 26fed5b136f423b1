"""A procedural, class-labelled image dataset: one coloured shape on a muted colour gradient.

Every image is a pure function of (seed, index): nothing is stored on disk. The class label is
``shape * len(COLOURS) + colour`` with the shapes and colours below, so a class-conditioned model must get both
the geometry and the colour right. Shapes are anti-aliased (rendered at 4x and box-filtered); backgrounds are
linear gradients between two greyish colours, so a saturated shape colour never occurs in a background.
"""

from __future__ import annotations

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.78, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
NUM_CLASSES = len(SHAPES) * len(COLOURS)
_SUPERSAMPLE = 4


def class_name(label: int) -> str:
    """'red circle' etc. for a class label in [0, NUM_CLASSES)."""
    shape, colour = divmod(int(label), len(COLOURS))
    return f"{list(COLOURS)[colour]} {SHAPES[shape]}"


def split_label(label: int) -> tuple[int, int]:
    """(shape index, colour index) of a class label."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"label {label} is outside [0, {NUM_CLASSES})")
    return divmod(int(label), len(COLOURS))


def shape_mask(shape: int, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Coverage in [0, 1] of a shape over a size x size pixel grid (pixel centres at i + 0.5), float32 [H, W].

    Args:
      shape: index into SHAPES.
      cx, cy: centre in pixels.
      r: radius (circle), half side (square) or circumradius (upward triangle).
      size: image side in pixels.
    """
    s = size * _SUPERSAMPLE
    coords = (np.arange(s, dtype=np.float64) + 0.5) / _SUPERSAMPLE
    x, y = coords[None, :], coords[:, None]  # y grows downwards
    if SHAPES[shape] == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif SHAPES[shape] == "square":
        inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    else:
        # Equilateral triangle, apex up: the three half-planes of its edges.
        top, base = cy - r, cy + 0.5 * r
        half_w = r * np.sqrt(3.0) / 2.0
        slope = half_w / (base - top)
        inside = (y <= base) & (np.abs(x - cx) <= (y - top) * slope)
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    grey = rng.uniform(0.25, 0.75, size=2)
    ends = np.clip(grey[:, None] + rng.uniform(-0.08, 0.08, size=(2, 3)), 0.0, 1.0)  # [2, 3]
    angle = rng.uniform(0.0, 2.0 * np.pi)
    u = (np.arange(size) + 0.5) / size - 0.5
    proj = np.cos(angle) * u[None, :] + np.sin(angle) * u[:, None]  # [H, W]
    w = (proj - proj.min()) / (proj.max() - proj.min())
    return (ends[0][None, None, :] * (1.0 - w[..., None]) + ends[1][None, None, :] * w[..., None]).astype(np.float32)


def render(label: int, rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Draws one image of class ``label``.

    Args:
      label: class in [0, NUM_CLASSES).
      rng: the image's generator (position, size and background are drawn from it).
      size: image side in pixels.

    Returns:
      (image float32 [size, size, 3] in [0, 1], shape coverage float32 [size, size]).
    """
    shape, colour = split_label(label)
    r = rng.uniform(0.16, 0.30) * size
    margin = r + 1.0
    cx, cy = rng.uniform(margin, size - margin, size=2)
    bg = _background(rng, size)
    mask = shape_mask(shape, cx, cy, r, size)
    fg = np.asarray(COLOURS[list(COLOURS)[colour]], np.float32)
    img = bg * (1.0 - mask[..., None]) + fg[None, None, :] * mask[..., None]
    return img.astype(np.float32), mask


def example(seed: int, index: int, size: int = 64) -> tuple[np.ndarray, int, np.ndarray]:
    """Example ``index`` of the dataset with ``seed``: (image [size, size, 3], label, coverage [size, size])."""
    rng = np.random.default_rng([int(seed), int(index)])
    label = int(rng.integers(NUM_CLASSES))
    img, mask = render(label, rng, size)
    return img, label, mask


def batch(seed: int, start: int, count: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Examples [start, start + count): (images float32 [count, size, size, 3] in [0, 1], labels int32 [count])."""
    imgs, labels = [], []
    for i in range(start, start + count):
        img, label, _ = example(seed, i, size)
        imgs.append(img)
        labels.append(label)
    return np.stack(imgs), np.asarray(labels, np.int32)


# Bounding-box fill ratio (area / bounding-box area) of each shape, for reading the class back from pixels.
SHAPE_FILL: dict[str, float] = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
# A generated pixel belongs to a class colour when no channel is further than this from it (backgrounds are
# greyish and at least 0.45 away from every class colour in some channel).
_COLOUR_TOL = 0.25
# Fewer matching pixels than this (the smallest drawn circle covers about 320) means no shape was drawn.
_MIN_AREA = 60


def read_class(img: np.ndarray) -> tuple[int, int] | None:
    """(shape, colour) read back from an image's pixels, or None when no class-coloured shape is found.

    Works on generated samples as well as on the dataset: the colour is the class colour most pixels are close
    to; the shape is the one whose bounding-box fill ratio is nearest to that of the largest connected region of
    that colour. A ragged blob therefore reads as *some* shape, but it reads as the right one only if its
    geometry is right, which is what ``recognition_rate`` measures.

    Args:
      img: float [H, W, 3] in [0, 1].
    """
    from scipy import ndimage

    cols = np.asarray(list(COLOURS.values()), np.float32)  # [K, 3]
    dist = np.abs(np.asarray(img, np.float32)[:, :, None, :] - cols[None, None]).max(-1)  # [H, W, K]
    near = dist < _COLOUR_TOL
    counts = near.sum(axis=(0, 1))
    colour = int(np.argmax(counts))
    if counts[colour] < _MIN_AREA:
        return None
    regions, n = ndimage.label(near[..., colour])
    sizes = np.bincount(regions.ravel())[1:]
    mask = regions == 1 + int(np.argmax(sizes))
    if mask.sum() < _MIN_AREA:
        return None
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = int(np.argmin([abs(fill - SHAPE_FILL[s]) for s in SHAPES]))
    return shape, colour


def recognition_rate(images: np.ndarray, labels) -> dict[str, float]:
    """Fractions of ``images`` [B, H, W, 3] whose class read back by ``read_class`` matches ``labels``.

    Returns {'class': both shape and colour right, 'shape': shape right, 'colour': colour right}.
    """
    hits = np.zeros((3,), np.float64)
    labels = np.asarray(labels)
    for img, label in zip(images, labels, strict=True):
        want = split_label(int(label))
        got = read_class(img)
        if got is None:
            continue
        hits += (got == want, got[0] == want[0], got[1] == want[1])
    n = max(1, len(labels))
    return {"class": hits[0] / n, "shape": hits[1] / n, "colour": hits[2] / n}
