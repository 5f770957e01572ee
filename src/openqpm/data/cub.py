"""CUB-200-2011, the layout that the embedded synthetic set is written in too.

Expected layout (the official archive; ``root`` may be ``CUB_200_2011`` or the folder holding it)::

    CUB_200_2011/
      images.txt                 <image_id> <class_folder>/<file>
      classes.txt                <class_id> <NNN.Class_Name>
      image_class_labels.txt     <image_id> <class_id>
      train_test_split.txt       <image_id> <1 train | 0 test>
      bounding_boxes.txt         <image_id> <x> <y> <width> <height>     (pixels)
      images/<class_folder>/<file>
      parts/parts.txt            <part_id> <part name>                   (optional)
      parts/part_locs.txt        <image_id> <part_id> <x> <y> <visible>  (optional)
      attributes/attributes.txt  <attribute_id> <name>   (optional; the archive also has it
                                                          one folder up as attributes.txt)
      attributes/image_attribute_labels.txt       <image> <attr> <present> <certainty> <time>
      attributes/class_attribute_labels_continuous.txt   one row of percentages per class

The ground-truth box crop is done on the fly (no preprocessed copy). Class attributes are the
continuous percentages / 100; image attributes are 1/0 where the annotator was at least
"probably" sure (certainty >= 3) and -1 otherwise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from openqpm.data._base import (
    DatasetError,
    FolderReport,
    ImageDataset,
    MeanStd,
    compare_ids,
    parse_id_table,
    raise_problems,
    read_table,
    readable_class_name,
    report_empty_classes,
)
from openqpm.data._registry import register_dataset
from openqpm.data.transforms import DATASET_STATS

_logger = logging.getLogger(__name__)

__all__ = ["CubDataset", "CubIndex", "find_cub_folder", "load_cub_split", "parse_cub_index"]

CUB_FOLDER = "CUB_200_2011"
_CONFIDENT_CERTAINTY = 3  # CUB certainty ids: 1 not visible, 2 guessing, 3 probably, 4 definitely


def find_cub_folder(root: Path) -> Path | None:
    """The folder holding ``images.txt``: ``root`` itself or ``root/CUB_200_2011``; or None."""
    for candidate in (root, root / CUB_FOLDER):
        if (candidate / "images.txt").is_file():
            return candidate
    return None


def _find_attribute_names_file(folder: Path) -> Path | None:
    for candidate in (
        folder / "attributes" / "attributes.txt",
        folder.parent / "attributes.txt",
        folder / "attributes.txt",
    ):
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class CubIndex:
    """The parsed index files of a CUB-layout folder (all images, both splits).

    Attributes:
        folder: the folder holding ``images.txt``.
        image_ids: ``(N,)`` image ids in ascending order.
        relative_paths: path of each image below ``images/``.
        labels: ``(N,)`` class index (class id - 1).
        is_train: ``(N,)`` whether each image is in the training split.
        boxes: ``(N, 4)`` x, y, w, h in pixels, or None when ``bounding_boxes.txt`` is absent.
        class_folders: ``NNN.Class_Name`` of each class.
        part_names: names from ``parts/parts.txt``, or None.
        attribute_names: names from ``attributes.txt``, or None.
        class_attributes: ``(n_classes, n_attributes)`` in [0, 1], or None.
    """

    folder: Path
    image_ids: np.ndarray
    relative_paths: list[str]
    labels: np.ndarray
    is_train: np.ndarray
    boxes: np.ndarray | None
    class_folders: list[str]
    part_names: list[str] | None
    attribute_names: list[str] | None
    class_attributes: np.ndarray | None

    @property
    def class_names(self) -> list[str]:
        """Readable class names (``"Black footed Albatross"``)."""
        return [readable_class_name(folder) for folder in self.class_folders]


def _contiguous_ids(
    path: Path, table: dict[int, list[str]], what: str, problems: list[str]
) -> bool:
    expected = set(range(1, len(table) + 1))
    if set(table) != expected:
        missing = sorted(expected - set(table))[:10]
        extra = sorted(set(table) - expected)[:10]
        problems.append(
            f"{path}: {what} ids must run from 1 to {len(table)} without gaps "
            f"(missing {missing}, unexpected {extra})"
        )
        return False
    return True


def _read_names(path: Path, what: str, problems: list[str]) -> list[str] | None:
    rows = read_table(path, n_fields=2, problems=problems, last_field_rest=True, required=False)
    if rows is None:
        return None
    table = parse_id_table(path, rows, problems)
    if not _contiguous_ids(path, table, what, problems):
        return None
    return [table[i][0] for i in range(1, len(table) + 1)]


def _read_class_attributes(
    path: Path, n_classes: int, n_attributes: int | None, problems: list[str]
) -> np.ndarray | None:
    if not path.is_file():
        return None
    rows = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append([float(value) for value in line.split()])
        except ValueError:
            problems.append(f"{path}:{line_number}: expected numbers, got {line.strip()[:60]!r}")
            return None
    widths = {len(row) for row in rows}
    if len(rows) != n_classes or len(widths) != 1:
        problems.append(
            f"{path}: expected {n_classes} rows of equal length (one per class), got {len(rows)} "
            f"rows of lengths {sorted(widths)}"
        )
        return None
    values = np.array(rows, dtype=np.float64)  # (n_classes, n_attributes)
    if n_attributes is not None and values.shape[1] != n_attributes:
        problems.append(
            f"{path}: {values.shape[1]} columns but {n_attributes} attributes in attributes.txt"
        )
        return None
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 100:
        problems.append(f"{path}: values must be percentages in [0, 100]")
        return None
    return (values / 100.0).astype(np.float32)


def parse_cub_index(folder: Path, problems: list[str], *, need_boxes: bool) -> CubIndex | None:
    """Parse and cross-check the index files of a CUB-layout folder.

    Args:
        folder: the folder holding ``images.txt``.
        problems: every problem found is appended (file and id or line named).
        need_boxes: ``bounding_boxes.txt`` is required (for the crop).

    Returns:
        The index, or None when a problem prevents building it.
    """
    paths = {
        name: folder / name
        for name in (
            "images.txt",
            "image_class_labels.txt",
            "train_test_split.txt",
            "classes.txt",
            "bounding_boxes.txt",
        )
    }
    images_rows = read_table(
        paths["images.txt"], n_fields=2, problems=problems, last_field_rest=True
    )
    labels_rows = read_table(paths["image_class_labels.txt"], n_fields=2, problems=problems)
    split_rows = read_table(paths["train_test_split.txt"], n_fields=2, problems=problems)
    classes_rows = read_table(
        paths["classes.txt"], n_fields=2, problems=problems, last_field_rest=True
    )
    boxes_rows = read_table(
        paths["bounding_boxes.txt"], n_fields=5, problems=problems, required=need_boxes
    )
    if images_rows is None or labels_rows is None or split_rows is None or classes_rows is None:
        return None
    images = parse_id_table(paths["images.txt"], images_rows, problems)
    labels = parse_id_table(paths["image_class_labels.txt"], labels_rows, problems)
    split = parse_id_table(paths["train_test_split.txt"], split_rows, problems)
    classes = parse_id_table(paths["classes.txt"], classes_rows, problems)
    boxes = (
        None
        if boxes_rows is None
        else parse_id_table(paths["bounding_boxes.txt"], boxes_rows, problems)
    )
    for name, table in (
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("bounding_boxes.txt", boxes),
    ):
        if table is not None:
            compare_ids(images, paths["images.txt"], table, paths[name], problems)
    _contiguous_ids(paths["classes.txt"], classes, "class", problems)
    if not classes:
        problems.append(f"{paths['classes.txt']}: no classes")

    for image_id, (class_id_text,) in labels.items():
        if not class_id_text.lstrip("-").isdigit() or not 1 <= int(class_id_text) <= len(classes):
            problems.append(
                f"{paths['image_class_labels.txt']}: image {image_id} has class id "
                f"{class_id_text!r}, expected 1..{len(classes)} (the ids of classes.txt)"
            )
    for image_id, (flag,) in split.items():
        if flag not in ("0", "1"):
            problems.append(
                f"{paths['train_test_split.txt']}: image {image_id} has split flag {flag!r}, "
                "expected 1 (train) or 0 (test)"
            )
    box_values: dict[int, list[float]] = {}
    for image_id, fields in (boxes or {}).items():
        try:
            values = [float(value) for value in fields]
        except ValueError:
            problems.append(
                f"{paths['bounding_boxes.txt']}: image {image_id}: non-numeric box {fields}"
            )
            continue
        if not all(math.isfinite(v) for v in values) or values[2] <= 0 or values[3] <= 0:
            problems.append(
                f"{paths['bounding_boxes.txt']}: image {image_id}: box {values} needs finite "
                "values and a positive width and height"
            )
            continue
        box_values[image_id] = values

    part_names = _read_names(folder / "parts" / "parts.txt", "part", problems)
    attribute_path = _find_attribute_names_file(folder)
    attribute_names = (
        None if attribute_path is None else _read_names(attribute_path, "attribute", problems)
    )
    class_attributes = _read_class_attributes(
        folder / "attributes" / "class_attribute_labels_continuous.txt",
        len(classes),
        None if attribute_names is None else len(attribute_names),
        problems,
    )
    if problems:
        return None
    image_ids = np.array(sorted(images), dtype=np.int64)
    return CubIndex(
        folder=folder,
        image_ids=image_ids,
        relative_paths=[images[int(i)][0] for i in image_ids],
        labels=np.array([int(labels[int(i)][0]) - 1 for i in image_ids], dtype=np.int64),
        is_train=np.array([split[int(i)][0] == "1" for i in image_ids], dtype=bool),
        boxes=None if boxes is None else np.array([box_values[int(i)] for i in image_ids]),
        class_folders=[classes[c][0] for c in range(1, len(classes) + 1)],
        part_names=part_names,
        attribute_names=attribute_names,
        class_attributes=class_attributes,
    )


def _row_lookup(image_ids: np.ndarray, max_id: int) -> np.ndarray:
    """``lookup[image_id]`` = row of that image in ``image_ids``, -1 for other ids."""
    lookup = np.full(max(max_id, int(image_ids.max(initial=0))) + 1, -1, dtype=np.int64)
    lookup[image_ids] = np.arange(len(image_ids))
    return lookup


def _load_int_table(path: Path, n_columns: int) -> np.ndarray | None:
    """Fast path: the first ``n_columns`` integer columns, or None if some line does not parse."""
    try:
        return np.loadtxt(path, dtype=np.int64, usecols=tuple(range(n_columns)), ndmin=2)
    except ValueError:
        return None


def read_image_attribute_labels(
    path: Path,
    image_ids: np.ndarray,
    n_attributes: int,
    problems: list[str],
    *,
    known_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Read ``image_attribute_labels.txt`` for the given images.

    Args:
        path: the file (CUB format ``image attribute is_present certainty time``; extra fields on
            a line are ignored, as CUB's own file has a few such lines).
        image_ids: the images (rows of the result), ascending.
        n_attributes: number of attributes (columns).
        problems: malformed lines and unknown ids are appended here.
        known_ids: every valid image id (defaults to ``image_ids``).

    Returns:
        ``(N, n_attributes)`` int8: 1 present, 0 absent (certainty >= 3), -1 otherwise/missing.
    """
    known = image_ids if known_ids is None else known_ids
    result = np.full((len(image_ids), n_attributes), -1, dtype=np.int8)
    table = _load_int_table(path, 4)
    if table is None:  # some line is malformed: parse line by line to name it
        parsed, n_bad = [], 0
        for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) < 4:
                    raise ValueError(line)
                row = [int(value) for value in fields[:4]]
            except ValueError:
                n_bad += 1
                if n_bad <= 5:
                    problems.append(f"{path}:{line_number}: malformed line {line.strip()[:60]!r}")
                continue
            parsed.append(row)
        if n_bad > 5:
            problems.append(f"{path}: {n_bad - 5} more malformed lines")
        table = np.array(parsed, dtype=np.int64).reshape(-1, 4)
    image_column, attribute_column, present, certainty = table.T
    unknown = np.setdiff1d(np.unique(image_column), known)
    if len(unknown):
        problems.append(
            f"{path}: image ids {unknown[:10].tolist()} are not in images.txt"
            + (f" ({len(unknown)} in all)" if len(unknown) > 10 else "")
        )
    bad_attribute = (attribute_column < 1) | (attribute_column > n_attributes)
    if bad_attribute.any():
        problems.append(
            f"{path}: attribute ids {np.unique(attribute_column[bad_attribute])[:10].tolist()} "
            f"outside 1..{n_attributes}"
        )
    if not np.isin(present, (0, 1)).all():
        problems.append(f"{path}: is_present must be 0 or 1")
    rows = _row_lookup(image_ids, int(image_column.max(initial=0)))[np.clip(image_column, 0, None)]
    keep = (rows >= 0) & ~bad_attribute & (image_column >= 0)
    values = np.where(certainty >= _CONFIDENT_CERTAINTY, present, -1).astype(np.int8)
    result[rows[keep], attribute_column[keep] - 1] = values[keep]
    return result


def read_part_locations(
    path: Path,
    image_ids: np.ndarray,
    n_parts: int,
    problems: list[str],
    *,
    known_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Read ``parts/part_locs.txt`` (``image part x y visible``, pixels) for the given images.

    Returns:
        ``(N, n_parts, 3)`` float64: x, y in pixels of the image file, visibility 0/1; parts
        without a line are not visible.
    """
    known = image_ids if known_ids is None else known_ids
    result = np.zeros((len(image_ids), n_parts, 3), dtype=np.float64)
    try:
        table = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as error:
        problems.append(f"{path}: malformed ({error})")
        return result
    if table.size == 0:
        return result
    if table.shape[1] != 5:
        problems.append(
            f"{path}: expected 5 columns (image part x y visible), got {table.shape[1]}"
        )
        return result
    image_column = table[:, 0].astype(np.int64)
    part_column = table[:, 1].astype(np.int64)
    unknown = np.setdiff1d(np.unique(image_column), known)
    if len(unknown):
        problems.append(f"{path}: image ids {unknown[:10].tolist()} are not in images.txt")
    bad_part = (part_column < 1) | (part_column > n_parts)
    if bad_part.any():
        problems.append(
            f"{path}: part ids {np.unique(part_column[bad_part])[:10].tolist()} "
            f"outside 1..{n_parts}"
        )
    if not np.isin(table[:, 4], (0, 1)).all():
        problems.append(f"{path}: visibility must be 0 or 1")
    rows = _row_lookup(image_ids, int(image_column.max(initial=0)))[np.clip(image_column, 0, None)]
    keep = (rows >= 0) & ~bad_part
    result[rows[keep], part_column[keep] - 1] = table[keep, 2:5]
    return result


class CubDataset(ImageDataset):
    """One split of a CUB-layout folder; image attributes and parts are read on first access."""

    def __init__(
        self,
        index: CubIndex,
        rows: np.ndarray,
        *,
        image_paths: list[Path] | None = None,
        mean_std: MeanStd,
        transform: Callable[[Image.Image], Any] | None,
        crop: bool,
        name: str,
        split: str,
        root: Path,
    ) -> None:
        paths = image_paths or [index.folder / "images" / index.relative_paths[r] for r in rows]
        super().__init__(
            paths,
            index.labels[rows],
            index.class_names,
            mean_std=mean_std,
            transform=transform,
            boxes=None if index.boxes is None else index.boxes[rows],
            crop=crop,
            class_attributes=index.class_attributes,
            attribute_names=index.attribute_names,
            part_names=index.part_names,
            name=name,
            split=split,
            root=root,
        )
        self.image_ids = index.image_ids[rows]
        self.cub_folder = index.folder
        self._all_image_ids = index.image_ids

    def _read_annotation(
        self,
        relative_path: str,
        names: list[str] | None,
        read: Callable[..., np.ndarray | None],
        *,
        fatal: bool,
    ) -> np.ndarray | None:
        """``read`` an optional per-image table for this split; its problems raise or are logged."""
        path = self.cub_folder / relative_path
        if names is None or not path.is_file():
            return None
        problems: list[str] = []
        values = read(path, self.image_ids, len(names), problems, known_ids=self._all_image_ids)
        if fatal:
            raise_problems(problems, what=str(path))
        for problem in problems:
            _logger.warning("%s", problem)
        return values

    def _read_image_attributes(self) -> np.ndarray | None:
        return self._read_annotation(
            "attributes/image_attribute_labels.txt",
            self.attribute_names,
            read_image_attribute_labels,
            fatal=False,
        )

    def _read_part_pixel_locations(self) -> np.ndarray | None:
        return self._read_annotation(
            "parts/part_locs.txt", self.part_names, read_part_locations, fatal=True
        )


def load_cub_split(
    root: Path,
    split: str,
    *,
    transform: Callable[[Image.Image], Any] | None = None,
    crop: bool = True,
    mean_std: MeanStd | None = None,
    name: str = "cub",
) -> CubDataset:
    """Load one split of a CUB-layout folder.

    Args:
        root: ``CUB_200_2011`` or the folder holding it.
        split: ``"train"`` or ``"test"``.
        transform: applied to each PIL image.
        crop: crop to the ground-truth box (``bounding_boxes.txt`` then required).
        mean_std: normalisation statistics; CUB's by default.
        name: the registry name recorded on the data set.

    Raises:
        DatasetError: missing or inconsistent index files, or missing image files (all named).
    """
    folder = find_cub_folder(root)
    if folder is None:
        raise DatasetError(
            f"{root}: no images.txt here or in {root / CUB_FOLDER} "
            "(expected the CUB-200-2011 layout; see the README)"
        )
    problems: list[str] = []
    index = parse_cub_index(folder, problems, need_boxes=crop)
    raise_problems(problems, what=str(folder))
    assert index is not None  # no problems means an index was built
    rows = np.flatnonzero(index.is_train if split == "train" else ~index.is_train)
    missing = [
        index.relative_paths[r]
        for r in rows
        if not (folder / "images" / index.relative_paths[r]).is_file()
    ]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise DatasetError(f"{folder / 'images'}: {len(missing)} image files missing: {shown}")
    return CubDataset(
        index,
        rows,
        mean_std=mean_std or DATASET_STATS["cub"],
        transform=transform,
        crop=crop,
        name=name,
        split=split,
        root=root,
    )


def validate_cub_folder(root: Path) -> FolderReport:
    """Problems of a CUB-layout folder's index files and annotations, and its images to verify.

    Args:
        root: ``CUB_200_2011`` or the folder holding it.

    Returns:
        The problems (each naming the file and id or line) and every image with its box.
    """
    folder = find_cub_folder(root)
    if folder is None:
        return FolderReport([f"{root}: no images.txt here or in {root / CUB_FOLDER} (CUB layout)"])
    problems: list[str] = []
    index = parse_cub_index(folder, problems, need_boxes=True)
    if index is None:
        return FolderReport(problems)
    part_locs = folder / "parts" / "part_locs.txt"
    if index.part_names is not None and part_locs.is_file():
        read_part_locations(part_locs, index.image_ids, len(index.part_names), problems)
    for split, members in (("train", index.is_train), ("test", ~index.is_train)):
        report_empty_classes(
            index.labels[members], index.class_names, f"{folder} ({split} split)", problems
        )
    paths = [folder / "images" / relative for relative in index.relative_paths]
    return FolderReport(problems, paths, index.boxes)


def _detect_cub(root: Path) -> bool:
    return find_cub_folder(root) is not None


@register_dataset(
    "cub",
    detect=_detect_cub,
    validate=validate_cub_folder,
    description="CUB-200-2011: CUB_200_2011/{images.txt, classes.txt, ..., images/}",
    priority=30,
    squash_when_cropped=True,
    crop_by_default=True,
)
def _load_cub(
    root: Path,
    split: str,
    *,
    transform: Callable[[Image.Image], Any] | None = None,
    crop: bool = True,
) -> CubDataset:
    return load_cub_split(root, split, transform=transform, crop=crop)
