"""Recognise a data set folder's layout, and find every problem in it before any training.

``check_dataset`` reports, each problem naming the file and the id or line: missing index
files, ids present in one index file and not another, malformed lines, labels out of range,
classes without images, missing, unreadable or corrupt images, and bounding boxes with nothing
inside their image. Boxes that only stick out of their image are not problems: they are clipped
when cropping (the documented fix-up).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from openqpm.data._base import DatasetError, verify_images
from openqpm.data._registry import dataset_names, dataset_spec

_logger = logging.getLogger(__name__)

__all__ = ["IMAGE_CHECKS", "check_dataset", "detect_dataset"]

IMAGE_CHECKS = ("auto", "full", "sample", "none")
# "auto" decodes every image up to this many, and a sample beyond (ImageNet-sized folders take
# hours to decode in full; "full" does it anyway).
_FULL_CHECK_LIMIT = 20_000
_SAMPLE_SIZE = 2_000


def detect_dataset(root: str | os.PathLike[str]) -> str:
    """The registry name of the layout found in ``root``.

    Layouts are tried in registry order, the most specific first (the synthetic set before CUB,
    ImageNet before any ImageFolder tree).

    Args:
        root: the data set folder.

    Returns:
        A name from :func:`openqpm.data.dataset_names`.

    Raises:
        DatasetError: the folder does not exist or matches no layout; the message lists the
            expected layouts.
    """
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{folder}: data set folder not found")
    for name in dataset_names():
        if dataset_spec(name).detect(folder):
            return name
    layouts = "\n  ".join(f"{n}: {dataset_spec(n).description}" for n in dataset_names())
    raise DatasetError(f"{folder}: no known data set layout; expected one of\n  {layouts}")


def check_dataset(
    root: str | os.PathLike[str],
    name: str | None = None,
    *,
    image_check: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Every problem that would make a data set folder unusable, found before training.

    Args:
        root: the data set folder.
        name: its registry name; None detects it.
        image_check: ``"full"`` decodes every image; ``"sample"`` checks that every image file
            exists and decodes an evenly spread sample of 2000; ``"auto"`` is full up to 20000
            images and a sample beyond; ``"none"`` only checks that the files exist.
        progress: called as ``progress(n_done, n_total)`` while images are decoded.

    Returns:
        The problems, each naming the file and the id or line; empty when the folder is usable.

    Raises:
        ValueError: unknown ``image_check``.

    Example:
        >>> for problem in check_dataset("~/data/CUB_200_2011"):
        ...     print(problem)
    """
    if image_check not in IMAGE_CHECKS:
        raise ValueError(f"unknown image_check {image_check!r}; valid: {', '.join(IMAGE_CHECKS)}")
    folder = Path(root).expanduser()
    try:
        if not folder.is_dir():
            raise DatasetError(f"{folder}: data set folder not found")
        spec = dataset_spec(name if name is not None else detect_dataset(folder))
    except DatasetError as error:
        return [str(error)]
    report = spec.validate(folder)
    problems = list(report.problems)
    paths, boxes = report.image_paths, report.boxes
    if image_check == "sample" or (image_check == "auto" and len(paths) > _FULL_CHECK_LIMIT):
        problems += [f"{path}: image file not found" for path in paths if not path.is_file()]
        chosen = np.unique(
            np.linspace(0, len(paths) - 1, min(_SAMPLE_SIZE, len(paths))).astype(int)
        )
        _logger.info(
            "decoding %d of %d images (image_check='full' decodes all)", len(chosen), len(paths)
        )
        paths = [paths[i] for i in chosen]
        boxes = None if boxes is None else boxes[chosen]
        existing = [i for i, path in enumerate(paths) if path.is_file()]
        paths = [paths[i] for i in existing]
        boxes = None if boxes is None else boxes[existing]
    elif image_check == "none":
        problems += [f"{path}: image file not found" for path in paths if not path.is_file()]
        return problems
    verify_images(paths, problems, boxes=boxes, progress=progress)
    return problems
