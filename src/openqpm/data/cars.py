"""Stanford Cars (196 classes, 8144 training and 8041 test images) in the layouts users have.

1. The devkit layout (the original archives; also what torchvision expects)::

       stanford_cars/                   (root may be this folder or the one holding it)
         devkit/cars_meta.mat           class_names
         devkit/cars_train_annos.mat    annotations: bbox_x1 bbox_y1 bbox_x2 bbox_y2 class fname
         cars_test_annos_withlabels.mat (also accepted inside devkit/)
         cars_train/<fname>   cars_test/<fname>

   The Kaggle copy of it (``car_devkit/devkit/...``, ``cars_train/cars_train/...``,
   ``cars_test_annos_withlabels (1).mat``) is recognised too.
2. The Kaggle "by classes folder" layout with CSV annotations::

       anno_train.csv  anno_test.csv    fname,x1,y1,x2,y2,class (no header; class 1-based)
       names.csv                        one class name per line
       car_data/car_data/{train,test}/<class name>/<fname>   (or car_data/{train,test}/...)
3. The single-file annotation layout: ``cars_annos.mat`` (annotations with
   ``relative_im_path``, box, ``class`` and a ``test`` flag; ``class_names``) and ``car_ims/``.

Boxes are MATLAB 1-based inclusive pixel corners, turned into ``x, y, w, h``. The paper does not
crop Cars to its boxes (``configs/cars_resnet50.yaml`` sets ``crop: false``); ``crop=True``
does, when asked.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from openqpm.data._base import (
    FolderReport,
    ImageDataset,
    raise_problems,
    report_empty_classes,
)
from openqpm.data._registry import register_dataset
from openqpm.data.transforms import DATASET_STATS

_logger = logging.getLogger(__name__)

__all__ = ["CarsLayout", "find_cars_layout"]

_BASES = ("", "stanford_cars", "stanford-car-dataset-by-classes-folder")


@dataclass(frozen=True)
class CarsLayout:
    """Where the files of a Stanford Cars folder are.

    Attributes:
        kind: ``"devkit"``, ``"csv"`` or ``"annos"`` (see the module docstring).
        base: the folder the layout starts in.
        files: role -> path (``meta``, ``train_annotations``, ``test_annotations``,
            ``train_images``, ``test_images``, ``names``, ``annotations``).
    """

    kind: str
    base: Path
    files: dict[str, Path]


def _first_existing(candidates: Sequence[Path], *, folder: bool = False) -> Path | None:
    for candidate in candidates:
        if candidate.is_dir() if folder else candidate.is_file():
            return candidate
    return None


def find_cars_layout(root: Path) -> CarsLayout | None:
    """Recognise one of the three Stanford Cars layouts in ``root`` (or one folder below)."""
    for name in _BASES:
        base = root / name if name else root
        meta = _first_existing(
            [base / "devkit" / "cars_meta.mat", base / "car_devkit" / "devkit" / "cars_meta.mat"]
        )
        if meta is not None:
            files = {
                "meta": meta,
                "train_annotations": meta.parent / "cars_train_annos.mat",
                "test_annotations": _first_existing(
                    [
                        base / "cars_test_annos_withlabels.mat",
                        meta.parent / "cars_test_annos_withlabels.mat",
                        base / "cars_test_annos_withlabels (1).mat",
                    ]
                )
                or base / "cars_test_annos_withlabels.mat",
            }
            for split in ("train", "test"):
                folder = base / f"cars_{split}"
                files[f"{split}_images"] = (
                    _first_existing([folder / folder.name], folder=True) or folder
                )
            return CarsLayout("devkit", base, files)
        if (base / "anno_train.csv").is_file() and (base / "names.csv").is_file():
            images = _first_existing(
                [base / "car_data" / "car_data", base / "car_data", base], folder=True
            )
            assert images is not None  # base itself exists
            files = {
                "names": base / "names.csv",
                "train_annotations": base / "anno_train.csv",
                "test_annotations": base / "anno_test.csv",
                "train_images": images / "train",
                "test_images": images / "test",
            }
            return CarsLayout("csv", base, files)
        if (base / "cars_annos.mat").is_file():
            return CarsLayout("annos", base, {"annotations": base / "cars_annos.mat"})
    return None


# ----------------------------------------------------------------------------- .mat reading


def _item(value: Any) -> Any:
    """A MATLAB scalar or string as a Python value (``loadmat`` wraps them in arrays)."""
    while isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"expected a scalar, got an array of shape {value.shape}")
        value = value.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def _load_mat(path: Path, problems: list[str]) -> dict[str, Any] | None:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    if not path.is_file():
        problems.append(f"{path}: missing file")
        return None
    try:
        return loadmat(path, squeeze_me=True)
    except (MatReadError, OSError, ValueError, TypeError, NotImplementedError) as error:
        problems.append(f"{path}: cannot read as a MATLAB file ({error})")
        return None


def _mat_records(
    path: Path, key: str, fields: Sequence[str], problems: list[str]
) -> list[dict[str, Any]] | None:
    """The struct array ``key`` of a .mat file as one dict per record (only ``fields``)."""
    data = _load_mat(path, problems)
    if data is None:
        return None
    if key not in data:
        problems.append(
            f"{path}: no variable {key!r} (found {sorted(k for k in data if k[:2] != '__')})"
        )
        return None
    records = np.atleast_1d(data[key])
    names = records.dtype.names or ()
    missing = [field for field in fields if field not in names]
    if missing:
        problems.append(f"{path}: {key} lacks the fields {missing} (has {list(names)})")
        return None
    rows = []
    for number, record in enumerate(records, start=1):
        try:
            rows.append({field: _item(record[field]) for field in fields})
        except ValueError as error:
            problems.append(f"{path}: {key} record {number}: {error}")
    return rows


def _mat_class_names(path: Path, problems: list[str]) -> list[str] | None:
    data = _load_mat(path, problems)
    if data is None:
        return None
    if "class_names" not in data:
        problems.append(f"{path}: no variable 'class_names'")
        return None
    return [str(_item(name)).strip() for name in np.atleast_1d(data["class_names"])]


# ----------------------------------------------------------------------------- the three layouts


@dataclass
class _Split:
    paths: list[Path]
    labels: list[int]  # 0-based
    boxes: list[list[float]]  # x, y, w, h


def _box_from_corners(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    # MATLAB corners are 1-based and inclusive.
    return [
        float(x1) - 1.0,
        float(y1) - 1.0,
        float(x2) - float(x1) + 1.0,
        float(y2) - float(y1) + 1.0,
    ]


def _check_label(label: Any, n_classes: int, where: str, problems: list[str]) -> int | None:
    try:
        value = int(label)
    except (TypeError, ValueError):
        value = 0
    if not 1 <= value <= n_classes:
        problems.append(f"{where}: class {label!r} outside 1..{n_classes}")
        return None
    return value - 1


_ANNOTATION_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def _devkit_split(layout: CarsLayout, split: str, n_classes: int, problems: list[str]) -> _Split:
    annotations = layout.files[f"{split}_annotations"]
    images = layout.files[f"{split}_images"]
    result = _Split([], [], [])
    if split == "test" and not annotations.is_file():
        problems.append(
            f"{annotations}: missing file (test labels; the devkit's cars_test_annos.mat has none)"
        )
        return result
    records = _mat_records(annotations, "annotations", _ANNOTATION_FIELDS, problems)
    if not images.is_dir():
        problems.append(f"{images}: missing image folder")
        return result
    for number, record in enumerate(records or [], start=1):
        label = _check_label(
            record["class"], n_classes, f"{annotations}: record {number}", problems
        )
        if label is None:
            continue
        result.paths.append(images / str(record["fname"]))
        result.labels.append(label)
        result.boxes.append(_box_from_corners(*(record[f] for f in _ANNOTATION_FIELDS[:4])))
    return result


def _read_csv_rows(path: Path, problems: list[str]) -> list[tuple[int, list[str]]] | None:
    if not path.is_file():
        problems.append(f"{path}: missing file")
        return None
    with path.open(newline="", encoding="utf-8") as stream:
        return [(n, row) for n, row in enumerate(csv.reader(stream), start=1) if row]


def _csv_split(
    layout: CarsLayout, split: str, class_names: list[str], problems: list[str]
) -> _Split:
    annotations = layout.files[f"{split}_annotations"]
    images = layout.files[f"{split}_images"]
    result = _Split([], [], [])
    rows = _read_csv_rows(annotations, problems)
    if rows is None:
        return result
    if not images.is_dir():
        problems.append(f"{images}: missing image folder")
        return result
    # Class folders are named after the classes, but names with "/" had to be renamed on disk:
    # find each file by name instead, among all class folders.
    located: dict[str, list[Path]] = {}
    for class_folder in sorted(child for child in images.iterdir() if child.is_dir()):
        for path in class_folder.iterdir():
            located.setdefault(path.name, []).append(path)
    for line_number, row in rows:
        where = f"{annotations}:{line_number}"
        if len(row) != 6:
            problems.append(f"{where}: expected 6 fields (fname,x1,y1,x2,y2,class), got {len(row)}")
            continue
        if line_number == 1 and not row[5].strip().lstrip("-").isdigit():
            continue  # a header line
        label = _check_label(row[5].strip(), len(class_names), where, problems)
        try:
            corners = [float(value) for value in row[1:5]]
        except ValueError:
            problems.append(f"{where}: non-numeric box {row[1:5]}")
            continue
        if label is None:
            continue
        candidates = located.get(row[0].strip(), [])
        if len(candidates) > 1:
            wanted = class_names[label].replace("/", "-")
            candidates = [path for path in candidates if path.parent.name == wanted] or candidates[
                :0
            ]
        if len(candidates) != 1:
            problems.append(f"{where}: image {row[0]!r} not found (or ambiguous) under {images}")
            continue
        result.paths.append(candidates[0])
        result.labels.append(label)
        result.boxes.append(_box_from_corners(*corners))
    return result


def _annos_split(layout: CarsLayout, split: str, n_classes: int, problems: list[str]) -> _Split:
    path = layout.files["annotations"]
    fields = ("relative_im_path", *_ANNOTATION_FIELDS[:5], "test")
    records = _mat_records(path, "annotations", fields, problems)
    result = _Split([], [], [])
    for number, record in enumerate(records or [], start=1):
        if bool(int(record["test"])) != (split == "test"):
            continue
        label = _check_label(record["class"], n_classes, f"{path}: record {number}", problems)
        if label is None:
            continue
        result.paths.append(layout.base / str(record["relative_im_path"]))
        result.labels.append(label)
        result.boxes.append(_box_from_corners(*(record[f] for f in _ANNOTATION_FIELDS[:4])))
    return result


def _class_names(layout: CarsLayout, problems: list[str]) -> list[str] | None:
    if layout.kind == "devkit":
        return _mat_class_names(layout.files["meta"], problems)
    if layout.kind == "annos":
        return _mat_class_names(layout.files["annotations"], problems)
    rows = _read_csv_rows(layout.files["names"], problems)
    return None if rows is None else [",".join(row).strip() for _, row in rows]


def _read_split(
    layout: CarsLayout, split: str, problems: list[str]
) -> tuple[list[str], _Split] | None:
    class_names = _class_names(layout, problems)
    if not class_names:
        if class_names is not None:
            problems.append(f"{layout.base}: no class names")
        return None
    if layout.kind == "devkit":
        data = _devkit_split(layout, split, len(class_names), problems)
    elif layout.kind == "csv":
        data = _csv_split(layout, split, class_names, problems)
    else:
        data = _annos_split(layout, split, len(class_names), problems)
    return class_names, data


def _locate(root: Path, problems: list[str]) -> CarsLayout | None:
    layout = find_cars_layout(root)
    if layout is None:
        problems.append(
            f"{root}: no Stanford Cars layout here (expected devkit/cars_meta.mat, or "
            "anno_train.csv + names.csv, or cars_annos.mat; see the README)"
        )
    return layout


@register_dataset(
    "cars",
    detect=lambda root: find_cars_layout(root) is not None,
    validate=lambda root: validate_cars(root),
    description="Stanford Cars: devkit .mat layout, Kaggle CSV layout, or cars_annos.mat",
    priority=40,
)
def load_cars(
    root: Path,
    split: str,
    *,
    transform: Callable[[Image.Image], Any] | None = None,
    crop: bool = True,
) -> ImageDataset:
    """Load one split of Stanford Cars (any of the three layouts).

    Args:
        root: the data set folder.
        split: ``"train"`` or ``"test"``.
        transform: applied to each PIL image.
        crop: crop to the car's box (the paper does not: pass ``crop=False`` for its recipe).

    Raises:
        DatasetError: no known layout, or missing/inconsistent files (all named).
    """
    problems: list[str] = []
    layout = _locate(root, problems)
    raise_problems(problems, what=str(root))
    assert layout is not None
    read = _read_split(layout, split, problems)
    if read is not None:
        missing = [path for path in read[1].paths if not path.is_file()]
        if missing:
            shown = ", ".join(str(path) for path in missing[:5])
            problems.append(f"{len(missing)} image files missing: {shown}")
    raise_problems(problems, what=f"{layout.base} (Stanford Cars, {layout.kind} layout)")
    assert read is not None
    class_names, data = read
    return ImageDataset(
        data.paths,
        np.array(data.labels, dtype=np.int64),
        class_names,
        mean_std=DATASET_STATS["cars"],
        transform=transform,
        boxes=np.array(data.boxes, dtype=np.float64).reshape(-1, 4),
        crop=crop,
        name="cars",
        split=split,
        root=root,
    )


def validate_cars(root: Path) -> FolderReport:
    """Problems of a Stanford Cars folder, and its images (with boxes) to verify."""
    problems: list[str] = []
    layout = _locate(root, problems)
    if layout is None:
        return FolderReport(problems)
    paths: list[Path] = []
    boxes: list[list[float]] = []
    for split in ("train", "test"):
        read = _read_split(layout, split, problems)
        if read is None:
            return FolderReport(problems)
        class_names, data = read
        report_empty_classes(
            np.array(data.labels, dtype=np.int64),
            class_names,
            f"{layout.base} ({split} split)",
            problems,
        )
        paths += data.paths
        boxes += data.boxes
    return FolderReport(problems, paths, np.array(boxes, dtype=np.float64).reshape(-1, 4))
