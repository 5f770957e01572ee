"""Data sets: loaders for the real data sets, the embedded part-based set, transforms, checks.

Every loader returns an :class:`ImageDataset` (a ``torch.utils.data.Dataset`` of
``(image, label)`` with ``class_names``, ``labels``, ``load_image``, ``class_attributes``,
``image_attributes``, ``part_locations``, ``mean_std``; see ``docs/internals.md``).

Names are imported lazily: ``openqpm.data.synthetic`` (numpy and Pillow only) is imported by the
generator's worker processes, which should not pay for importing torch.

Example:
    >>> from openqpm.data import create_dataset, build_transforms, resize_squashes
    >>> train = create_dataset("cub", "~/data/CUB_200_2011", "train")
    >>> mean, std = train.mean_std
    >>> train.transform = build_transforms(train=True, image_size_px=224, mean=mean, std=std,
    ...                                    squash=resize_squashes("cub", train.crop))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from openqpm._lazy import lazy_exports

__all__ = [
    "DATASET_STATS",
    "DatasetError",
    "ImageDataset",
    "build_transforms",
    "check_dataset",
    "compute_mean_std",
    "create_dataset",
    "dataset_names",
    "detect_dataset",
    "make_synthetic",
    "register_dataset",
    "render_preview",
    "resize_squashes",
]

# public name -> module that defines it
_LAZY = {
    "DatasetError": "openqpm.data._base",
    "ImageDataset": "openqpm.data._base",
    "create_dataset": "openqpm.data._registry",
    "dataset_names": "openqpm.data._registry",
    "register_dataset": "openqpm.data._registry",
    "resize_squashes": "openqpm.data._registry",
    "DATASET_STATS": "openqpm.data.transforms",
    "build_transforms": "openqpm.data.transforms",
    "compute_mean_std": "openqpm.data.transforms",
    "check_dataset": "openqpm.data.check",
    "detect_dataset": "openqpm.data.check",
    "make_synthetic": "openqpm.data.synthetic",
    "render_preview": "openqpm.data.synthetic",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from openqpm.data._base import DatasetError, ImageDataset
    from openqpm.data._registry import (
        create_dataset,
        dataset_names,
        register_dataset,
        resize_squashes,
    )
    from openqpm.data.check import check_dataset, detect_dataset
    from openqpm.data.synthetic import make_synthetic, render_preview
    from openqpm.data.transforms import DATASET_STATS, build_transforms, compute_mean_std


__getattr__, __dir__ = lazy_exports("openqpm.data", globals(), _LAZY, __all__)
