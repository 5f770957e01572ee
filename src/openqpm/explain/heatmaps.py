"""Heatmaps: feature maps drawn over images, one fixed colour per feature.

A heatmap shows where a feature is active: its map is upsampled bilinearly to the image and
blended, in the feature's colour, over a dimmed greyscale copy of the image. The brightness is
``map / scale_max``; giving two images the same ``scale_max`` (the larger of their two maxima)
makes them comparable: the weaker image is drawn dimmer, as in the paper's figures.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from openqpm._io import atomic_path

__all__ = [
    "assign_feature_colors",
    "composite_overlay",
    "display_image",
    "feature_palette",
    "heatmap_overlay",
    "save_png",
    "upsample_map",
]

# Well separated colours first (they go to the features that share classes most); more colours
# come from evenly spaced hues at two brightness levels.
_BASE_COLORS = (
    (0.89, 0.10, 0.11),  # red
    (0.12, 0.47, 0.95),  # blue
    (0.13, 0.70, 0.25),  # green
    (1.00, 0.58, 0.00),  # orange
    (0.60, 0.22, 0.85),  # purple
    (0.00, 0.78, 0.82),  # turquoise
    (0.95, 0.20, 0.65),  # magenta
    (0.90, 0.82, 0.05),  # yellow
    (0.60, 0.36, 0.14),  # brown
    (0.55, 0.88, 0.12),  # lime
    (0.18, 0.20, 0.65),  # indigo
    (1.00, 0.55, 0.55),  # salmon
)
_GOLDEN_ANGLE = 0.381966  # fraction of a turn: successive hues stay far apart


def feature_palette(n_colors: int) -> np.ndarray:
    """``n_colors`` distinct RGB colours, the most distinct first.

    Args:
        n_colors: how many.

    Returns:
        (n_colors, 3) floats in [0, 1].
    """
    colors = list(_BASE_COLORS[:n_colors])
    index = 0
    while len(colors) < n_colors:
        hue = (0.03 + index * _GOLDEN_ANGLE) % 1.0
        value = 0.95 if index % 2 == 0 else 0.72
        colors.append(colorsys.hsv_to_rgb(hue, 0.8, value))
        index += 1
    return np.asarray(colors, dtype=np.float64).reshape(n_colors, 3)


def assign_feature_colors(class_features: Sequence[Sequence[int]], n_features: int) -> np.ndarray:
    """One colour per feature, with features that share a class as different as possible.

    Greedy: features used by the most classes choose first; each takes the palette colour
    farthest from the colours already given to features it shares a class with. Deterministic.

    Args:
        class_features: per class its features (head indices).
        n_features: K.

    Returns:
        (K, 3) RGB floats in [0, 1], all different.
    """
    neighbours: list[set[int]] = [set() for _ in range(n_features)]
    n_classes_of = np.zeros(n_features, dtype=np.int64)
    for features in class_features:
        for feature in features:
            n_classes_of[feature] += 1
            neighbours[feature].update(other for other in features if other != feature)
    palette = feature_palette(n_features)
    free = list(range(n_features))
    colors = np.zeros((n_features, 3))
    assigned: dict[int, int] = {}
    for feature in sorted(range(n_features), key=lambda d: (-n_classes_of[d], d)):
        taken = [colors[other] for other in neighbours[feature] if other in assigned]
        if taken:
            distances = np.linalg.norm(
                palette[free][:, None, :] - np.asarray(taken)[None, :, :], axis=2
            ).min(axis=1)  # (n_free,): distance to the closest neighbour colour
            best = int(np.argmax(np.round(distances, 6)))  # first of the farthest
        else:
            best = 0
        assigned[feature] = free.pop(best)
        colors[feature] = palette[assigned[feature]]
    return colors


def upsample_map(feature_map: np.ndarray | torch.Tensor, size_px: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of one (h, w) map to ``size_px`` = (height, width).

    Args:
        feature_map: (h, w).
        size_px: (height, width) of the output.

    Returns:
        (height, width) float32.
    """
    tensor = torch.as_tensor(np.asarray(feature_map, dtype=np.float32))
    if tensor.ndim != 2:
        raise ValueError(f"feature_map must be (h, w), got shape {tuple(tensor.shape)}")
    resized = F.interpolate(
        tensor[None, None], size=size_px, mode="bilinear", align_corners=False
    )  # (1, 1, H, W)
    return resized[0, 0].numpy()


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {array.shape}")
    return array.astype(np.float64) / (255.0 if array.dtype == np.uint8 else 1.0)


def _dimmed_gray(rgb: np.ndarray) -> np.ndarray:
    gray = rgb @ np.array([0.299, 0.587, 0.114])  # (H, W) luminance
    return 0.16 + 0.52 * gray  # dark enough that colour stands out, light enough to see the image


def heatmap_overlay(
    image: Image.Image | np.ndarray,
    feature_map: np.ndarray | torch.Tensor,
    color: Sequence[float] | np.ndarray,
    *,
    scale_max: float | None = None,
) -> np.ndarray:
    """One feature's map in its colour over a dimmed greyscale copy of the image.

    Args:
        image: PIL image or (H, W, 3) array (uint8, or floats in [0, 1]).
        feature_map: (h, w) non-negative activations, upsampled to the image.
        color: RGB in [0, 1].
        scale_max: the activation drawn at full brightness; default this map's maximum. Pass
            one shared value to compare images.

    Returns:
        (H, W, 3) uint8.
    """
    rgb = _as_rgb_array(image)
    level = _levels(feature_map, rgb.shape[:2], scale_max)
    return _blend(rgb, level, np.broadcast_to(np.asarray(color, dtype=np.float64), rgb.shape))


def composite_overlay(
    image: Image.Image | np.ndarray,
    feature_maps: np.ndarray | torch.Tensor,
    colors: np.ndarray,
    *,
    scale_maxes: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Several features over one image: each pixel takes the colour of its strongest feature.

    Args:
        image: PIL image or (H, W, 3) array.
        feature_maps: (k, h, w).
        colors: (k, 3) RGB in [0, 1].
        scale_maxes: (k,) full-brightness activation per feature; default each map's maximum.

    Returns:
        (H, W, 3) uint8; the image itself when there is no feature (k = 0: a sparse baseline's
        class can lose every weight).
    """
    rgb = _as_rgb_array(image)
    maps = np.asarray(feature_maps, dtype=np.float32)
    if maps.ndim != 3 or len(colors) != len(maps):
        raise ValueError(f"need (k, h, w) maps and k colours, got {maps.shape} and {len(colors)}")
    if len(maps) == 0:  # no feature is active anywhere: the background alone
        return _blend(rgb, np.zeros(rgb.shape[:2]), rgb)
    levels = np.stack(
        [
            _levels(maps[i], rgb.shape[:2], None if scale_maxes is None else scale_maxes[i])
            for i in range(len(maps))
        ]
    )  # (k, H, W)
    strongest = levels.argmax(axis=0)  # (H, W)
    color_image = np.asarray(colors, dtype=np.float64)[strongest]  # (H, W, 3)
    return _blend(rgb, levels.max(axis=0), color_image)


def _levels(
    feature_map: np.ndarray | torch.Tensor, size_px: tuple[int, int], scale_max: float | None
) -> np.ndarray:
    upsampled = upsample_map(feature_map, size_px)
    top = float(upsampled.max()) if scale_max is None else float(scale_max)
    if top <= 0:
        return np.zeros(size_px)
    return np.clip(upsampled / top, 0.0, 1.0).astype(np.float64)


def _blend(rgb: np.ndarray, level: np.ndarray, color_image: np.ndarray) -> np.ndarray:
    gray = _dimmed_gray(rgb)[..., None]  # (H, W, 1)
    # weak activations fade out quickly so the peaks read clearly (gamma > 1; the reference
    # code uses 3, which hides all but the peak)
    alpha = (level**2.0)[..., None]
    shaded = color_image * (0.55 + 0.45 * gray / 0.68)  # keep some of the image's texture
    out = gray * (1.0 - alpha) + np.clip(shaded, 0.0, 1.0) * alpha
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def display_image(dataset: Any, index: int, *, size_px: int) -> np.ndarray:
    """An image of a data set as the network sees it, for drawing: square, ``size_px`` wide.

    Uses ``dataset.load_image(index)`` (full resolution, after the optional box crop). When the
    data set's transform contains a centre crop the image is cut to its centre square first;
    otherwise it is squashed to a square, as the test transforms of openqpm do. So the feature
    maps line up with the picture.

    Args:
        dataset: an openqpm data set (``load_image`` and ``transform``).
        index: image index.
        size_px: side of the output.

    Returns:
        (size_px, size_px, 3) uint8.
    """
    image = dataset.load_image(index).convert("RGB")
    steps = getattr(getattr(dataset, "transform", None), "transforms", []) or []
    if any(type(step).__name__ == "CenterCrop" for step in steps):
        side = min(image.size)
        left = (image.width - side) // 2
        top = (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return np.asarray(image.resize((size_px, size_px), Image.Resampling.BICUBIC))


def save_png(image: np.ndarray | Image.Image, path: str | Path) -> Path:
    """Write an image as PNG, atomically (temporary file in the same folder, then rename).

    Args:
        image: (H, W, 3) uint8 array or PIL image.
        path: the file; its folder is created when missing.

    Returns:
        The path written.
    """
    path = Path(path)
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG", compress_level=6)  # optimize=True: 10x slower
    return path
