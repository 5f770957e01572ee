"""Heatmaps: feature maps drawn over images, one fixed colour per feature.

A heatmap shows where a feature is active: its map is upsampled bilinearly to the image and
blended, in the feature's colour, over a dimmed greyscale copy of the image. The brightness is
``map / scale_max``; giving two images the same ``scale_max`` (the larger of their two maxima)
makes them comparable: the weaker image is drawn dimmer, as in the paper's figures.

Certainty-carrying heatmaps (CHiQPM) make brightness mean *strength*: the map is first put in
the units of the head's input with :func:`to_head_units` and then drawn with
``strength_scale`` = the feature's typical strength, :func:`active_means` of the head-input
activations of the training images. Full brightness then means "as strong here as the feature
usually is on the training images where it is active", whatever this image's own maximum is.
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
    "active_means",
    "assign_feature_colors",
    "composite_overlay",
    "display_image",
    "feature_palette",
    "heatmap_overlay",
    "network_view",
    "save_png",
    "to_head_units",
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


def active_means(activations: np.ndarray | torch.Tensor) -> np.ndarray:
    """Each feature's typical strength: its mean activation over the rows where it is active.

    The scale of certainty-carrying heatmaps (CHiQPM): pass the head-input activations of the
    *training* images (``model.forward_head(maps, pre_logits=True)``, a QPM's normalised
    features). A feature is active on a row when its activation is > 0.

    Args:
        activations: (N, K) finite head-input activations.

    Returns:
        (K,) float64, every entry finite and > 0. A feature that is never active (no row > 0,
        or N = 0) gets its largest absolute activation instead, or 1.0 when that is 0 too, so
        the result can always divide.

    Raises:
        ValueError: for an array that is not 2-D or holds NaN or infinity.
    """
    values = np.asarray(
        activations.detach().cpu() if isinstance(activations, torch.Tensor) else activations,
        dtype=np.float64,
    )
    if values.ndim != 2:
        raise ValueError(f"activations must be (N, K), got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("activations must be finite")
    active = values > 0  # (N, K)
    counts = active.sum(axis=0)  # (K,)
    sums = np.where(active, values, 0.0).sum(axis=0)
    largest = np.abs(values).max(axis=0) if len(values) else np.zeros(values.shape[1])
    fallback = np.where(largest > 0, largest, 1.0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), fallback)


def to_head_units(
    feature_maps: np.ndarray | torch.Tensor,
    mean: np.ndarray | torch.Tensor | Sequence[float],
    std: np.ndarray | torch.Tensor | Sequence[float],
) -> np.ndarray:
    """Feature maps in the units of the head's input, position by position.

    The head reads feature j as ``z_j = (mean over positions of M_j - mean_j) / std_j``. Each
    position p is given the same affine map, ``u_j(p) = (M_j(p) - mean_j) / std_j``: the value
    z_j would take if every position looked like p. So the mean of ``u_j`` over the positions
    is exactly ``z_j`` (a CHiQPM head reads its ReLU, ``max(z_j, 0)``), and a position below the
    training mean is negative (not drawn: drawing clips at 0, as the ReLU does).

    Args:
        feature_maps: (..., K, h, w) head feature maps (``model.head_feature_maps``).
        mean: (K,) the head's normalisation mean (``model.head.mean``).
        std: (K,) the std the head divides by, > 0 (a QPM: ``max(head.std, 1e-6)``).

    Returns:
        float32 array of the shape of ``feature_maps``.

    Raises:
        ValueError: for mismatched shapes or a std that is not > 0.
    """
    maps = np.asarray(
        feature_maps.detach().cpu() if isinstance(feature_maps, torch.Tensor) else feature_maps,
        dtype=np.float64,
    )
    offsets, units = (
        np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
        for v in (mean, std)
    )
    if maps.ndim < 3 or offsets.shape != (maps.shape[-3],) or units.shape != offsets.shape:
        raise ValueError(
            f"need (..., K, h, w) maps with (K,) mean and std, got {maps.shape}, "
            f"{offsets.shape} and {units.shape}"
        )
    if not (units > 0).all():
        raise ValueError("std must be > 0 for every feature")
    return ((maps - offsets[:, None, None]) / units[:, None, None]).astype(np.float32)


def heatmap_overlay(
    image: Image.Image | np.ndarray,
    feature_map: np.ndarray | torch.Tensor,
    color: Sequence[float] | np.ndarray,
    *,
    scale_max: float | None = None,
    strength_scale: float | None = None,
) -> np.ndarray:
    """One feature's map in its colour over a dimmed greyscale copy of the image.

    Args:
        image: PIL image or (H, W, 3) array (uint8, or floats in [0, 1]).
        feature_map: (h, w) non-negative activations, upsampled to the image; with
            ``strength_scale``, the map in head-input units (:func:`to_head_units`).
        color: RGB in [0, 1].
        scale_max: the activation drawn at full brightness; default this map's maximum. Pass
            one shared value to compare images.
        strength_scale: certainty-carrying drawing (instead of ``scale_max``): the feature's
            typical strength, ``active_means(training activations)[j]``, > 0. The brightness
            is ``feature_map / strength_scale`` clipped to [0, 1], so a feature with a twice
            larger typical strength is drawn half as bright, and negative positions (below the
            feature's training mean) are not drawn.

    Returns:
        (H, W, 3) uint8.

    Raises:
        ValueError: when both scales are given, or ``strength_scale`` is not > 0.
    """
    rgb = _as_rgb_array(image)
    top = _full_brightness(scale_max, strength_scale)
    level = _levels(feature_map, rgb.shape[:2], top)
    return _blend(rgb, level, np.broadcast_to(np.asarray(color, dtype=np.float64), rgb.shape))


def composite_overlay(
    image: Image.Image | np.ndarray,
    feature_maps: np.ndarray | torch.Tensor,
    colors: np.ndarray,
    *,
    scale_maxes: Sequence[float] | np.ndarray | None = None,
    strength_scales: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Several features over one image: each pixel takes the colour of its strongest feature.

    Args:
        image: PIL image or (H, W, 3) array.
        feature_maps: (k, h, w); with ``strength_scales`` in head-input units
            (:func:`to_head_units`).
        colors: (k, 3) RGB in [0, 1].
        scale_maxes: (k,) full-brightness activation per feature; default each map's maximum.
        strength_scales: (k,) certainty-carrying drawing instead of ``scale_maxes``: each
            feature's typical strength (see :func:`heatmap_overlay`), so the strongest feature
            at a pixel is the one strongest relative to its own typical strength.

    Returns:
        (H, W, 3) uint8; the image itself when there is no feature (k = 0: a sparse baseline's
        class can lose every weight).

    Raises:
        ValueError: for mismatched shapes, both kinds of scale, or a strength that is not > 0.
    """
    rgb = _as_rgb_array(image)
    maps = np.asarray(feature_maps, dtype=np.float32)
    if maps.ndim != 3 or len(colors) != len(maps):
        raise ValueError(f"need (k, h, w) maps and k colours, got {maps.shape} and {len(colors)}")
    for name, scales in (("scale_maxes", scale_maxes), ("strength_scales", strength_scales)):
        if scales is not None and len(scales) != len(maps):
            raise ValueError(f"{name} has {len(scales)} entries for {len(maps)} maps")
    if len(maps) == 0:  # no feature is active anywhere: the background alone
        return _blend(rgb, np.zeros(rgb.shape[:2]), rgb)
    tops = [
        _full_brightness(
            None if scale_maxes is None else float(scale_maxes[i]),
            None if strength_scales is None else float(strength_scales[i]),
        )
        for i in range(len(maps))
    ]
    levels = np.stack(
        [_levels(maps[i], rgb.shape[:2], tops[i]) for i in range(len(maps))]
    )  # (k, H, W)
    strongest = levels.argmax(axis=0)  # (H, W)
    color_image = np.asarray(colors, dtype=np.float64)[strongest]  # (H, W, 3)
    return _blend(rgb, levels.max(axis=0), color_image)


def _full_brightness(scale_max: float | None, strength_scale: float | None) -> float | None:
    """The map value drawn at full brightness; None: the map's own maximum."""
    if strength_scale is None:
        return scale_max
    if scale_max is not None:
        raise ValueError("give scale_max or strength_scale, not both")
    if not (np.isfinite(strength_scale) and strength_scale > 0):
        raise ValueError(f"strength_scale must be finite and > 0, got {strength_scale}")
    return float(strength_scale)


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


def _visible_box(
    width: int, height: int, steps: Sequence[Any]
) -> tuple[float, float, float, float]:
    """The part of a ``width`` x ``height`` image that survives the transform's resizes and
    centre crops, as ``(left, top, right, bottom)`` in the image's own pixels.

    Follows torchvision's ``Resize`` (an int: the shorter side to that length; a pair: both
    sides) and ``CenterCrop`` (an int or a pair); other steps keep the geometry.

    Example:
        >>> import torchvision.transforms as T
        >>> _visible_box(400, 300, [T.Resize(256), T.CenterCrop(224)])  # 224/256 of 300 px
        (68.75, 18.75, 331.25, 281.25)
    """
    scale_x = scale_y = 1.0  # current pixels per original pixel
    offset_x = offset_y = 0.0  # original coordinate of the current image's left/top edge
    current_w, current_h = float(width), float(height)
    for step in steps:
        name = type(step).__name__
        size = getattr(step, "size", None)
        if name == "Resize" and size is not None:
            if isinstance(size, int) or len(size) == 1:
                target = size if isinstance(size, int) else size[0]
                factor = target / min(current_w, current_h)
                new_w, new_h = current_w * factor, current_h * factor
            else:
                new_h, new_w = float(size[0]), float(size[1])
            scale_x *= new_w / current_w
            scale_y *= new_h / current_h
            current_w, current_h = new_w, new_h
        elif name == "CenterCrop" and size is not None:
            crop_h, crop_w = (size, size) if isinstance(size, int) else (size[0], size[-1])
            offset_x += (current_w - crop_w) / 2 / scale_x
            offset_y += (current_h - crop_h) / 2 / scale_y
            current_w, current_h = float(crop_w), float(crop_h)
    return offset_x, offset_y, offset_x + current_w / scale_x, offset_y + current_h / scale_y


def network_view(image: Image.Image, transform: Any, *, size_px: int) -> np.ndarray:
    """The part of ``image`` the network sees through ``transform``, square, ``size_px`` wide.

    The transform's resizes and centre crops decide the part (for ImageNet's Resize(256) +
    CenterCrop(224), the centre 224/256 of the shorter side; for a squash, the whole picture),
    so feature maps drawn on the result line up with what the network looked at.

    Args:
        image: the picture (any mode; converted to RGB).
        transform: a torchvision ``Compose`` (its ``transforms``) or None (whole picture).
        size_px: side of the output.

    Returns:
        (size_px, size_px, 3) uint8.
    """
    image = image.convert("RGB")
    steps = getattr(transform, "transforms", None) or []
    box = _visible_box(image.width, image.height, steps)
    view = image.resize((size_px, size_px), Image.Resampling.BICUBIC, box=box)
    return np.asarray(view)


def display_image(dataset: Any, index: int, *, size_px: int) -> np.ndarray:
    """An image of a data set as the network sees it, for drawing: square, ``size_px`` wide.

    Uses ``dataset.load_image(index)`` (full resolution, after the optional box crop) and the
    data set's ``transform`` (see :func:`network_view`), so the feature maps line up with the
    picture.

    Args:
        dataset: an openqpm data set (``load_image`` and ``transform``).
        index: image index.
        size_px: side of the output.

    Returns:
        (size_px, size_px, 3) uint8.
    """
    transform = getattr(dataset, "transform", None)
    return network_view(dataset.load_image(index), transform, size_px=size_px)


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
