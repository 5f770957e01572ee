"""FGVC-Aircraft 2013b at the variant level (100 classes), trainval for training, test for test.

Expected layout (the official archive; ``root`` may be ``fgvc-aircraft-2013b``, its ``data``
folder, or the folder holding ``fgvc-aircraft-2013b``)::

    fgvc-aircraft-2013b/data/
      variants.txt                     one variant name per line (the class order)
      images_variant_trainval.txt      <image id> <variant name>
      images_variant_test.txt          <image id> <variant name>
      images_box.txt                   <image id> <xmin> <ymin> <xmax> <ymax> (1-based pixels)
      images/<image id>.jpg

The images keep their 20-pixel copyright banner at the bottom, as torchvision's loader does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from openqpm.data._base import (
    FolderReport,
    ImageDataset,
    raise_problems,
    read_table,
    report_empty_classes,
)
from openqpm.data._registry import register_dataset
from openqpm.data.transforms import DATASET_STATS

_logger = logging.getLogger(__name__)

__all__ = ["find_aircraft_folder", "load_aircraft"]

_SPLIT_FILES = {"train": "images_variant_trainval.txt", "test": "images_variant_test.txt"}


def find_aircraft_folder(root: Path) -> Path | None:
    """The ``data`` folder holding ``variants.txt``, at or below ``root``; or None."""
    for candidate in (
        root,
        root / "data",
        root / "fgvc-aircraft-2013b" / "data",
        root / "fgvc-aircraft-2013b",
    ):
        if (candidate / "variants.txt").is_file():
            return candidate
    return None


def _read_variants(folder: Path, problems: list[str]) -> list[str] | None:
    path = folder / "variants.txt"
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        problems.append(f"{path}: no variants")
        return None
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        problems.append(f"{path}: duplicate variants {duplicates[:10]}")
    return names


def _read_boxes(folder: Path, problems: list[str]) -> dict[str, list[float]] | None:
    path = folder / "images_box.txt"
    rows = read_table(path, n_fields=5, problems=problems, required=False)
    if rows is None:
        return None
    boxes: dict[str, list[float]] = {}
    for line_number, (image_id, *corners) in rows:
        try:
            x_min, y_min, x_max, y_max = (float(value) for value in corners)
        except ValueError:
            problems.append(f"{path}:{line_number}: non-numeric box {corners}")
            continue
        if x_max < x_min or y_max < y_min:
            problems.append(f"{path}:{line_number}: box {corners} has max < min")
            continue
        # 1-based inclusive corners -> 0-based x, y, w, h
        boxes[image_id] = [x_min - 1.0, y_min - 1.0, x_max - x_min + 1.0, y_max - y_min + 1.0]
    return boxes


def _read_split(
    folder: Path, split: str, class_index: dict[str, int], problems: list[str]
) -> tuple[list[str], list[int]]:
    path = folder / _SPLIT_FILES[split]
    rows = read_table(path, n_fields=2, problems=problems, last_field_rest=True)
    image_ids: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for line_number, (image_id, variant) in rows or []:
        if variant not in class_index:
            problems.append(f"{path}:{line_number}: variant {variant!r} is not in variants.txt")
            continue
        if image_id in seen:
            problems.append(f"{path}:{line_number}: duplicate image id {image_id}")
            continue
        seen.add(image_id)
        image_ids.append(image_id)
        labels.append(class_index[variant])
    return image_ids, labels


def _read(
    root: Path, split: str, problems: list[str], *, need_boxes: bool
) -> tuple[Path, list[str], list[str], list[int], np.ndarray | None] | None:
    folder = find_aircraft_folder(root)
    if folder is None:
        problems.append(
            f"{root}: no fgvc-aircraft-2013b/data/variants.txt here (expected the FGVC-Aircraft "
            "layout; see the README)"
        )
        return None
    class_names = _read_variants(folder, problems)
    if class_names is None:
        return None
    image_ids, labels = _read_split(
        folder, split, {name: i for i, name in enumerate(class_names)}, problems
    )
    boxes_by_id = _read_boxes(folder, problems)
    boxes = None
    if boxes_by_id is None:
        if need_boxes:
            problems.append(f"{folder / 'images_box.txt'}: missing file (needed for the crop)")
    else:
        missing = [image_id for image_id in image_ids if image_id not in boxes_by_id]
        if missing:
            problems.append(
                f"{folder / 'images_box.txt'}: no box for images {missing[:10]}"
                + (f" ({len(missing)} in all)" if len(missing) > 10 else "")
            )
        else:
            boxes = np.array([boxes_by_id[i] for i in image_ids], dtype=np.float64).reshape(-1, 4)
    return folder, class_names, image_ids, labels, boxes


@register_dataset(
    "aircraft",
    detect=lambda root: find_aircraft_folder(root) is not None,
    validate=lambda root: validate_aircraft(root),
    description="FGVC-Aircraft 2013b: fgvc-aircraft-2013b/data/{variants.txt, images/, ...}",
    priority=50,
)
def load_aircraft(
    root: Path,
    split: str,
    *,
    transform: Callable[[Image.Image], Any] | None = None,
    crop: bool = True,
) -> ImageDataset:
    """Load one split of FGVC-Aircraft (variant level; ``train`` is the trainval list).

    Args:
        root: ``fgvc-aircraft-2013b``, its ``data`` folder, or the folder holding it.
        split: ``"train"`` (trainval) or ``"test"``.
        transform: applied to each PIL image.
        crop: crop to the aircraft's box from ``images_box.txt`` (``configs/aircraft_resnet50.yaml``
            does not).

    Raises:
        DatasetError: missing or inconsistent files (all named).
    """
    problems: list[str] = []
    read = _read(root, split, problems, need_boxes=crop)
    if read is not None:
        folder, _, image_ids, _, _ = read
        missing = [i for i in image_ids if not (folder / "images" / f"{i}.jpg").is_file()]
        if missing:
            problems.append(
                f"{folder / 'images'}: {len(missing)} images missing, e.g. {missing[:5]}"
            )
    raise_problems(problems, what=f"{root} (FGVC-Aircraft)")
    assert read is not None
    folder, class_names, image_ids, labels, boxes = read
    return ImageDataset(
        [folder / "images" / f"{image_id}.jpg" for image_id in image_ids],
        np.array(labels, dtype=np.int64),
        class_names,
        mean_std=DATASET_STATS["aircraft"],
        transform=transform,
        boxes=boxes,
        crop=crop,
        name="aircraft",
        split=split,
        root=root,
    )


def validate_aircraft(root: Path) -> FolderReport:
    """Problems of an FGVC-Aircraft folder, and its images (with boxes) to verify."""
    problems: list[str] = []
    paths: list[Path] = []
    boxes: list[np.ndarray] = []
    for split in ("train", "test"):
        read = _read(root, split, problems, need_boxes=False)
        if read is None:
            return FolderReport(problems)
        folder, class_names, image_ids, labels, split_boxes = read
        report_empty_classes(
            np.array(labels), class_names, str(folder / _SPLIT_FILES[split]), problems
        )
        paths += [folder / "images" / f"{image_id}.jpg" for image_id in image_ids]
        if split_boxes is not None:
            boxes.append(split_boxes)
    all_boxes = np.concatenate(boxes) if len(boxes) == 2 else None
    return FolderReport(problems, paths, all_boxes)
