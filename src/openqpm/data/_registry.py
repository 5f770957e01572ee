"""The registry of data set loaders: ``register_dataset``, ``create_dataset``, ``dataset_names``.

Each loader module registers one or more names with a loader (``root, split -> ImageDataset``),
a layout detector and a validator. The built-in modules are imported on first use, so importing
``openqpm.data`` stays cheap.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from openqpm.data._base import DatasetError, FolderReport, ImageDataset, normalise_split

__all__ = [
    "DatasetSpec",
    "create_dataset",
    "dataset_names",
    "dataset_spec",
    "register_dataset",
    "resize_squashes",
    "resolved_crop",
]

Loader = Callable[..., ImageDataset]
Detector = Callable[[Path], bool]
Validator = Callable[[Path], FolderReport]

_BUILTIN_MODULES = (
    "openqpm.data.cub",
    "openqpm.data.synthetic_loader",
    "openqpm.data.travelingbirds",
    "openqpm.data.cars",
    "openqpm.data.aircraft",
    "openqpm.data.folder",
)


@dataclass(frozen=True)
class DatasetSpec:
    """A registered data set.

    Attributes:
        name: the registry name.
        loader: ``loader(root, split, *, transform, crop, **options) -> ImageDataset``; ``split``
            is already normalised to ``"train"`` or ``"test"``.
        detect: ``detect(root) -> bool``, whether ``root`` looks like this layout.
        validate: ``validate(root) -> FolderReport``: problems of the index files and the
            images (with boxes) that :func:`openqpm.data.check_dataset` then verifies.
        description: one line for listings and error messages.
        priority: detection order, lowest first: a more specific layout must be tried before a
            more general one that also matches it (the synthetic set is also a CUB folder).
        squash_when_cropped: images cropped to their box are resized to a square without
            keeping the aspect ratio (squashed), as the reference code does for the birds; the
            others are resized by their shorter side and centre-cropped.
        crop_by_default: whether a run crops the images to their ground-truth box when its
            configuration leaves ``data.crop`` null (see :func:`resolved_crop`). The
            paper crops CUB-200-2011 and TravelingBirds (and the synthetic set is made like
            them); Stanford Cars, FGVC-Aircraft, ImageNet and plain folders are not cropped.
    """

    name: str
    loader: Loader
    detect: Detector
    validate: Validator
    description: str
    priority: int
    squash_when_cropped: bool = False
    crop_by_default: bool = False


_REGISTRY: dict[str, DatasetSpec] = {}
_builtins_loaded = False


def register_dataset(
    name: str,
    *,
    detect: Detector,
    validate: Validator,
    description: str,
    priority: int = 100,
    squash_when_cropped: bool = False,
    crop_by_default: bool = False,
) -> Callable[[Loader], Loader]:
    """Register a loader under ``name`` (decorator).

    Args:
        name: the registry name; lower case.
        detect: whether a folder looks like this layout.
        validate: the problems of a folder of this layout and the images it uses.
        description: one line describing the expected layout.
        priority: detection order, lowest first (built-in layouts use 10 to 90).
        squash_when_cropped: box-cropped images are squashed to a square (see
            :class:`DatasetSpec`).
        crop_by_default: runs crop to the box unless configured otherwise (see
            :class:`DatasetSpec`).

    Returns:
        The decorator, which returns the loader unchanged.

    Raises:
        ValueError: the name is already registered.

    Example:
        >>> @register_dataset("mine", detect=lambda root: False, validate=lambda root: [],
        ...                   description="my layout")
        ... def _load_mine(root, split, *, transform=None, crop=True):
        ...     ...
    """

    def decorator(loader: Loader) -> Loader:
        if name in _REGISTRY:
            raise ValueError(f"data set {name!r} is already registered")
        _REGISTRY[name] = DatasetSpec(
            name,
            loader,
            detect,
            validate,
            description,
            priority,
            squash_when_cropped=squash_when_cropped,
            crop_by_default=crop_by_default,
        )
        return loader

    return decorator


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _builtins_loaded = True


def dataset_names() -> list[str]:
    """Names accepted by :func:`create_dataset`, in detection order."""
    _load_builtins()
    return sorted(_REGISTRY, key=lambda name: (_REGISTRY[name].priority, name))


def dataset_spec(name: str) -> DatasetSpec:
    """The registered spec of ``name``.

    Raises:
        DatasetError: unknown name; the message lists the valid ones.
    """
    _load_builtins()
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise DatasetError(f"unknown data set {name!r}; valid: {', '.join(dataset_names())}")
    return _REGISTRY[key]


def resize_squashes(name: str, crop: bool) -> bool:
    """Whether the transforms squash the images of data set ``name`` to a square.

    True for the bird layouts (CUB, TravelingBirds, the synthetic set) when their images are
    cropped to the box, as in the reference code; the transforms otherwise resize the shorter
    side and centre-crop (``build_transforms(..., squash=resize_squashes(name, crop))``).

    Args:
        name: a registered data set name.
        crop: whether the images are cropped to their ground-truth box.

    Raises:
        DatasetError: unknown name; the message lists the valid ones.

    Example:
        >>> resize_squashes("cub", True), resize_squashes("cub", False)
        (True, False)
    """
    return dataset_spec(name).squash_when_cropped and bool(crop)


def resolved_crop(name: str, crop: bool | None) -> bool:
    """Whether a run crops the images of data set ``name`` to their ground-truth box.

    ``data.crop`` of a configuration, with None meaning the data set's own default
    (:attr:`DatasetSpec.crop_by_default`: on for CUB-200-2011, TravelingBirds and the synthetic
    set, as in the paper; off for the others). The one place that decides it: the pipeline's
    data sets and the saved model's metadata both ask here.

    Args:
        name: a registered data set name.
        crop: the configured value; None for the data set's default.

    Raises:
        DatasetError: unknown name; the message lists the valid ones.

    Example:
        >>> resolved_crop("cub", None), resolved_crop("cars", None), resolved_crop("cub", False)
        (True, False, False)
    """
    if crop is None:
        return dataset_spec(name).crop_by_default
    return bool(crop)


def create_dataset(
    name: str,
    root: str | os.PathLike[str],
    split: str,
    *,
    transform: Callable[[Image.Image], Any] | None = None,
    crop: bool = True,
    **options: Any,
) -> ImageDataset:
    """Load one split of a data set folder.

    Args:
        name: a name from :func:`dataset_names` (``cub``, ``synthetic``, ``travelingbirds``,
            ``cars``, ``aircraft``, ``imagenet``, ``imagefolder``).
        root: the data set folder, in the layout the README documents for ``name``.
        split: ``train`` or ``test`` (aliases ``trainval``, ``val``).
        transform: applied to each PIL image; None returns PIL images.
        crop: crop each image to its ground-truth box where the data set has boxes (CUB,
            TravelingBirds, the synthetic set, Cars, Aircraft); ignored elsewhere.
        **options: loader-specific options, e.g. ``cub_root`` for ``travelingbirds``.

    Returns:
        The data set object (``torch.utils.data.Dataset`` of ``(image, label)``).

    Raises:
        DatasetError: unknown name or split, or the folder is not usable (every problem named).

    Example:
        >>> train = create_dataset("cub", "~/data/CUB_200_2011", "train")
        >>> image, label = train[0]
    """
    spec = dataset_spec(name)
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{folder}: data set folder not found (for {spec.name!r})")
    return spec.loader(folder, normalise_split(split), transform=transform, crop=crop, **options)
