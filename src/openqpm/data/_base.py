"""The data set object shared by every loader, image reading, and index-file parsing helpers.

Every loader returns an :class:`ImageDataset`: a ``torch.utils.data.Dataset`` of
``(image, label)`` with the attributes of the contract in ``docs/internals.md``
(``class_names``, ``labels``, ``load_image``, ``class_attributes``, ``part_locations``, ...).
Loaders differ only in how they find the image files and annotations on disk.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

_logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN_STD",
    "SPLITS",
    "DatasetError",
    "FolderReport",
    "ImageDataset",
    "MeanStd",
    "clip_box",
    "normalise_split",
    "open_rgb",
]

MeanStd = tuple[tuple[float, float, float], tuple[float, float, float]]

# torchvision's ImageNet statistics: the fallback for folders whose own statistics are unknown.
IMAGENET_MEAN_STD: MeanStd = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

SPLITS = ("train", "test")
# Names the data sets themselves use for the two splits; "val" is ImageNet's test split and
# "trainval" FGVC-Aircraft's training split in the paper's protocol.
_SPLIT_ALIASES = {
    "train": "train",
    "trainval": "train",
    "test": "test",
    "val": "test",
    "validation": "test",
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class FolderReport:
    """What a layout's validator found: index-level problems and the images left to verify.

    Attributes:
        problems: problems found in the index files, each naming the file and id or line.
        image_paths: every image file the data set uses (both splits).
        boxes: ``(len(image_paths), 4)`` boxes ``x, y, w, h`` in pixels, or None.
    """

    problems: list[str] = field(default_factory=list)
    image_paths: list[Path] = field(default_factory=list)
    boxes: np.ndarray | None = None


class DatasetError(ValueError):
    """A data set folder is missing files, or holds inconsistent, malformed or unreadable data.

    The message names the file (and line or id) at fault and what was expected.
    """


def normalise_split(split: str) -> str:
    """Map a split name to ``"train"`` or ``"test"``.

    Args:
        split: ``train`` or ``test``; the aliases ``trainval`` (train) and ``val``/``validation``
            (test) are accepted too.

    Returns:
        ``"train"`` or ``"test"``.

    Raises:
        DatasetError: the name is none of these.
    """
    key = str(split).strip().lower()
    if key not in _SPLIT_ALIASES:
        raise DatasetError(
            f"unknown split {split!r}; valid: {', '.join(SPLITS)} "
            f"(aliases: trainval = train, val = validation = test)"
        )
    return _SPLIT_ALIASES[key]


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composed over white."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16/32-bit greyscale: PIL's convert("RGB") clips at 255, which whitens most images.
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") else 255.0 / max(values.max(), 1.0)
        grey = np.clip(values * scale, 0.0, 255.0).round().astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file, decode it fully and return it in RGB.

    Greyscale, palette, CMYK, 16-bit and images with an alpha channel (composed over white) are
    converted.

    Args:
        path: the image file.

    Returns:
        The decoded RGB image.

    Raises:
        DatasetError: the file is missing, truncated, corrupt or not an image; the message names it.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)
    except FileNotFoundError as error:
        raise DatasetError(f"{path}: image file not found") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{path}: cannot read image ({error})") from error


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Width and height of an image file, from its header only (no decoding).

    Raises:
        DatasetError: the file is missing or not an image.
    """
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError as error:
        raise DatasetError(f"{path}: image file not found") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"{path}: cannot read image ({error})") from error


def clip_box(
    box_xywh: Sequence[float], width: int, height: int
) -> tuple[int, int, int, int] | None:
    """Turn an ``(x, y, w, h)`` pixel box into an integer ``(left, top, right, bottom)`` crop.

    The box is widened to whole pixels (floor of the top-left corner, ceiling of the
    bottom-right one) and clipped to the image: this is the documented fix-up for boxes that
    stick out of the image.

    Args:
        box_xywh: x, y of the top-left corner, width and height, in pixels.
        width: image width in pixels.
        height: image height in pixels.

    Returns:
        The crop box, or None when nothing of the box lies inside the image.
    """
    x, y, w, h = (float(value) for value in box_xywh)
    if not all(math.isfinite(value) for value in (x, y, w, h)):
        return None
    left = max(0, math.floor(x))
    top = max(0, math.floor(y))
    right = min(width, math.ceil(x + w))
    bottom = min(height, math.ceil(y + h))
    if right <= left or bottom <= top:
        return None
    return left, top, right, bottom


class ImageDataset(Dataset[tuple[Any, int]]):
    """A list of image files with labels and optional annotations: the object every loader returns.

    Indexing returns ``(transform(load_image(i)), label)``. Annotations that are expensive to
    read (image attributes, part locations) are read on first access and then kept.

    Args:
        image_paths: one file per image.
        labels: class index of each image, in ``[0, len(class_names))``.
        class_names: readable class names.
        mean_std: per-channel mean and std used to normalise this data set.
        transform: applied to the PIL image in ``__getitem__``; None returns the PIL image.
        boxes: optional ``(N, 4)`` ground-truth boxes ``x, y, w, h`` in pixels of the file.
        crop: crop each image to its box in :meth:`load_image` (ignored when ``boxes`` is None).
        class_attributes: optional ``(n_classes, n_attributes)`` values in ``[0, 1]``.
        attribute_names: names of the attribute columns.
        part_names: names of the annotated parts.
        name: the registry name of the data set (``"cub"``, ...).
        split: ``"train"`` or ``"test"``.
        root: the folder the data set was read from.

    Raises:
        DatasetError: the annotations do not agree in length or range.
    """

    def __init__(
        self,
        image_paths: Sequence[Path],
        labels: np.ndarray,
        class_names: Sequence[str],
        *,
        mean_std: MeanStd,
        transform: Callable[[Image.Image], Any] | None = None,
        boxes: np.ndarray | None = None,
        crop: bool = False,
        class_attributes: np.ndarray | None = None,
        attribute_names: Sequence[str] | None = None,
        part_names: Sequence[str] | None = None,
        name: str = "",
        split: str = "",
        root: Path | None = None,
    ) -> None:
        self.image_paths = [Path(path) for path in image_paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.n_classes = len(self.class_names)
        self.mean_std = mean_std
        self.transform = transform
        self.boxes = None if boxes is None else np.asarray(boxes, dtype=np.float64)
        self.crop = bool(crop and boxes is not None)
        self.class_attributes = class_attributes
        self.attribute_names = None if attribute_names is None else list(attribute_names)
        self.part_names = None if part_names is None else list(part_names)
        self.name = name
        self.split = split
        self.root = root
        self._image_attributes_cache: np.ndarray | None = None
        self._part_locations_cache: np.ndarray | None = None
        where = f"{name or 'data set'} {root or ''}".strip()
        if self.labels.shape != (len(self.image_paths),):
            raise DatasetError(
                f"{where}: {len(self.image_paths)} images but labels of shape {self.labels.shape}"
            )
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.n_classes):
            raise DatasetError(
                f"{where}: labels must lie in [0, {self.n_classes}); found "
                f"{int(self.labels.min())}..{int(self.labels.max())}"
            )
        if self.boxes is not None and self.boxes.shape != (len(self.image_paths), 4):
            raise DatasetError(f"{where}: boxes of shape {self.boxes.shape}, expected (N, 4)")
        if class_attributes is not None:
            if class_attributes.shape[0] != self.n_classes:
                raise DatasetError(
                    f"{where}: class attributes for {class_attributes.shape[0]} classes, "
                    f"expected {self.n_classes}"
                )
            if attribute_names is not None and class_attributes.shape[1] != len(attribute_names):
                raise DatasetError(
                    f"{where}: {class_attributes.shape[1]} class attribute columns but "
                    f"{len(attribute_names)} attribute names"
                )

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image: Any = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
            f"n_images={len(self)}, n_classes={self.n_classes}, crop={self.crop}, root={self.root})"
        )

    def crop_box(
        self, index: int, *, size: tuple[int, int] | None = None
    ) -> tuple[int, int, int, int] | None:
        """The integer ``(left, top, right, bottom)`` crop applied to image ``index``, or None.

        Args:
            index: image index.
            size: the image's (width, height) if already known; read from the header otherwise.

        Raises:
            DatasetError: the box lies entirely outside the image.
        """
        if not self.crop or self.boxes is None:
            return None
        width, height = size if size is not None else image_size(self.image_paths[index])
        box = clip_box(self.boxes[index], width, height)
        if box is None:
            raise DatasetError(
                f"{self.image_paths[index]}: bounding box (x, y, w, h) = "
                f"{tuple(float(v) for v in self.boxes[index])} lies outside the "
                f"{width}x{height} image"
            )
        return box

    def load_image(self, index: int) -> Image.Image:
        """Image ``index`` in RGB, cropped to its ground-truth box when cropping is on.

        Raises:
            DatasetError: the file cannot be read, or its box lies outside it.
        """
        image = open_rgb(self.image_paths[index])
        box = self.crop_box(index, size=image.size)
        return image if box is None else image.crop(box)

    def indices_of_class(self, class_index: int) -> np.ndarray:
        """Indices of the images labelled ``class_index``."""
        return np.flatnonzero(self.labels == class_index)

    # ----------------------------------------------------------------- lazily read annotations

    @property
    def image_attributes(self) -> np.ndarray | None:
        """``(N, n_attributes)`` int8: 1 present, 0 absent, -1 not confident; None if unknown."""
        if self._image_attributes_cache is None:
            self._image_attributes_cache = self._read_image_attributes()
        return self._image_attributes_cache

    @property
    def part_locations(self) -> np.ndarray | None:
        """``(N, n_parts, 3)`` float32: x, y in [0, 1] of :meth:`load_image`, visibility 0/1.

        A part that falls outside the (cropped) image is marked not visible and its coordinates
        are clipped into [0, 1].
        """
        if self._part_locations_cache is None:
            pixels = self._read_part_pixel_locations()
            if pixels is not None:
                self._part_locations_cache = self._relative_part_locations(pixels)
        return self._part_locations_cache

    def _read_image_attributes(self) -> np.ndarray | None:
        """Read the per-image attribute labels; None when the data set has none."""
        return None

    def _read_part_pixel_locations(self) -> np.ndarray | None:
        """``(N, n_parts, 3)`` part x, y in pixels of the image file and visibility; or None."""
        return None

    def _relative_part_locations(self, pixels: np.ndarray) -> np.ndarray:
        locations = np.zeros(pixels.shape, dtype=np.float32)
        for index in range(len(self)):
            width, height = image_size(self.image_paths[index])
            box = self.crop_box(index, size=(width, height))
            left, top, right, bottom = box if box is not None else (0, 0, width, height)
            x = (pixels[index, :, 0] - left) / (right - left)  # (n_parts,)
            y = (pixels[index, :, 1] - top) / (bottom - top)
            inside = (x >= 0) & (x <= 1) & (y >= 0) & (y <= 1)
            locations[index, :, 0] = np.clip(x, 0.0, 1.0)
            locations[index, :, 1] = np.clip(y, 0.0, 1.0)
            locations[index, :, 2] = (pixels[index, :, 2] > 0) & inside
        return locations


# --------------------------------------------------------------------------- index files


def read_table(
    path: Path,
    *,
    n_fields: int,
    problems: list[str],
    last_field_rest: bool = False,
    required: bool = True,
) -> list[tuple[int, list[str]]] | None:
    """Read a whitespace-separated text table, one record a line.

    Args:
        path: the file.
        n_fields: fields expected on each line; lines with another count are reported.
        problems: reported problems are appended here (file and line named).
        last_field_rest: the last field takes the rest of the line (names with spaces).
        required: report a missing file as a problem (otherwise return None silently).

    Returns:
        ``(line_number, fields)`` for each well-formed non-empty line, or None when the file is
        missing or unreadable.
    """
    if not path.is_file():
        if required:
            problems.append(f"{path}: missing file")
        return None
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as error:
        problems.append(f"{path}: cannot read ({error})")
        return None
    rows: list[tuple[int, list[str]]] = []
    n_bad = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(None, n_fields - 1) if last_field_rest else line.split()
        if last_field_rest and fields:
            fields[-1] = fields[-1].strip()
        if len(fields) != n_fields:
            n_bad += 1
            if n_bad <= 5:
                problems.append(
                    f"{path}:{line_number}: expected {n_fields} fields, got {len(fields)}: "
                    f"{line.strip()[:80]!r}"
                )
            continue
        rows.append((line_number, fields))
    if n_bad > 5:
        problems.append(f"{path}: {n_bad - 5} more malformed lines")
    return rows


def parse_id_table(
    path: Path,
    rows: Iterable[tuple[int, list[str]]],
    problems: list[str],
) -> dict[int, list[str]]:
    """Index table rows by their first field, an integer id; bad and duplicate ids are reported.

    Returns:
        ``id -> remaining fields`` for each row with a valid, first-seen id.
    """
    table: dict[int, list[str]] = {}
    for line_number, fields in rows:
        try:
            identifier = int(fields[0])
        except ValueError:
            problems.append(f"{path}:{line_number}: id {fields[0]!r} is not an integer")
            continue
        if identifier in table:
            problems.append(f"{path}:{line_number}: duplicate id {identifier}")
            continue
        table[identifier] = fields[1:]
    return table


def compare_ids(
    reference_ids: Iterable[int],
    reference_path: Path,
    other_ids: Iterable[int],
    other_path: Path,
    problems: list[str],
) -> None:
    """Report ids present in one index file and not in the other (a few named, then a count)."""
    reference = set(reference_ids)
    other = set(other_ids)
    for missing, present_in, absent_from in (
        (sorted(reference - other), reference_path, other_path),
        (sorted(other - reference), other_path, reference_path),
    ):
        if missing:
            shown = ", ".join(str(i) for i in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            problems.append(
                f"{absent_from}: ids {shown}{more} are in {present_in.name} but not here"
            )


def raise_problems(problems: Sequence[str], *, what: str) -> None:
    """Raise one DatasetError listing the problems (at most 20 shown), if there are any."""
    if not problems:
        return
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise DatasetError(f"{what} is not usable:\n  {shown}{more}")


def readable_class_name(folder_name: str) -> str:
    """``"001.Black_footed_Albatross"`` -> ``"Black footed Albatross"``."""
    head, dot, rest = folder_name.partition(".")
    name = rest if dot and head.isdigit() else folder_name
    return name.replace("_", " ").strip()


def verify_images(
    image_paths: Sequence[Path],
    problems: list[str],
    *,
    boxes: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Decode every image and check its box; each unreadable file or empty box is reported.

    Boxes that stick out of their image are not problems (they are clipped when cropping); a
    box with nothing inside the image is.

    Args:
        image_paths: the files to decode.
        problems: reported problems are appended here, each naming the file.
        boxes: optional ``(N, 4)`` boxes ``x, y, w, h`` in pixels, one per path.
        progress: called as ``progress(n_done, n_total)``.
    """
    n_clipped = 0
    for index, path in enumerate(image_paths):
        try:
            image = open_rgb(path)
        except DatasetError as error:
            problems.append(str(error))
            continue
        finally:
            if progress is not None and (index + 1) % 100 == 0:
                progress(index + 1, len(image_paths))
        if boxes is None:
            continue
        width, height = image.size
        box = clip_box(boxes[index], width, height)
        if box is None:
            problems.append(
                f"{path}: bounding box (x, y, w, h) = {tuple(float(v) for v in boxes[index])} "
                f"lies outside the {width}x{height} image"
            )
        else:
            x, y, w, h = (float(v) for v in boxes[index])
            n_clipped += x < 0 or y < 0 or x + w > width or y + h > height
    if progress is not None:
        progress(len(image_paths), len(image_paths))
    if n_clipped:
        _logger.info("%d bounding boxes extend beyond their image; they are clipped", n_clipped)


def report_empty_classes(
    labels: np.ndarray, class_names: Sequence[str], where: str, problems: list[str]
) -> None:
    """Report every class without a single image in ``labels`` (the split named by ``where``)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    for class_index in np.flatnonzero(counts == 0).tolist():
        problems.append(
            f"{where}: class {class_index + 1} ({class_names[class_index]!r}) has no images"
        )
