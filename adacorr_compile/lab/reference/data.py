"""Deterministic synthetic glyph dataset (no download).

Each image is one character rendered with a font that matplotlib ships (DejaVu
Sans, regular or bold), at a random size, position and rotation, in a random
foreground colour on a random background colour. The class is the character.

Rendering: every (font, character) outline is rasterised once into a
high-resolution coverage mask with :class:`matplotlib.textpath.TextPath` and
``Path.contains_points`` (supersampled, so anti-aliased). Each image is then a
batched affine warp of its base mask (``torch.nn.functional.grid_sample`` at 2x
resolution followed by 2x2 average pooling) and a two-colour blend. Tens of
thousands of images render in a few seconds.

``make_dataset(n, seed)`` is a pure function of its arguments: the same seed
gives bit-identical images and labels. Use different seeds for train and
held-out splits (see :data:`TRAIN_SEED`, :data:`HELDOUT_SEED`).
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger("adacorr_compile.reference")

IMAGE_SIZE = 32
NUM_CLASSES = 10
# Characters used as classes, in class-index order. The first ten are digits;
# the letters after them are only used when more than 10 classes are requested
# (chosen to be distinct from the digits and from each other under rotation).
CHARSET = "0123456789ACEFHKLPRTUXYZ"
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf")

TRAIN_SEED = 0
HELDOUT_SEED = 1

# Augmentation ranges (in output pixels / degrees).
GLYPH_SIZE_RANGE = (16.0, 26.0)  # longest side of the glyph's bounding box, pixels
MAX_ROTATION_DEG = 20.0
MIN_LUMINANCE_CONTRAST = 0.35  # |lum(fg) - lum(bg)| on a [0, 1] scale

_BASE_RES = 128  # base mask resolution
_BASE_FILL = 0.8  # fraction of the base frame covered by the glyph's longest side
_SUPERSAMPLE = 4


def _font_path(name: str) -> str:
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"matplotlib font {name!r} not found at {path}")
    return path


@functools.lru_cache(maxsize=None)
def _glyph_mask(char: str, font_file: str) -> np.ndarray:
    """Coverage mask in [0, 1], shape [_BASE_RES, _BASE_RES], glyph centred.

    The glyph's bounding box is centred in the frame and its longest side spans
    ``_BASE_FILL`` of the frame width.
    """
    from matplotlib.font_manager import FontProperties
    from matplotlib.path import Path
    from matplotlib.textpath import TextPath

    prop = FontProperties(fname=_font_path(font_file))
    tp = TextPath((0.0, 0.0), char, size=1.0, prop=prop)
    verts = tp.vertices
    lo, hi = verts.min(axis=0), verts.max(axis=0)
    center = (lo + hi) / 2.0
    extent = float((hi - lo).max())
    # Map glyph units to frame coordinates in [-1, 1] (y up).
    scale = 2.0 * _BASE_FILL / extent
    path = Path((verts - center) * scale, tp.codes)

    n = _BASE_RES * _SUPERSAMPLE
    # Pixel centres, y pointing down in image rows -> flip to y up.
    coords = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    xs, ys = np.meshgrid(coords, -coords)
    pts = np.stack([xs.ravel(), ys.ravel()], axis=1)
    inside = path.contains_points(pts).reshape(n, n).astype(np.float32)
    mask = inside.reshape(_BASE_RES, _SUPERSAMPLE, _BASE_RES, _SUPERSAMPLE).mean(axis=(1, 3))
    return mask


def _base_masks(num_classes: int) -> torch.Tensor:
    """[num_fonts, num_classes, 1, R, R] float32 coverage masks."""
    masks = [[_glyph_mask(CHARSET[c], f) for c in range(num_classes)] for f in FONT_FILES]
    return torch.from_numpy(np.asarray(masks, dtype=np.float32))[:, :, None]


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _sample_colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Foreground/background RGB in [0, 1] with a minimum luminance contrast."""
    fg = rng.random((n, 3))
    bg = rng.random((n, 3))
    bad = np.abs(_luminance(fg) - _luminance(bg)) < MIN_LUMINANCE_CONTRAST
    while bad.any():
        k = int(bad.sum())
        fg[bad] = rng.random((k, 3))
        bg[bad] = rng.random((k, 3))
        bad = np.abs(_luminance(fg) - _luminance(bg)) < MIN_LUMINANCE_CONTRAST
    return fg, bg


def make_dataset(
    n: int, seed: int, num_classes: int = NUM_CLASSES, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``n`` glyph images.

    Returns ``(images, labels)``: images float32 [n, 3, 32, 32] in [-1, 1],
    labels int64 [n] in ``[0, num_classes)``. Deterministic given ``seed``.
    """
    if not 1 <= num_classes <= len(CHARSET):
        raise ValueError(f"num_classes must be in [1, {len(CHARSET)}], got {num_classes}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    fonts = rng.integers(0, len(FONT_FILES), size=n)
    size_px = rng.uniform(*GLYPH_SIZE_RANGE, size=n)
    angle = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, size=n))
    # Centre offset (pixels); keep the glyph's box mostly inside the image.
    max_shift = np.maximum((IMAGE_SIZE - size_px) / 2.0 - 1.0, 0.0)
    shift_x = rng.uniform(-1.0, 1.0, size=n) * max_shift
    shift_y = rng.uniform(-1.0, 1.0, size=n) * max_shift
    fg, bg = _sample_colours(rng, n)

    # Affine map from output normalised coords to base-frame normalised coords.
    # Output glyph longest side = size_px / IMAGE_SIZE * 2 in normalised units;
    # in the base frame it is 2 * _BASE_FILL.
    zoom = (2.0 * _BASE_FILL) / (size_px / IMAGE_SIZE * 2.0)
    tx = shift_x / (IMAGE_SIZE / 2.0)
    ty = shift_y / (IMAGE_SIZE / 2.0)
    cos, sin = np.cos(angle), np.sin(angle)
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    # in = zoom * R(angle) @ (out - t)
    theta[:, 0, 0] = zoom * cos
    theta[:, 0, 1] = -zoom * sin
    theta[:, 1, 0] = zoom * sin
    theta[:, 1, 1] = zoom * cos
    theta[:, 0, 2] = -(theta[:, 0, 0] * tx + theta[:, 0, 1] * ty)
    theta[:, 1, 2] = -(theta[:, 1, 0] * tx + theta[:, 1, 1] * ty)

    base = _base_masks(num_classes)
    images = torch.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.float32)
    fg_t = torch.from_numpy(fg.astype(np.float32))[:, :, None, None]
    bg_t = torch.from_numpy(bg.astype(np.float32))[:, :, None, None]
    theta_t = torch.from_numpy(theta)
    labels_t = torch.from_numpy(labels.astype(np.int64))
    fonts_t = torch.from_numpy(fonts.astype(np.int64))
    hi = IMAGE_SIZE * 2
    with torch.no_grad():
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            src = base[fonts_t[s:e], labels_t[s:e]]  # [b, 1, R, R]
            grid = F.affine_grid(theta_t[s:e], [e - s, 1, hi, hi], align_corners=False)
            mask = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            mask = F.avg_pool2d(mask, 2).clamp_(0.0, 1.0)  # [b, 1, 32, 32]
            rgb = bg_t[s:e] + mask * (fg_t[s:e] - bg_t[s:e])
            images[s:e] = rgb * 2.0 - 1.0
    logger.debug("rendered %d glyph images (seed=%d, classes=%d)", n, seed, num_classes)
    return images, labels_t


def class_names(num_classes: int = NUM_CLASSES) -> list[str]:
    """The character of each class index."""
    return list(CHARSET[:num_classes])
