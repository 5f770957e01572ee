"""TravelingBirds (Koh et al., 2020): CUB-200-2011 birds pasted on Places365 backgrounds.

In the training split the background is tied to the class; in the test split it is random, so a
model that learned the background fails there. Expected layout (the CBM release)::

    CUB_fixed/
      train/<NNN.Class_Name>/<file>.jpg
      test/<NNN.Class_Name>/<file>.jpg

``root`` may be ``CUB_fixed`` or the folder holding it. The CUB-200-2011 folder supplies image
ids, the split, boxes, attributes and parts: pass it as ``cub_root``, or keep it beside
(``<root>/CUB_200_2011``, ``<root>/../CUB_200_2011`` or one folder deeper, e.g.
``Datasets/CUB200/CUB_200_2011`` next to ``Datasets/TravelingBirds/CUB_fixed``). Each image is
mapped to its CUB id by its relative path in ``images.txt`` and kept when CUB's
``train_test_split.txt`` puts it in the requested split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from openqpm.data._base import (
    IMAGE_EXTENSIONS,
    FolderReport,
    raise_problems,
    report_empty_classes,
)
from openqpm.data._registry import register_dataset
from openqpm.data.cub import CUB_FOLDER, CubDataset, CubIndex, find_cub_folder, parse_cub_index
from openqpm.data.transforms import DATASET_STATS

_logger = logging.getLogger(__name__)

__all__ = ["find_cub_beside", "find_fixed_folder"]

FIXED_FOLDER = "CUB_fixed"


def find_fixed_folder(root: Path) -> Path | None:
    """The ``CUB_fixed`` folder (with ``train/`` and ``test/``): ``root/CUB_fixed`` or ``root``."""
    for candidate in (root / FIXED_FOLDER, root):
        has_splits = (candidate / "train").is_dir() and (candidate / "test").is_dir()
        # A folder of another name must hold CUB class folders, not to mistake any train/test tree.
        named = candidate.name == FIXED_FOLDER
        if has_splits and (named or _has_cub_class_folders(candidate / "train")):
            return candidate
    return None


def _has_cub_class_folders(folder: Path) -> bool:
    """Whether ``folder`` holds class folders named like CUB's (``001.Black_footed_Albatross``)."""
    names = sorted(child.name for child in folder.iterdir() if child.is_dir())[:3]
    return bool(names) and all(name[:3].isdigit() and name[3:4] == "." for name in names)


def find_cub_beside(fixed_folder: Path) -> Path | None:
    """Look for the CUB-200-2011 folder near ``CUB_fixed``; None when there is none."""
    searched: list[Path] = []
    for base in (fixed_folder.parent, fixed_folder.parent.parent):
        searched.append(base)
        if base.is_dir():
            searched += sorted(child for child in base.iterdir() if child.is_dir())
    for candidate in searched:
        folder = find_cub_folder(candidate)
        if folder is not None:
            return folder
    return None


def _locate(
    root: Path, cub_root: str | Path | None, problems: list[str]
) -> tuple[Path, Path] | None:
    fixed = find_fixed_folder(root)
    if fixed is None:
        problems.append(
            f"{root}: no {FIXED_FOLDER}/train and {FIXED_FOLDER}/test folders here "
            "(expected the TravelingBirds layout; see the README)"
        )
        return None
    if cub_root is not None:
        cub = find_cub_folder(Path(cub_root).expanduser())
        if cub is None:
            problems.append(f"{cub_root}: no CUB-200-2011 folder (images.txt) at cub_root")
            return None
    else:
        cub = find_cub_beside(fixed)
        if cub is None:
            problems.append(
                f"{fixed}: TravelingBirds needs the CUB-200-2011 folder for ids, split and "
                f"boxes; none found beside it (looked for {CUB_FOLDER} in {fixed.parent}, "
                f"{fixed.parent.parent} and their subfolders); pass cub_root"
            )
            return None
    return fixed, cub


def _split_rows(
    fixed: Path, index: CubIndex, split: str, problems: list[str]
) -> tuple[np.ndarray, list[Path]]:
    """The CUB rows of ``split`` found in ``CUB_fixed/<split>`` (ascending ids) and their files."""
    row_of = {relative: row for row, relative in enumerate(index.relative_paths)}
    split_folder = fixed / split
    found: dict[int, Path] = {}
    unknown: list[str] = []
    for class_folder in sorted(child for child in split_folder.iterdir() if child.is_dir()):
        for path in sorted(class_folder.iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            row = row_of.get(f"{class_folder.name}/{path.name}")
            if row is None:
                unknown.append(f"{class_folder.name}/{path.name}")
            else:
                found[row] = path
    if unknown:
        shown = ", ".join(unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        problems.append(f"{split_folder}: {len(unknown)} images not in CUB's images.txt: {shown}")
    wanted = np.flatnonzero(index.is_train if split == "train" else ~index.is_train)
    missing = [index.relative_paths[row] for row in wanted if row not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        problems.append(
            f"{split_folder}: {len(missing)} images of CUB's {split} split are missing: {shown}"
        )
    rows = np.array([row for row in wanted if row in found], dtype=np.int64)
    return rows, [found[int(row)] for row in rows]


@register_dataset(
    "travelingbirds",
    detect=lambda root: find_fixed_folder(root) is not None,
    validate=lambda root: validate_travelingbirds(root),
    description="TravelingBirds: CUB_fixed/{train,test}/<class>/<file> + CUB_200_2011 beside",
    priority=20,
    squash_when_cropped=True,
    crop_by_default=True,
)
def load_travelingbirds(
    root: Path,
    split: str,
    *,
    transform: Callable[[Image.Image], Any] | None = None,
    crop: bool = True,
    cub_root: str | Path | None = None,
) -> CubDataset:
    """Load one split of TravelingBirds.

    Args:
        root: ``CUB_fixed`` or the folder holding it.
        split: ``"train"`` or ``"test"``.
        transform: applied to each PIL image.
        crop: crop to CUB's ground-truth box (the birds keep CUB's image geometry).
        cub_root: the CUB-200-2011 folder; None searches beside ``CUB_fixed``.

    Raises:
        DatasetError: a folder is missing, or the images do not match CUB's index.
    """
    problems: list[str] = []
    located = _locate(root, cub_root, problems)
    raise_problems(problems, what=str(root))
    assert located is not None
    fixed, cub = located
    index = parse_cub_index(cub, problems, need_boxes=crop)
    raise_problems(problems, what=str(cub))
    assert index is not None
    rows, paths = _split_rows(fixed, index, split, problems)
    raise_problems(problems, what=str(fixed))
    return CubDataset(
        index,
        rows,
        image_paths=paths,
        mean_std=DATASET_STATS["travelingbirds"],
        transform=transform,
        crop=crop,
        name="travelingbirds",
        split=split,
        root=root,
    )


def validate_travelingbirds(root: Path, *, cub_root: str | Path | None = None) -> FolderReport:
    """Problems of a TravelingBirds folder (and its CUB folder), and its images to verify."""
    problems: list[str] = []
    located = _locate(root, cub_root, problems)
    if located is None:
        return FolderReport(problems)
    fixed, cub = located
    index = parse_cub_index(cub, problems, need_boxes=True)
    if index is None:
        return FolderReport(problems)
    paths: list[Path] = []
    boxes = []
    for split in ("train", "test"):
        rows, split_paths = _split_rows(fixed, index, split, problems)
        report_empty_classes(index.labels[rows], index.class_names, f"{fixed / split}", problems)
        paths += split_paths
        if index.boxes is not None:
            boxes.append(index.boxes[rows])
    return FolderReport(problems, paths, np.concatenate(boxes) if boxes else None)
