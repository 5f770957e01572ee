"""The embedded part-based data set: generated "creatures" in the CUB-200-2011 layout.

Each creature is drawn from parts placed relative to its body (body, head, crown, eye, beak,
wing, tail, legs). Every part has attributes (colour, shape, pattern or length); a value of an
attribute group is one binary attribute in CUB's style (``has_eye_color::red``). A class is a
combination of attribute values; classes come in families that share most attributes, and in
every family some pairs differ in exactly one attribute (as Shiny and Bronzed Cowbird differ only
by the red eye). Images vary in position, scale, rotation, mirroring, per-part attribute noise (a
class shows each value with a class-specific probability: these probabilities, in percent, are
the continuous class attributes), cluttered backgrounds with distractor shapes and occasional
occlusion of a part.

The folder written by :func:`make_synthetic` is read by the CUB loader
(``create_dataset("synthetic", root, split)``), so the box crop, parts and Structural Grounding
run on it exactly as on CUB. This module needs only numpy and Pillow (no torch), so that its
worker processes start fast.

Example:
    >>> root = make_synthetic("/tmp/creatures", n_classes=50, seed=0)
    >>> render_preview(root, "/tmp/creatures_preview.png")
"""

from __future__ import annotations

import colorsys
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from openqpm._io import atomic_path

_logger = logging.getLogger(__name__)

__all__ = [
    "ATTRIBUTE_GROUPS",
    "DEFAULT_IMAGES_PER_CLASS",
    "DEFAULT_TRAIN_FRACTION",
    "MAX_CLASSES",
    "METADATA_FILE",
    "MIN_CLASSES",
    "PARTS",
    "make_synthetic",
    "read_synthetic_metadata",
    "render_preview",
]

# 100 images per class with a 60/40 split: 60 training images per class is twice CUB's ~30,
# which a small CNN trained from scratch on CPU needs to learn 5-pixel parts; 40 test images
# per class (2000 for 50 classes) resolve accuracy differences of about one point.
DEFAULT_IMAGES_PER_CLASS = 100
DEFAULT_TRAIN_FRACTION = 0.6
MIN_CLASSES = 4
MAX_CLASSES = 400
METADATA_FILE = "openqpm_synthetic.json"
_FORMAT_VERSION = 1
_FAMILY_SIZE = 5  # classes per family (families of the last sizes may be one larger or smaller)

ColorRGB = tuple[int, int, int]

PALETTE: dict[str, ColorRGB] = {
    "red": (205, 30, 35),
    "orange": (240, 125, 25),
    "yellow": (238, 212, 40),
    "green": (45, 155, 60),
    "blue": (40, 85, 210),
    "purple": (125, 55, 170),
    "brown": (120, 72, 38),
    "grey": (140, 140, 140),
    "black": (28, 28, 30),
    "white": (242, 242, 236),
    "pink": (240, 150, 170),
}
_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "grey", "black", "white")

# Attribute group -> its values; every (group, value) pair is one binary attribute.
ATTRIBUTE_GROUPS: dict[str, tuple[str, ...]] = {
    "has_body_color": _COLORS,
    "has_body_pattern": ("solid", "striped", "spotted"),
    "has_head_color": _COLORS,
    "has_head_pattern": ("plain", "crested", "capped"),
    "has_eye_color": ("black", "red", "white", "yellow"),
    "has_bill_shape": ("short", "long", "hooked"),
    "has_bill_color": ("yellow", "orange", "black", "grey"),
    "has_wing_color": _COLORS,
    "has_wing_pattern": ("solid", "barred", "tipped"),
    "has_tail_color": _COLORS,
    "has_tail_shape": ("pointed", "fan", "forked"),
    "has_leg_color": ("orange", "black", "pink"),
    "has_leg_length": ("short", "long"),
}
_GROUPS = tuple(ATTRIBUTE_GROUPS)
_GROUP_INDEX = {group: index for index, group in enumerate(_GROUPS)}

PARTS = ("body", "head", "crown", "eye", "beak", "wing", "tail", "legs")
_PART_INDEX = {part: index for index, part in enumerate(PARTS)}
# The groups a part carries: when the part is hidden, its attributes are "not visible".
_PART_GROUPS: dict[str, tuple[str, ...]] = {
    "body": ("has_body_color", "has_body_pattern"),
    "head": ("has_head_color",),
    "crown": ("has_head_pattern",),
    "eye": ("has_eye_color",),
    "beak": ("has_bill_shape", "has_bill_color"),
    "wing": ("has_wing_color", "has_wing_pattern"),
    "tail": ("has_tail_color", "has_tail_shape"),
    "legs": ("has_leg_color", "has_leg_length"),
}
_GROUP_PART = {group: part for part, groups in _PART_GROUPS.items() for group in groups}

# Groups that may differ between classes of one family (the body colour identifies the family),
# with how often each is picked; small parts first, as in fine-grained bird species.
_VARIABLE_GROUPS = {
    "has_eye_color": 3.0,
    "has_head_pattern": 3.0,
    "has_bill_shape": 2.0,
    "has_bill_color": 2.0,
    "has_wing_pattern": 2.0,
    "has_tail_shape": 2.0,
    "has_body_pattern": 2.0,
    "has_head_color": 2.0,
    "has_wing_color": 2.0,
    "has_leg_color": 1.5,
    "has_tail_color": 1.0,
    "has_leg_length": 1.0,
}
_SMALL_PART_GROUPS = ("has_eye_color", "has_head_pattern", "has_bill_shape", "has_bill_color")

# Family names of the generated classes (real bird groups, for readable class names).
# fmt: off
_FAMILY_NOUNS = (
    "Finch", "Warbler", "Tanager", "Sparrow", "Wren", "Thrush", "Shrike", "Vireo", "Oriole",
    "Grosbeak", "Bunting", "Kinglet", "Swallow", "Flycatcher", "Cowbird", "Blackbird", "Starling",
    "Jay", "Kingfisher", "Tern", "Gull", "Pipit", "Lark", "Nuthatch", "Creeper", "Chickadee",
    "Titmouse", "Waxwing", "Cardinal", "Towhee", "Junco", "Longspur", "Grackle", "Meadowlark",
    "Bobolink", "Cuckoo", "Hummingbird", "Woodpecker", "Flicker", "Sapsucker", "Phoebe", "Pewee",
    "Martin", "Catbird", "Mockingbird", "Thrasher", "Dipper", "Redstart", "Yellowthroat", "Chat",
    "Ovenbird", "Waterthrush", "Parula", "Bluebird", "Robin", "Shama", "Bulbul", "Babbler",
    "Sunbird", "Weaver", "Manakin", "Cotinga", "Tyrant", "Antbird", "Honeyeater", "Pitta",
    "Roller", "Kestrel", "Hoopoe", "Trogon", "Motmot", "Puffbird", "Jacamar", "Barbet",
    "Toucanet", "Aracari", "Parakeet", "Lorikeet", "Rosella", "Dove", "Quail", "Plover",
    "Sandpiper", "Heron", "Ibis", "Rail", "Grebe", "Puffin", "Auklet", "Petrel",
)
# fmt: on


def _color_adjectives(suffix: str, colors: Sequence[str]) -> dict[str, str]:
    return {color: f"{color.capitalize()} {suffix}" for color in colors}


# How a class name says that a member of a family differs from the family's prototype.
_ADJECTIVES: dict[str, dict[str, str]] = {
    "has_body_color": _color_adjectives("bodied", _COLORS),
    "has_body_pattern": {"solid": "Plain", "striped": "Striped", "spotted": "Spotted"},
    "has_head_color": _color_adjectives("headed", _COLORS),
    "has_head_pattern": {"plain": "Bareheaded", "crested": "Crested", "capped": "Capped"},
    "has_eye_color": _color_adjectives("eyed", ATTRIBUTE_GROUPS["has_eye_color"]),
    "has_bill_shape": {"short": "Short billed", "long": "Long billed", "hooked": "Hook billed"},
    "has_bill_color": _color_adjectives("billed", ATTRIBUTE_GROUPS["has_bill_color"]),
    "has_wing_color": _color_adjectives("winged", _COLORS),
    "has_wing_pattern": {"solid": "Plain winged", "barred": "Bar winged", "tipped": "Tip winged"},
    "has_tail_color": _color_adjectives("tailed", _COLORS),
    "has_tail_shape": {"pointed": "Pin tailed", "fan": "Fan tailed", "forked": "Fork tailed"},
    "has_leg_color": _color_adjectives("legged", ATTRIBUTE_GROUPS["has_leg_color"]),
    "has_leg_length": {"short": "Short legged", "long": "Long legged"},
}


def attribute_names() -> list[str]:
    """The binary attributes in file order: ``group::value`` for every group and value."""
    return [f"{group}::{value}" for group, values in ATTRIBUTE_GROUPS.items() for value in values]


# ----------------------------------------------------------------------------- class design


@dataclass(frozen=True)
class _ClassDesign:
    """One class: its dominant value per group and the probability of every value."""

    name: str
    family: int
    values: tuple[int, ...]  # dominant value index per group, in _GROUPS order
    probabilities: tuple[tuple[float, ...], ...]  # per group, a distribution over its values

    @property
    def folder(self) -> str:
        return self.name.replace(" ", "_")


def _noisy_distribution(
    rng: np.random.Generator, n_values: int, dominant: int, *, low: float, pure_chance: float
) -> tuple[float, ...]:
    """A distribution with most mass on ``dominant`` and the rest on one other value."""
    probabilities = np.zeros(n_values)
    if rng.random() < pure_chance:
        probabilities[dominant] = 1.0
    else:
        share = round(float(rng.uniform(low, 0.97)), 2)
        other = int(rng.choice([v for v in range(n_values) if v != dominant]))
        probabilities[dominant] = share
        probabilities[other] = round(1.0 - share, 2)
    return tuple(float(p) for p in probabilities)


def _design_classes(n_classes: int, rng: np.random.Generator) -> list[_ClassDesign]:
    """Families of about five classes: prototypes far apart, members changing 1 or 2 groups."""
    n_families = max(1, round(n_classes / _FAMILY_SIZE))
    sizes = [n_classes // n_families + (f < n_classes % n_families) for f in range(n_families)]
    body_colors = rng.permutation(len(_COLORS))
    prototypes: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    designs: list[_ClassDesign] = []
    for family, size in enumerate(sizes):
        prototype = _prototype(rng, prototypes, body_color=int(body_colors[family % len(_COLORS)]))
        prototypes.append(prototype)
        members = _family_members(rng, prototype, size, seen, eye_pair=family == 0)
        seen.update(values for values, _ in members)
        designs += _family_designs(rng, family, prototype, members)
    return designs


def _prototype(
    rng: np.random.Generator, others: list[tuple[int, ...]], *, body_color: int
) -> tuple[int, ...]:
    """A random combination that differs from every earlier prototype in at least 4 groups."""
    for attempt in range(2000):
        values = [int(rng.integers(len(ATTRIBUTE_GROUPS[group]))) for group in _GROUPS]
        values[_GROUP_INDEX["has_body_color"]] = body_color
        required = 4 if attempt < 1000 else 2  # relaxed when the space gets crowded
        if all(sum(a != b for a, b in zip(values, other)) >= required for other in others):
            break
    return tuple(values)


def _family_members(
    rng: np.random.Generator,
    prototype: tuple[int, ...],
    size: int,
    seen: set[tuple[int, ...]],
    *,
    eye_pair: bool,
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The prototype and ``size - 1`` variants of it, as ``(values, changed group indices)``.

    Members 1 and 2 change one group (each forms a one-attribute pair with the prototype;
    member 1 changes a small part, the eye colour when ``eye_pair``, like the cowbirds), later
    members change two groups. Every combination is new (not in ``seen``).
    """
    variable = list(_VARIABLE_GROUPS)
    weights = np.array([_VARIABLE_GROUPS[group] for group in variable])
    members: list[tuple[tuple[int, ...], tuple[int, ...]]] = [(prototype, ())]
    for member in range(1, size):
        for _ in range(500):
            if member == 1:
                groups = ["has_eye_color"] if eye_pair else [str(rng.choice(_SMALL_PART_GROUPS))]
            else:
                n_changes = 1 if member == 2 else 2
                picked = rng.choice(
                    len(variable), n_changes, replace=False, p=weights / weights.sum()
                )
                groups = [variable[int(i)] for i in picked]
            values = list(prototype)
            for group in groups:
                g = _GROUP_INDEX[group]
                others = [v for v in range(len(ATTRIBUTE_GROUPS[group])) if v != prototype[g]]
                values[g] = int(rng.choice(others))
            candidate = tuple(values)
            if candidate not in seen and all(candidate != m for m, _ in members):
                members.append((candidate, tuple(_GROUP_INDEX[group] for group in groups)))
                break
        else:  # pragma: no cover - the value space is far larger than 400 classes
            raise RuntimeError("could not design distinct classes")
    return members


def _family_designs(
    rng: np.random.Generator,
    family: int,
    prototype: tuple[int, ...],
    members: list[tuple[tuple[int, ...], tuple[int, ...]]],
) -> list[_ClassDesign]:
    """Names and value probabilities of a family's classes."""
    n_values = [len(ATTRIBUTE_GROUPS[group]) for group in _GROUPS]
    varied = {g for _, changed in members for g in changed}
    # Groups the family shares get the same noise in every member, so that one-attribute pairs
    # differ in the varied group only, in their continuous attributes too. Colours vary less
    # than shapes and patterns, so that a family keeps its look.
    shared_noise = {
        g: _noisy_distribution(
            rng,
            n_values[g],
            prototype[g],
            low=0.85 if _GROUPS[g].endswith("_color") else 0.8,
            pure_chance=0.7 if _GROUPS[g].endswith("_color") else 0.5,
        )
        for g in range(len(_GROUPS))
        if g not in varied
    }
    noun = _FAMILY_NOUNS[family % len(_FAMILY_NOUNS)]
    if family >= len(_FAMILY_NOUNS):
        noun = f"{noun} {family // len(_FAMILY_NOUNS) + 1}"
    designs = []
    for values, changed in members:
        probabilities = tuple(
            _noisy_distribution(rng, n_values[g], values[g], low=0.9, pure_chance=0.6)
            if g in varied
            else shared_noise[g]
            for g in range(len(_GROUPS))
        )
        adjectives = [
            _ADJECTIVES[_GROUPS[g]][ATTRIBUTE_GROUPS[_GROUPS[g]][values[g]]]
            for g in sorted(changed)
        ]
        name = " ".join([*adjectives, noun]) if adjectives else f"Common {noun}"
        designs.append(_ClassDesign(name, family, values, probabilities))
    return designs


# ----------------------------------------------------------------------------- geometry

# Creature coordinates: body length 1, facing +x, y pointing down (image convention).
_BODY = (0.0, 0.0, 0.5, 0.29)  # centre x, y, semi-axes a, b
_HEAD = (0.47, -0.30, 0.21)  # centre x, y, radius
_EYE = (0.56, -0.35, 0.09)
_CROWN = (0.45, -0.49)
_WING = (-0.1, -0.08, 0.3, 0.13, math.radians(-10.0))  # centre, semi-axes, tilt
_BEAKS = {
    "short": ((0.62, -0.37), (0.84, -0.30), (0.62, -0.23)),
    "long": ((0.62, -0.35), (1.02, -0.30), (0.62, -0.26)),
    "hooked": (
        (0.62, -0.38),
        (0.79, -0.37),
        (0.88, -0.30),
        (0.86, -0.20),
        (0.80, -0.26),
        (0.62, -0.24),
    ),
}
_BEAK_CENTRES = {"short": (0.71, -0.30), "long": (0.78, -0.30), "hooked": (0.75, -0.31)}
_TAILS = {
    "pointed": ((-0.40, -0.12), (-0.90, -0.17), (-0.40, 0.04)),
    "fan": ((-0.40, -0.08), (-0.78, -0.32), (-0.86, -0.10), (-0.80, 0.12), (-0.40, 0.04)),
    "forked": ((-0.40, -0.10), (-0.88, -0.28), (-0.66, -0.07), (-0.88, 0.12), (-0.40, 0.04)),
}
_TAIL_CENTRE = (-0.62, -0.06)
_CREST = ((0.30, -0.42), (0.24, -0.70), (0.41, -0.50), (0.43, -0.78), (0.53, -0.49))
_LEG_X = (0.07, -0.10)
_LEG_TOP = 0.2
_LEG_LENGTH = {"short": 0.17, "long": 0.33}
_LEG_WIDTH = 0.07
# How far (in body lengths) an occluder must reach around each part's centre to hide it.
_PART_RADIUS = {
    "head": 0.27,
    "crown": 0.13,
    "eye": 0.1,
    "beak": 0.2,
    "wing": 0.36,
    "tail": 0.3,
    "legs": 0.24,
}


def _ellipse(
    cx: float, cy: float, a: float, b: float, tilt: float = 0.0, n: int = 28
) -> np.ndarray:
    angles = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    x, y = a * np.cos(angles), b * np.sin(angles)
    c, s = math.cos(tilt), math.sin(tilt)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)  # (n, 2)


def _ellipse_band(
    cx: float, cy: float, a: float, b: float, x_from: float, x_to: float, tilt: float = 0.0
) -> np.ndarray:
    """The part of an ellipse between two x values of its own frame, as a polygon ``(16, 2)``."""
    x_from, x_to = max(x_from, -a * 0.999), min(x_to, a * 0.999)
    xs = np.linspace(x_from, x_to, 8)
    half = b * np.sqrt(1.0 - (xs / a) ** 2)
    upper = np.stack([xs, -half], axis=1)  # (8, 2)
    lower = np.stack([xs[::-1], half[::-1]], axis=1)  # (8, 2)
    x, y = np.concatenate([upper, lower]).T
    c, s = math.cos(tilt), math.sin(tilt)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


@dataclass(frozen=True)
class _Pose:
    scale: float  # canvas pixels per body length
    angle: float  # radians
    flip: float  # +1 or -1 (mirror)
    tx: float
    ty: float

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Creature coordinates (n, 2) -> canvas pixels (n, 2)."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        x = points[:, 0] * self.flip * self.scale
        y = points[:, 1] * self.scale
        return np.stack([c * x - s * y + self.tx, s * x + c * y + self.ty], axis=1)


def _shade(color: Sequence[float], factor: float) -> ColorRGB:
    r, g, b = (min(255, max(0, round(channel * factor))) for channel in color)
    return r, g, b


def _luminance(color: ColorRGB) -> float:
    return 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]


def _pattern_color(color: ColorRGB) -> ColorRGB:
    """A contrasting shade for stripes, spots, bars: darker on light colours, lighter on dark."""
    if _luminance(color) > 100:
        return _shade(color, 0.42)
    r, g, b = (round(0.45 * channel + 0.55 * 235) for channel in color)
    return r, g, b


def _hsv_color(hue: float, saturation: float, value: float) -> ColorRGB:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
    return round(r * 255), round(g * 255), round(b * 255)


# ----------------------------------------------------------------------------- backgrounds


@dataclass(frozen=True)
class _BackgroundStyle:
    top: ColorRGB
    bottom: ColorRGB
    clutter_colors: tuple[ColorRGB, ...]
    n_clutter: tuple[int, int]  # min, max distractor shapes
    kinds: tuple[float, float, float]  # probabilities of ellipse, polygon, line distractors


def _random_style(rng: np.random.Generator) -> _BackgroundStyle:
    hue = float(rng.random())
    top = _hsv_color(hue, float(rng.uniform(0.08, 0.5)), float(rng.uniform(0.35, 0.92)))
    bottom = _hsv_color(
        (hue + float(rng.uniform(-0.08, 0.08))) % 1.0,
        float(rng.uniform(0.08, 0.5)),
        float(rng.uniform(0.3, 0.9)),
    )
    # Half of the clutter wears the creatures' own colours, so no single colour gives a class away.
    clutter = [PALETTE[_COLORS[int(rng.integers(len(_COLORS)))]] for _ in range(2)]
    clutter += [
        _hsv_color(float(rng.random()), float(rng.uniform(0.1, 0.6)), float(rng.uniform(0.2, 0.9)))
        for _ in range(3)
    ]
    kinds = rng.dirichlet((2.0, 2.0, 2.0)).tolist()
    return _BackgroundStyle(top, bottom, tuple(clutter), (2, 7), (kinds[0], kinds[1], kinds[2]))


def _class_style(seed: int, class_index: int) -> _BackgroundStyle:
    """A strongly class-specific background (the spurious cue of the correlated variant)."""
    rng = np.random.default_rng([seed, class_index, 7919])
    hue = (class_index * 0.618034) % 1.0
    top = _hsv_color(hue, 0.55, 0.85)
    bottom = _hsv_color((hue + 0.05) % 1.0, 0.6, 0.55)
    clutter = tuple(
        _hsv_color((hue + 0.5 + 0.1 * k) % 1.0, 0.6, float(rng.uniform(0.4, 0.9))) for k in range(3)
    )
    # One kind of clutter dominates, a different one for neighbouring classes.
    kinds = [0.1, 0.1, 0.1]
    kinds[class_index % 3] = 0.8
    return _BackgroundStyle(top, bottom, clutter, (4, 8), (kinds[0], kinds[1], kinds[2]))


def _draw_background(
    canvas_size: int, style: _BackgroundStyle, rng: np.random.Generator
) -> Image.Image:
    ramp = np.linspace(0.0, 1.0, canvas_size)[:, None]  # (H, 1): top to bottom blend
    top, bottom = np.array(style.top, dtype=np.float64), np.array(style.bottom, dtype=np.float64)
    column = ((1.0 - ramp) * top + ramp * bottom).round().astype(np.uint8)  # (H, 3)
    # A one-pixel-wide gradient stretched sideways: much cheaper than a full (H, W, 3) array.
    image = Image.fromarray(column[:, None, :], mode="RGB").resize((canvas_size, canvas_size))
    draw = ImageDraw.Draw(image)
    n_clutter = int(rng.integers(style.n_clutter[0], style.n_clutter[1] + 1))
    for _ in range(n_clutter):
        color = style.clutter_colors[int(rng.integers(len(style.clutter_colors)))]
        color = _shade(color, float(rng.uniform(0.8, 1.1)))
        kind = int(rng.choice(3, p=np.array(style.kinds) / sum(style.kinds)))
        cx, cy = rng.uniform(0, canvas_size, size=2)
        size = float(rng.uniform(0.04, 0.22)) * canvas_size
        if kind == 0:
            points = _ellipse(
                cx,
                cy,
                size,
                size * float(rng.uniform(0.3, 1.0)),
                float(rng.uniform(0, math.pi)),
                n=20,
            )
            draw.polygon(points.ravel().tolist(), fill=color)
        elif kind == 1:
            n = int(rng.integers(3, 7))
            angles = np.sort(rng.uniform(0, 2 * math.pi, n))
            radii = size * rng.uniform(0.4, 1.0, n)
            points = np.stack(
                [cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1
            )  # (n, 2)
            draw.polygon(points.ravel().tolist(), fill=color)
        else:
            angle = float(rng.uniform(0, math.pi))
            dx, dy = math.cos(angle) * size * 2.0, math.sin(angle) * size * 2.0
            width = max(1, int(canvas_size * float(rng.uniform(0.01, 0.035))))
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=color, width=width)
    return image


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _ImageRecord:
    """What the index files need about one rendered image."""

    box: tuple[float, float, float, float]  # x, y, w, h in pixels
    parts: np.ndarray  # (n_parts, 3): x, y in pixels, visible
    values: np.ndarray  # (n_groups,) drawn value index per group
    channel_sum: np.ndarray  # (3,) int64, sum of the pixel values
    channel_square_sum: np.ndarray  # (3,) int64


def _supersampling(image_size_px: int) -> int:
    """Drawing resolution factor: shapes are drawn larger and averaged down (anti-aliasing)."""
    return 4 if image_size_px <= 96 else 3 if image_size_px <= 160 else 2


Shape = tuple[str, np.ndarray, ColorRGB]  # (part, polygon in creature coordinates, fill)


def _leg(x: float, length: float) -> np.ndarray:
    bottom = _LEG_TOP + length
    half = _LEG_WIDTH / 2
    foot = (x + 0.11, bottom + 0.035)
    return np.array(
        [
            (x - half, _LEG_TOP),
            (x + half, _LEG_TOP),
            (x + half, bottom),
            (foot[0], bottom),
            foot,
            (x - half, foot[1]),
        ]
    )


def _creature_shapes(
    value: Callable[[str], str], color: Callable[[str], ColorRGB], rng: np.random.Generator
) -> tuple[list[Shape], dict[str, tuple[float, float]]]:
    """The creature's polygons, back to front, and the centre of every part.

    Args:
        value: the drawn value of an attribute group (``value("has_tail_shape") == "fan"``).
        color: the drawn colour of a colour group, with this image's brightness jitter.
        rng: this image's generator (spot positions).
    """
    shapes: list[Shape] = [
        ("tail", np.array(_TAILS[value("has_tail_shape")]), color("has_tail_color"))
    ]
    leg_length = _LEG_LENGTH[value("has_leg_length")]
    leg_color = color("has_leg_color")
    shapes += [("legs", _leg(x, leg_length), leg_color) for x in _LEG_X]

    body_color = color("has_body_color")
    shapes.append(("body", _ellipse(*_BODY), body_color))
    if value("has_body_pattern") == "striped":
        bands = [_ellipse_band(*_BODY, x - 0.035, x + 0.035) for x in (-0.34, -0.17, 0.0, 0.17)]
        shapes += [("pattern", band, _pattern_color(body_color)) for band in bands]
    elif value("has_body_pattern") == "spotted":
        spots = np.array(
            [(-0.32, 0.06), (-0.16, 0.16), (0.0, 0.07), (0.16, 0.17), (0.3, 0.05), (-0.02, 0.2)]
        )
        spots += rng.uniform(-0.025, 0.025, size=spots.shape)  # (6, 2)
        shapes += [
            ("pattern", _ellipse(x, y, 0.05, 0.05, n=12), _pattern_color(body_color))
            for x, y in spots
        ]

    wing_color = color("has_wing_color")
    shapes.append(("wing", _ellipse(*_WING), wing_color))
    if value("has_wing_pattern") == "barred":
        bands = [
            _ellipse_band(*_WING[:4], x - 0.035, x + 0.035, tilt=_WING[4])
            for x in (-0.15, -0.02, 0.11)
        ]
        shapes += [("pattern", band, _pattern_color(wing_color)) for band in bands]
    elif value("has_wing_pattern") == "tipped":
        tip = _ellipse_band(*_WING[:4], -_WING[2], -0.02, tilt=_WING[4])
        shapes.append(("pattern", tip, _pattern_color(wing_color)))

    head_color = color("has_head_color")
    head_x, head_y, head_radius = _HEAD
    if value("has_head_pattern") == "crested":
        shapes.append(("crown", np.array(_CREST), _shade(head_color, 0.8)))
    shapes.append(("head", _ellipse(head_x, head_y, head_radius, head_radius), head_color))
    if value("has_head_pattern") == "capped":
        # The band is taken along the head's vertical axis (tilt 90 degrees): its upper part.
        cap = _ellipse_band(
            head_x, head_y, head_radius, head_radius, -head_radius, -0.05, tilt=math.pi / 2
        )
        cap_color = PALETTE["white"] if sum(head_color) < 200 else PALETTE["black"]
        shapes.append(("crown", cap, cap_color))
    bill_shape = value("has_bill_shape")
    shapes.append(("beak", np.array(_BEAKS[bill_shape]), color("has_bill_color")))
    eye_x, eye_y, eye_radius = _EYE
    eye_color = PALETTE[value("has_eye_color")]  # no jitter: the eye is a few pixels only
    shapes.append(("eye", _ellipse(eye_x, eye_y, eye_radius, eye_radius, n=16), eye_color))

    centres = {
        "body": (_BODY[0], _BODY[1]),
        # The cheek: on the head but clear of the eye and the cap, so its pixel shows the colour.
        "head": (head_x - 0.02, head_y + 0.06),
        "crown": _CROWN,
        "eye": (eye_x, eye_y),
        "beak": _BEAK_CENTRES[bill_shape],
        "wing": (_WING[0], _WING[1]),
        "tail": _TAIL_CENTRE,
        "legs": (sum(_LEG_X) / 2, _LEG_TOP + 0.6 * leg_length),
    }
    return shapes, centres


def _place(
    shapes: list[Shape], canvas_size: int, rng: np.random.Generator
) -> tuple[_Pose, np.ndarray]:
    """A random pose keeping the creature mostly inside the image (a little may be cut off).

    Returns:
        The pose and the creature's polygon points on the canvas, ``(n, 2)``.
    """
    scale = float(rng.uniform(0.40, 0.50)) * canvas_size
    angle = math.radians(float(rng.uniform(-25.0, 25.0)))
    flip = float(rng.choice([-1.0, 1.0]))
    centred = _Pose(scale, angle, flip, 0.0, 0.0)
    points = centred.apply(np.concatenate([polygon for _, polygon, _ in shapes]))  # (n, 2)
    low, high = points.min(axis=0), points.max(axis=0)
    overhang = 0.05 * canvas_size
    shift = []
    for axis in range(2):
        lowest, highest = -low[axis] - overhang, canvas_size - high[axis] + overhang
        shift.append(
            float(rng.uniform(lowest, highest)) if highest > lowest else (lowest + highest) / 2
        )
    return _Pose(scale, angle, flip, shift[0], shift[1]), points + np.array(shift)


def _render_creature(
    design: _ClassDesign,
    rng: np.random.Generator,
    *,
    image_size_px: int,
    style: _BackgroundStyle,
) -> tuple[Image.Image, _ImageRecord]:
    """Draw one image of a class; returns it with its box, part locations and drawn values."""
    factor = _supersampling(image_size_px)
    canvas_size = image_size_px * factor
    # Part-level attribute noise: each group's value is drawn from the class's distribution.
    values = np.array([rng.choice(len(p), p=p) for p in design.probabilities], dtype=np.int64)

    def value(group: str) -> str:
        return ATTRIBUTE_GROUPS[group][int(values[_GROUP_INDEX[group]])]

    def color(group: str) -> ColorRGB:
        return _shade(PALETTE[value(group)], float(rng.normal(1.0, 0.05)))

    image = _draw_background(canvas_size, style, rng)
    draw = ImageDraw.Draw(image)
    shapes, centres = _creature_shapes(value, color, rng)
    pose, creature_points = _place(shapes, canvas_size, rng)
    outline_width = max(1, round(0.014 * pose.scale))

    if rng.random() < 0.5:  # a perch under the feet
        perch_y = _LEG_TOP + _LEG_LENGTH[value("has_leg_length")] + 0.05
        perch = pose.apply(np.array([(-1.1, perch_y), (1.1, perch_y)]))  # (2, 2)
        perch_color = _shade(PALETTE["brown"], float(rng.uniform(0.6, 1.3)))
        draw.line(perch.ravel().tolist(), fill=perch_color, width=max(1, int(0.06 * pose.scale)))
    for part, polygon, fill in shapes:
        outline = None if part == "pattern" else _shade(fill, 0.55)
        width = outline_width
        if part == "eye":
            # A contrasting ring keeps the eye visible on a head of its own colour.
            outline = (20, 20, 20) if _luminance(fill) > 100 else (235, 235, 235)
            width = max(1, round(0.025 * pose.scale))
        draw.polygon(pose.apply(polygon).ravel().tolist(), fill=fill, outline=outline, width=width)

    part_points = pose.apply(np.array([centres[part] for part in PARTS]))  # (n_parts, 2)
    visible = np.ones(len(PARTS), dtype=bool)
    if rng.random() < 0.1:  # a leaf in front of one part
        hidden = str(rng.choice(list(_PART_RADIUS)))
        radius = _PART_RADIUS[hidden] * float(rng.uniform(1.15, 1.4)) * pose.scale
        centre = part_points[_PART_INDEX[hidden]] + rng.normal(0.0, 0.03 * pose.scale, size=2)
        leaf_color = _shade(style.clutter_colors[int(rng.integers(len(style.clutter_colors)))], 0.9)
        leaf_angle = float(rng.uniform(0, math.pi))
        leaf = _ellipse(centre[0], centre[1], radius * 1.25, radius, leaf_angle)
        draw.polygon(
            leaf.ravel().tolist(),
            fill=leaf_color,
            outline=_shade(leaf_color, 0.6),
            width=outline_width,
        )
        # A part is hidden when its centre lies under the leaf or within 1.5 px of its edge.
        margin = 1.5 * factor
        along = (part_points - centre) @ np.array([math.cos(leaf_angle), math.sin(leaf_angle)])
        across = (part_points - centre) @ np.array([-math.sin(leaf_angle), math.cos(leaf_angle)])
        inside = (along / (1.25 * radius + margin)) ** 2 + (across / (radius + margin)) ** 2 < 1
        visible &= ~inside

    # Average down, then global illumination and sensor noise.
    pixels = np.asarray(image.reduce(factor), dtype=np.float64)  # (H, W, 3)
    pixels = pixels * float(rng.uniform(0.88, 1.12)) + rng.normal(0.0, 3.0, size=pixels.shape)
    array = np.clip(pixels.round(), 0, 255).astype(np.uint8)

    part_pixels = part_points / factor
    visible &= (part_pixels >= 0).all(axis=1) & (part_pixels < image_size_px).all(axis=1)
    parts = np.zeros((len(PARTS), 3))
    parts[visible, :2] = part_pixels[visible].round(1)  # CUB writes 0 0 for hidden parts
    parts[:, 2] = visible
    (x0, y0), (x1, y1) = np.clip(
        [creature_points.min(axis=0) / factor, creature_points.max(axis=0) / factor],
        0,
        image_size_px,
    )
    box = (
        round(float(x0), 1),
        round(float(y0), 1),
        round(float(x1 - x0), 1),
        round(float(y1 - y0), 1),
    )
    flat = array.reshape(-1, 3).astype(np.int64)  # (H*W, 3)
    record = _ImageRecord(box, parts, values, flat.sum(axis=0), (flat * flat).sum(axis=0))
    return Image.fromarray(array, mode="RGB"), record


@dataclass(frozen=True)
class _RenderJob:
    """The images one worker renders (picklable: sent to worker processes)."""

    out_dir: str
    designs: tuple[_ClassDesign, ...]
    image_ids: tuple[int, ...]
    classes: tuple[int, ...]
    is_train: tuple[bool, ...]
    relative_paths: tuple[str, ...]
    image_size_px: int
    seed: int
    correlated_backgrounds: bool


def _render_job(job: _RenderJob) -> list[_ImageRecord]:
    records = []
    n_classes = len(job.designs)
    for image_id, class_index, is_train, relative in zip(
        job.image_ids, job.classes, job.is_train, job.relative_paths
    ):
        # One generator per image: the bytes do not depend on how images are spread over workers.
        rng = np.random.default_rng([job.seed, image_id])
        if job.correlated_backgrounds:
            # TravelingBirds: training images on their class's background, test images on the
            # background of another, random class.
            style_class = class_index
            if not is_train and n_classes > 1:
                style_class = (class_index + 1 + int(rng.integers(n_classes - 1))) % n_classes
            style = _class_style(job.seed, style_class)
        else:
            style = _random_style(rng)
        image, record = _render_creature(
            job.designs[class_index], rng, image_size_px=job.image_size_px, style=style
        )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=6)
        path = Path(job.out_dir) / "images" / relative
        path.write_bytes(buffer.getvalue())
        records.append(record)
    return records


# ----------------------------------------------------------------------------- writing


def _check_arguments(
    n_classes: int, n_images_per_class: int, image_size_px: int, train_fraction: float
) -> None:
    if not MIN_CLASSES <= n_classes <= MAX_CLASSES:
        raise ValueError(f"n_classes must be in [{MIN_CLASSES}, {MAX_CLASSES}], got {n_classes}")
    if n_images_per_class < 2:
        raise ValueError(f"n_images_per_class must be at least 2, got {n_images_per_class}")
    if not 32 <= image_size_px <= 1024:
        raise ValueError(f"image_size_px must be in [32, 1024], got {image_size_px}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")


def _format_float(value: float) -> str:
    return f"{value:.1f}"


def make_synthetic(
    out_dir: str | os.PathLike[str],
    *,
    n_classes: int = 50,
    n_images_per_class: int | None = None,
    image_size_px: int = 64,
    seed: int = 0,
    correlated_backgrounds: bool = False,
    train_fraction: float = DEFAULT_TRAIN_FRACTION,
    n_workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Generate the part-based data set in the CUB-200-2011 layout.

    Writes ``images/<NNN.Class_Name>/<file>.png``, ``images.txt``, ``classes.txt``,
    ``image_class_labels.txt``, ``train_test_split.txt``, ``bounding_boxes.txt``,
    ``parts/parts.txt``, ``parts/part_locs.txt``, ``attributes/attributes.txt``,
    ``attributes/image_attribute_labels.txt``, ``attributes/class_attribute_labels_continuous.txt``
    and ``openqpm_synthetic.json`` (parameters, families, one-attribute pairs, class attribute
    values, and the per-channel mean/std of the training split). The folder is built beside
    ``out_dir`` and moved into place when complete. The same arguments give the same bytes.

    Args:
        out_dir: the folder to create (the data set root).
        n_classes: number of classes, 4 to 400; families of about 5 classes.
        n_images_per_class: images per class; None uses :data:`DEFAULT_IMAGES_PER_CLASS`.
        image_size_px: side of the square images.
        seed: seeds the classes and every image.
        correlated_backgrounds: class-specific backgrounds in the training split only, random
            other classes' backgrounds in the test split (the TravelingBirds idea).
        train_fraction: share of each class's images in the training split (rounded).
        n_workers: rendering processes; None uses up to 8 of the available cores. The output does
            not depend on it.
        overwrite: replace an existing non-empty ``out_dir`` (otherwise that is an error).
        progress: called as ``progress(n_done, n_total)`` while images are rendered.

    Returns:
        ``out_dir`` as a Path, ready for ``create_dataset("synthetic", out_dir, split)``.

    Raises:
        ValueError: an argument out of range.
        FileExistsError: ``out_dir`` exists, is not empty, and ``overwrite`` is False.
    """
    n_per_class = (
        DEFAULT_IMAGES_PER_CLASS if n_images_per_class is None else int(n_images_per_class)
    )
    _check_arguments(n_classes, n_per_class, image_size_px, train_fraction)
    out_path = Path(out_dir).expanduser()
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{out_path} exists and is not empty; choose a new folder or pass overwrite=True"
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)

    designs = _design_classes(n_classes, np.random.default_rng([seed, 1_000_003]))
    n_train = min(n_per_class - 1, max(1, round(train_fraction * n_per_class)))
    image_ids, classes, is_train, relative_paths = [], [], [], []
    for class_index, design in enumerate(designs):
        split_rng = np.random.default_rng([seed, class_index, 2_000_003])
        train_members = set(split_rng.permutation(n_per_class)[:n_train].tolist())
        folder = f"{class_index + 1:03d}.{design.folder}"
        for member in range(n_per_class):
            image_id = class_index * n_per_class + member + 1
            image_ids.append(image_id)
            classes.append(class_index)
            is_train.append(member in train_members)
            relative_paths.append(f"{folder}/{design.folder}_{member + 1:04d}_{image_id}.png")

    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        for class_index, design in enumerate(designs):
            (staging / "images" / f"{class_index + 1:03d}.{design.folder}").mkdir(parents=True)
        records = _render_all(
            staging,
            designs,
            image_ids,
            classes,
            is_train,
            relative_paths,
            image_size_px=image_size_px,
            seed=seed,
            correlated_backgrounds=correlated_backgrounds,
            n_workers=n_workers,
            progress=progress,
        )
        _write_index_files(staging, designs, image_ids, classes, is_train, relative_paths, records)
        metadata = _metadata(
            designs,
            records,
            is_train,
            parameters={
                "n_classes": n_classes,
                "n_images_per_class": n_per_class,
                "image_size_px": image_size_px,
                "seed": seed,
                "correlated_backgrounds": correlated_backgrounds,
                "train_fraction": train_fraction,
            },
        )
        (staging / METADATA_FILE).write_text(
            json.dumps(metadata, indent=1) + "\n", encoding="utf-8"
        )
        _move_into_place(staging, out_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _logger.info("wrote %d images of %d classes to %s", len(image_ids), n_classes, out_path)
    return out_path


def _render_all(
    staging: Path,
    designs: list[_ClassDesign],
    image_ids: list[int],
    classes: list[int],
    is_train: list[bool],
    relative_paths: list[str],
    *,
    image_size_px: int,
    seed: int,
    correlated_backgrounds: bool,
    n_workers: int | None,
    progress: Callable[[int, int], None] | None,
) -> list[_ImageRecord]:
    n_images = len(image_ids)
    workers = min(8, os.cpu_count() or 1) if n_workers is None else max(1, int(n_workers))
    # Chunks small enough for a lively progress bar, large enough to amortise the messages.
    chunk = max(16, min(256, n_images // (4 * workers) or 16))
    jobs = [
        _RenderJob(
            str(staging),
            tuple(designs),
            tuple(image_ids[i : i + chunk]),
            tuple(classes[i : i + chunk]),
            tuple(is_train[i : i + chunk]),
            tuple(relative_paths[i : i + chunk]),
            image_size_px,
            seed,
            correlated_backgrounds,
        )
        for i in range(0, n_images, chunk)
    ]
    records: list[_ImageRecord] = []
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            records.extend(_render_job(job))
            if progress is not None:
                progress(len(records), n_images)
        return records
    # Fork on Linux: workers start at once and need no `if __name__ == "__main__"` guard in
    # the caller's script; they run numpy and Pillow drawing only, never the parent's thread
    # pools (torch, OpenMP), which is what makes forking a threaded process unsafe. Elsewhere
    # fork is unavailable or unsafe (macOS system frameworks), so spawn.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    context = multiprocessing.get_context(method)
    with context.Pool(processes=min(workers, len(jobs))) as pool:
        for job_records in pool.imap(_render_job, jobs):
            records.extend(job_records)
            if progress is not None:
                progress(len(records), n_images)
    return records


def _write_index_files(
    root: Path,
    designs: list[_ClassDesign],
    image_ids: list[int],
    classes: list[int],
    is_train: list[bool],
    relative_paths: list[str],
    records: list[_ImageRecord],
) -> None:
    def write(relative: str, lines: list[str]) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(lines), encoding="utf-8")

    write("images.txt", [f"{i} {p}\n" for i, p in zip(image_ids, relative_paths)])
    write("classes.txt", [f"{c + 1} {c + 1:03d}.{d.folder}\n" for c, d in enumerate(designs)])
    write("image_class_labels.txt", [f"{i} {c + 1}\n" for i, c in zip(image_ids, classes)])
    write("train_test_split.txt", [f"{i} {int(t)}\n" for i, t in zip(image_ids, is_train)])
    write(
        "bounding_boxes.txt",
        [f"{i} {' '.join(_format_float(v) for v in r.box)}\n" for i, r in zip(image_ids, records)],
    )
    write("parts/parts.txt", [f"{p + 1} {name}\n" for p, name in enumerate(PARTS)])
    write(
        "parts/part_locs.txt",
        [
            f"{i} {p + 1} {_format_float(r.parts[p, 0])} {_format_float(r.parts[p, 1])} "
            f"{int(r.parts[p, 2])}\n"
            for i, r in zip(image_ids, records)
            for p in range(len(PARTS))
        ],
    )
    names = attribute_names()
    write("attributes/attributes.txt", [f"{a + 1} {name}\n" for a, name in enumerate(names)])
    # CUB's format: image attribute is_present certainty time; certainty 4 = "definitely",
    # 1 = "not visible" (the part carrying the attribute is hidden or outside the image).
    lines = []
    for image_id, record in zip(image_ids, records):
        attribute = 0
        for group, group_values in ATTRIBUTE_GROUPS.items():
            part_visible = record.parts[_PART_INDEX[_GROUP_PART[group]], 2] > 0
            drawn = int(record.values[_GROUP_INDEX[group]])
            for v in range(len(group_values)):
                attribute += 1
                if part_visible:
                    lines.append(f"{image_id} {attribute} {int(v == drawn)} 4 0.0\n")
                else:
                    lines.append(f"{image_id} {attribute} 0 1 0.0\n")
    write("attributes/image_attribute_labels.txt", lines)
    write(
        "attributes/class_attribute_labels_continuous.txt",
        [
            " ".join(f"{100.0 * p:.1f}" for distribution in d.probabilities for p in distribution)
            + "\n"
            for d in designs
        ],
    )


def _metadata(
    designs: list[_ClassDesign],
    records: list[_ImageRecord],
    is_train: list[bool],
    *,
    parameters: dict[str, Any],
) -> dict[str, Any]:
    train_records = [r for r, t in zip(records, is_train) if t]
    n_pixels = len(train_records) * parameters["image_size_px"] ** 2
    total = np.sum([r.channel_sum for r in train_records], axis=0)
    squares = np.sum([r.channel_square_sum for r in train_records], axis=0)
    mean = total / (n_pixels * 255.0)
    std = np.sqrt(np.maximum(squares / (n_pixels * 255.0**2) - mean**2, 0.0))
    families: dict[int, list[int]] = {}
    for index, design in enumerate(designs):
        families.setdefault(design.family, []).append(index)
    pairs = []
    for first in range(len(designs)):
        for second in range(first + 1, len(designs)):
            differing = [
                g
                for g in range(len(_GROUPS))
                if designs[first].values[g] != designs[second].values[g]
            ]
            if len(differing) == 1:
                pairs.append([first, second, _GROUPS[differing[0]]])
    return {
        "generator": "openqpm.data.synthetic",
        "format_version": _FORMAT_VERSION,
        "parameters": parameters,
        "mean": [round(float(m), 6) for m in mean],
        "std": [round(float(s), 6) for s in std],
        "n_images": len(records),
        "n_train": len(train_records),
        "families": [families[f] for f in sorted(families)],
        "one_attribute_pairs": pairs,
        "classes": [
            {
                "name": d.name,
                "family": d.family,
                "attributes": {
                    group: ATTRIBUTE_GROUPS[group][d.values[g]] for g, group in enumerate(_GROUPS)
                },
            }
            for d in designs
        ],
        "parts": list(PARTS),
    }


def _move_into_place(staging: Path, out_path: Path) -> None:
    if out_path.exists():
        if out_path.is_dir() and not any(out_path.iterdir()):
            out_path.rmdir()
        else:  # overwrite: swap the complete new folder in, then drop the old one
            old = out_path.with_name(f".{out_path.name}.old-{os.getpid()}")
            os.replace(out_path, old)
            os.replace(staging, out_path)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
            return
    os.replace(staging, out_path)


def read_synthetic_metadata(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``openqpm_synthetic.json`` of a generated folder.

    Raises:
        ValueError: the file is missing or malformed (the message names it).
    """
    path = Path(root).expanduser() / METADATA_FILE
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ValueError(
            f"{path}: missing file (not a folder written by make_synthetic)"
        ) from error
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read ({error})") from error
    for key in ("mean", "std"):
        value = metadata.get(key) if isinstance(metadata, dict) else None
        if not (
            isinstance(value, list)
            and len(value) == 3
            and all(isinstance(v, (int, float)) for v in value)
        ):
            raise ValueError(f"{path}: field {key!r} must be a list of 3 numbers, got {value!r}")
    return metadata


# ----------------------------------------------------------------------------- preview


def render_preview(
    root: str | os.PathLike[str],
    out_png: str | os.PathLike[str],
    *,
    n_classes: int = 10,
    n_per_class: int = 8,
    tile_px: int = 96,
) -> Path:
    """Write a grid of training examples: one row per class, its name on the left.

    The first ``n_classes`` classes are shown, i.e. whole families side by side, so that the
    parts telling related classes apart can be checked by eye.

    Args:
        root: a folder in the CUB-200-2011 layout (e.g. written by :func:`make_synthetic`).
        out_png: the PNG to write (atomically).
        n_classes: rows (classes) to show, from the first class.
        n_per_class: examples per row.
        tile_px: side of each example in the grid (images are scaled without smoothing).

    Returns:
        ``out_png`` as a Path.

    Raises:
        ValueError: ``root`` is not a CUB-layout folder, or a count is below 1.
    """
    if n_classes < 1 or n_per_class < 1:
        raise ValueError(
            f"n_classes and n_per_class must be at least 1, got {n_classes}, {n_per_class}"
        )
    folder = Path(root).expanduser()
    tables = {}
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"):
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path}: missing file (expected a CUB-200-2011 layout folder)")
        tables[name] = [
            line.split(None, 1)
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    paths = {int(i): p.strip() for i, p in tables["images.txt"]}
    labels = {int(i): int(c) for i, c in tables["image_class_labels.txt"]}
    train = {int(i): t.strip() == "1" for i, t in tables["train_test_split.txt"]}
    class_names = {
        int(c): n.strip().partition(".")[2].replace("_", " ") for c, n in tables["classes.txt"]
    }
    shown_classes = sorted(class_names)[:n_classes]
    font = ImageFont.load_default(size=15)
    labels_text = {c: f"{c}. {class_names[c]}" for c in shown_classes}
    label_width = 12 + int(max(font.getlength(text) for text in labels_text.values()))
    grid = Image.new(
        "RGB",
        (label_width + n_per_class * (tile_px + 4), len(shown_classes) * (tile_px + 4) + 4),
        "white",
    )
    draw = ImageDraw.Draw(grid)
    for row, class_id in enumerate(shown_classes):
        y = 4 + row * (tile_px + 4)
        draw.text((6, y + tile_px // 2 - 9), labels_text[class_id], fill="black", font=font)
        members = [i for i in sorted(paths) if labels.get(i) == class_id and train.get(i, False)]
        for column, image_id in enumerate(members[:n_per_class]):
            with Image.open(folder / "images" / paths[image_id]) as image:
                tile = image.convert("RGB").resize((tile_px, tile_px), Image.Resampling.NEAREST)
            grid.paste(tile, (label_width + column * (tile_px + 4), y))
    out_path = Path(out_png).expanduser()
    with atomic_path(out_path, suffix=".png") as temporary:
        grid.save(temporary, format="PNG")
    return out_path
