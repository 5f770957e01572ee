"""ImageNet and any ImageFolder tree: ``train/`` and ``val/`` (or ``test/``) of class folders.

Expected layout::

    root/
      train/<class>/<image>      (any depth below the class folder)
      val/<class>/<image>        (or test/; "val" is the test split, as for ImageNet)

Labels are the sorted class folder names of ``train/`` (the test split uses the same mapping, so
a class missing from it keeps its index). For ImageNet the class folders are WordNet ids
(``n01440764``); readable names come from ``LOC_synset_mapping.txt`` or ``synset_words.txt``
(``n01440764 tench, Tinca tinca``) in or above ``root`` when present. A flat ``val/`` folder (the
raw ImageNet archive) is labelled from ``LOC_val_solution.csv`` (Kaggle) when present.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from openqpm.data._base import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN_STD,
    FolderReport,
    ImageDataset,
    MeanStd,
    raise_problems,
    report_empty_classes,
)
from openqpm.data._registry import register_dataset

_logger = logging.getLogger(__name__)

__all__ = ["find_split_folder", "load_image_folder", "load_imagenet"]

_TEST_FOLDERS = ("val", "test", "validation")
_WORDNET_ID = re.compile(r"n\d{8}")


def find_split_folder(root: Path, split: str) -> Path | None:
    """``root/train`` for the train split; the first of ``val``, ``test``, ``validation`` else."""
    for name in ("train",) if split == "train" else _TEST_FOLDERS:
        if (root / name).is_dir():
            return root / name
    return None


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _image_files(
    folder: Path, problems: list[str], seen: dict[tuple[int, int], Path] | None = None
) -> list[Path]:
    """Image files anywhere below ``folder``, in a deterministic (sorted) order.

    Links to folders are followed (a class folder may live elsewhere), but a folder reached a
    second time is not read again: a link loop (``cat/loop -> ..``) or a second path to a folder
    would count its images again, under another class too. Each is a problem that names both
    paths, as is a folder that cannot be read.

    Args:
        folder: the folder to search.
        problems: where the problems are appended.
        seen: the folders already read (by device and inode) with the path they were read by;
            share one between the class folders of a split to catch links between classes.
    """
    seen = {} if seen is None else seen
    found = []

    def unreadable(error: OSError) -> None:
        problems.append(f"{error.filename}: cannot be read ({error.strerror})")

    for directory, subdirectories, files in os.walk(folder, onerror=unreadable, followlinks=True):
        path = Path(directory)
        try:
            info = path.stat()
        except OSError as error:
            unreadable(error)
            subdirectories.clear()
            continue
        first = seen.setdefault((info.st_dev, info.st_ino), path)
        if first != path:
            problems.append(
                f"{path} is the folder {first} again (a link to a folder: a link loop, or a "
                "second path to it); its images would be counted twice: remove the link"
            )
            subdirectories.clear()
            continue
        subdirectories.sort()
        found += [
            path / name for name in sorted(files) if Path(name).suffix.lower() in IMAGE_EXTENSIONS
        ]
    return found


def _find_upwards(root: Path, names: tuple[str, ...]) -> Path | None:
    for base in (root, *list(root.parents)[:3]):
        for name in names:
            if (base / name).is_file():
                return base / name
    return None


def _readable_imagenet_names(root: Path, wordnet_ids: list[str]) -> list[str]:
    mapping_file = _find_upwards(root, ("LOC_synset_mapping.txt", "synset_words.txt"))
    if mapping_file is None:
        return wordnet_ids
    mapping = {}
    for line in mapping_file.read_text(encoding="utf-8").splitlines():
        wordnet_id, _, description = line.strip().partition(" ")
        if description:
            mapping[wordnet_id] = description.split(",")[0].strip()
    return [mapping.get(wordnet_id, wordnet_id) for wordnet_id in wordnet_ids]


def _flat_val_labels(
    root: Path, folder: Path, class_index: dict[str, int], problems: list[str]
) -> tuple[list[Path], list[int]]:
    solution = _find_upwards(root, ("LOC_val_solution.csv",))
    if solution is None:
        problems.append(
            f"{folder}: images are not in class folders and no LOC_val_solution.csv was found; "
            "arrange them as val/<class>/<image>"
        )
        return [], []
    files = {path.stem: path for path in _image_files(folder, problems)}
    paths, labels = [], []
    with solution.open(newline="", encoding="utf-8") as stream:
        for line_number, row in enumerate(csv.reader(stream), start=1):
            if line_number == 1 and row and row[0] == "ImageId":
                continue
            if len(row) < 2 or not row[1].split():
                problems.append(f"{solution}:{line_number}: expected ImageId,PredictionString")
                continue
            wordnet_id = row[1].split()[0]
            if wordnet_id not in class_index:
                problems.append(f"{solution}:{line_number}: class {wordnet_id} not in train/")
            elif row[0] not in files:
                problems.append(f"{solution}:{line_number}: image {row[0]} not found in {folder}")
            else:
                paths.append(files[row[0]])
                labels.append(class_index[wordnet_id])
    return paths, labels


def _read(
    root: Path, split: str, problems: list[str]
) -> tuple[list[str], list[Path], list[int]] | None:
    train_folder = find_split_folder(root, "train")
    folder = find_split_folder(root, split)
    if folder is None or train_folder is None:
        wanted = "train/" if split == "train" or train_folder is None else "val/ (or test/)"
        problems.append(f"{root}: no {wanted} folder (expected train/ and val/ of class folders)")
        return None
    classes = _class_folders(train_folder)
    if not classes:
        problems.append(f"{train_folder}: no class folders")
        return None
    class_index = {name: index for index, name in enumerate(classes)}
    split_classes = _class_folders(folder)
    if split != "train" and not split_classes:
        paths, labels = _flat_val_labels(root, folder, class_index, problems)
        return classes, paths, labels
    unknown = [name for name in split_classes if name not in class_index]
    if unknown:
        problems.append(f"{folder}: class folders {unknown[:10]} are not in {train_folder}")
    paths, labels = [], []
    # the split folder counts as read: a link back to it from a class folder is a loop too
    split_info = folder.stat()
    seen = {(split_info.st_dev, split_info.st_ino): folder}
    for name in split_classes:
        if name in class_index:
            files = _image_files(folder / name, problems, seen)
            paths += files
            labels += [class_index[name]] * len(files)
    return classes, paths, labels


def _load(
    root: Path,
    split: str,
    *,
    transform: Callable[[Image.Image], Any] | None,
    name: str,
    mean_std: MeanStd,
    readable: Callable[[Path, list[str]], list[str]],
) -> ImageDataset:
    problems: list[str] = []
    read = _read(root, split, problems)
    if read is not None and not read[1]:
        problems.append(f"{find_split_folder(root, split)}: no image files")
    raise_problems(problems, what=f"{root} ({name})")
    assert read is not None
    classes, paths, labels = read
    return ImageDataset(
        paths,
        np.array(labels, dtype=np.int64),
        readable(root, classes),
        mean_std=mean_std,
        transform=transform,
        name=name,
        split=split,
        root=root,
    )


def _validate(root: Path) -> FolderReport:
    problems: list[str] = []
    paths: list[Path] = []
    for split in ("train", "test"):
        read = _read(root, split, problems)
        if read is None:
            return FolderReport(problems)
        classes, split_paths, labels = read
        where = f"{find_split_folder(root, split)}"
        report_empty_classes(np.array(labels, dtype=np.int64), classes, where, problems)
        paths += split_paths
    return FolderReport(problems, paths)


def _looks_like_folder_tree(root: Path) -> bool:
    train = find_split_folder(root, "train")
    return (
        train is not None
        and find_split_folder(root, "test") is not None
        and bool(_class_folders(train))
    )


def _looks_like_imagenet(root: Path) -> bool:
    if not _looks_like_folder_tree(root):
        return False
    train = find_split_folder(root, "train")
    assert train is not None
    return all(_WORDNET_ID.fullmatch(name) for name in _class_folders(train)[:20])


@register_dataset(
    "imagenet",
    detect=_looks_like_imagenet,
    validate=_validate,
    description="ImageNet-1k: train/<wnid>/ and val/<wnid>/ (or flat val/ + LOC_val_solution.csv)",
    priority=60,
)
def load_imagenet(
    root: Path,
    split: str,
    *,
    transform: Callable[[Image.Image], Any] | None = None,
    crop: bool = True,
) -> ImageDataset:
    """Load one split of ImageNet from class folders (``crop`` is ignored: no boxes are used).

    Raises:
        DatasetError: missing folders, unknown classes, or no images (all named).
    """
    return _load(
        root,
        split,
        transform=transform,
        name="imagenet",
        mean_std=IMAGENET_MEAN_STD,
        readable=_readable_imagenet_names,
    )


@register_dataset(
    "imagefolder",
    detect=_looks_like_folder_tree,
    validate=_validate,
    description="any tree: train/<class>/<image> and val/<class>/<image> (or test/)",
    priority=90,
)
def load_image_folder(
    root: Path,
    split: str,
    *,
    transform: Callable[[Image.Image], Any] | None = None,
    crop: bool = True,
    mean_std: MeanStd | None = None,
) -> ImageDataset:
    """Load one split of an ImageFolder tree (``crop`` is ignored: there are no boxes).

    Args:
        root: the folder holding ``train/`` and ``val/`` (or ``test/``).
        split: ``"train"`` or ``"test"``.
        transform: applied to each PIL image.
        crop: ignored.
        mean_std: normalisation statistics; ImageNet's by default (compute the data set's own
            with :func:`openqpm.data.compute_mean_std`).

    Raises:
        DatasetError: missing folders, unknown classes, or no images (all named).
    """
    return _load(
        root,
        split,
        transform=transform,
        name="imagefolder",
        mean_std=mean_std or IMAGENET_MEAN_STD,
        readable=lambda _, classes: [name.replace("_", " ") for name in classes],
    )
