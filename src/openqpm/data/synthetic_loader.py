"""The loader of the embedded synthetic set: a CUB-layout folder plus ``openqpm_synthetic.json``.

The generator (:mod:`openqpm.data.synthetic`) needs only numpy and Pillow, so that its worker
processes do not import torch; the registration lives here, beside it, because registering
imports the torch-based data set classes. Images, boxes, parts and attributes are read by the
CUB loader; the set's own normalisation statistics come from its metadata file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from openqpm.data._base import DatasetError, FolderReport, MeanStd
from openqpm.data._registry import register_dataset
from openqpm.data.cub import CubDataset, find_cub_folder, load_cub_split, validate_cub_folder
from openqpm.data.synthetic import METADATA_FILE, read_synthetic_metadata

__all__: list[str] = []


def _detect_synthetic(root: Path) -> bool:
    folder = find_cub_folder(root)
    return folder is not None and (folder / METADATA_FILE).is_file()


def _synthetic_mean_std(root: Path) -> MeanStd:
    folder = find_cub_folder(root) or root
    try:
        metadata = read_synthetic_metadata(folder)
    except ValueError as error:
        raise DatasetError(str(error)) from error
    mean, std = metadata["mean"], metadata["std"]
    return (
        (float(mean[0]), float(mean[1]), float(mean[2])),
        (float(std[0]), float(std[1]), float(std[2])),
    )


def _validate_synthetic(root: Path) -> FolderReport:
    report = validate_cub_folder(root)
    try:
        _synthetic_mean_std(root)
    except DatasetError as error:
        report.problems.append(str(error))
    return report


# Priority 10, before "cub" (30): every synthetic folder is also a CUB folder.
@register_dataset(
    "synthetic",
    detect=_detect_synthetic,
    validate=_validate_synthetic,
    description="the embedded part-based set (openqpm data make-synthetic), CUB layout",
    priority=10,
    squash_when_cropped=True,
    crop_by_default=True,
)
def _load_synthetic(
    root: Path,
    split: str,
    *,
    transform: Callable[[Image.Image], Any] | None = None,
    crop: bool = True,
) -> CubDataset:
    return load_cub_split(
        root,
        split,
        transform=transform,
        crop=crop,
        mean_std=_synthetic_mean_std(root),
        name="synthetic",
    )
