"""The features pass: one sweep of a model over a loader, streaming what the constants need.

For every image the backbone's maps (n_f, h, w) are summarised into three per-feature numbers
(the spatial mean, the peak of the spatial softmax and where that peak is) and fed straight into
the streaming accumulators of :mod:`openqpm.constants`. Nothing per image is kept unless asked for
(``keep_pooled=True`` keeps the pooled features, N x n_f float32), so the memory does not grow with
the data set.

The pipeline passes a loader over the *training* images with the *test* transforms: every QP
constant (A, R and the locality bias b) and the QPM head's normalisation come from this one pass
over un-augmented images. For A, R and the normalisation the reference code does the same. Its b
differs (spec §2.3): it runs three further passes with the *training* augmentation active, each
drawing other random views of the images, and pairs their results by index. We compute b from
the same un-augmented pass on purpose: one pass instead of three, the same result on every
rerun, and statistics of the very views A and the normalisation describe. So our b is not the
reference code's number for number.

Under ``torch.distributed`` every rank reads its own shard of the data set and the statistics are
summed across ranks; the result equals a single-process pass up to floating-point summation
order.

Example:
    >>> fp = extract_features(model, loader, device="cpu", keep_pooled=False)
    >>> problem, report = build_problem(fp.feature_stats, fp.map_stats, n_features=50)
    >>> save_feature_pass(run_dir / "features", fp)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch.utils.data import DataLoader

from openqpm import distributed
from openqpm._io import atomic_path, atomic_write_text, eval_mode, unpack_batch
from openqpm.constants import FeatureStatistics, MapStatistics

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from openqpm.models.model import QPMModel

__all__ = [
    "FeaturePass",
    "FeaturePassProgress",
    "extract_features",
    "load_feature_pass",
    "save_feature_pass",
    "summarize_feature_maps_torch",
]

_logger = logging.getLogger(__name__)

_FORMAT = "openqpm.feature_pass"
_FORMAT_VERSION = 1
_TENSORS_FILE = "feature_pass.safetensors"
_METADATA_FILE = "feature_pass.json"


@dataclass
class FeaturePass:
    """What one features pass produced.

    Attributes:
        feature_stats: streaming statistics of the pooled features and the labels (class-feature
            correlations, per-feature mean and std).
        map_stats: the per-feature map statistics the locality and center biases need.
        pooled: (N, n_f) float32 pooled features in dataset order, or None with
            ``keep_pooled=False``.
        labels: (N,) int64 labels in dataset order, or None with ``keep_pooled=False``.
    """

    feature_stats: FeatureStatistics
    map_stats: MapStatistics
    pooled: np.ndarray | None
    labels: np.ndarray | None


@dataclass(frozen=True)
class FeaturePassProgress:
    """One progress event of the features pass, sent after every batch.

    Attributes:
        step: batches done (1-based).
        n_steps: batches in this rank's pass.
        n_images: images done on this rank.
        elapsed_s: seconds since the pass started.
        eta_s: estimated seconds left.
    """

    step: int
    n_steps: int
    n_images: int
    elapsed_s: float
    eta_s: float


def summarize_feature_maps_torch(
    feature_maps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-feature summaries of a batch of maps, in torch (on the maps' device).

    The same quantities as :func:`openqpm.constants.summarize_feature_maps` (its numpy
    reference): the spatial mean, the largest value of the spatial softmax, and the flat position
    of the map's maximum (the first one on ties, as ``numpy.argmax``).

    Args:
        feature_maps: (B, n_f, h, w) maps.

    Returns:
        ``(pooled, peak_softmax, peak_index)``, each (B, n_f); the first two in the maps' dtype,
        the last int64 in [0, h*w).
    """
    if feature_maps.ndim != 4:
        raise ValueError(
            f"feature maps must be (B, n_f, h, w), got shape {tuple(feature_maps.shape)}"
        )
    flat = feature_maps.flatten(2)  # (B, n_f, h*w)
    pooled = flat.mean(dim=2)  # (B, n_f)
    peak_value, peak_index = flat.max(dim=2)  # (B, n_f) each
    # The softmax's largest entry is exp(0) / sum_j exp(x_j - max): one exp pass, no (B, n_f, h*w)
    # softmax tensor kept around.
    peak_softmax = 1.0 / torch.exp(flat - peak_value.unsqueeze(2)).sum(dim=2)  # (B, n_f)
    return pooled, peak_softmax, peak_index


def _n_classes_of(model: QPMModel, loader: DataLoader) -> int:
    class_names = getattr(model, "class_names", None)
    if class_names is not None:
        return len(class_names)
    n_classes = getattr(loader.dataset, "n_classes", None)
    if n_classes is None:
        raise ValueError(
            "cannot tell the number of classes: the model has no class_names and the data set "
            "no n_classes"
        )
    return int(n_classes)


def _reduce(statistics: Any) -> Any:
    """Merge a streaming accumulator over all ranks, in rank order, with its own ``merge``.

    Gathered rather than summed with an all-reduce: not every array of an accumulator is a sum
    (MapStatistics keeps the map size), and ``merge`` knows which are.
    """
    if not distributed.is_distributed():
        return statistics
    cls = type(statistics)
    parts = [cls.from_arrays(p) for p in distributed.all_gather_arrays(statistics.to_arrays())]
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    return merged


@torch.no_grad()
def extract_features(
    model: QPMModel,
    loader: DataLoader,
    *,
    device: torch.device | str,
    keep_pooled: bool = True,
    progress: Callable[[FeaturePassProgress], None] | None = None,
) -> FeaturePass:
    """One pass of ``model`` over ``loader`` in eval mode, streaming feature and map statistics.

    The model is moved to ``device`` and put in eval mode for the pass (its previous training
    mode is restored afterwards). Memory is O(batch) with ``keep_pooled=False``.

    Args:
        model: a :class:`openqpm.models.QPMModel` (anything with ``forward_features``).
        loader: yields ``(images, labels)``; for the QP constants, the training images with the
            test transforms and no shuffling (dataset order is the order of ``pooled``).
        device: where the forward passes run.
        keep_pooled: also return the pooled features and labels of every image.
        progress: called after every batch with a :class:`FeaturePassProgress`.

    Returns:
        A :class:`FeaturePass`. Under torch.distributed, every rank gets the statistics summed
        over all ranks and (with ``keep_pooled``) all pooled features in dataset order.

    Raises:
        ValueError: the loader is empty or does not yield ``(images, labels)``, or the model's
            maps are not 4-D.
    """
    device = torch.device(device)
    loader = distributed.shard_loader(loader)
    n_classes = _n_classes_of(model, loader)
    model.to(device)
    # Made before the first batch (not from its shape) so that a rank with no image still
    # takes part in the reductions below.
    n_features = int(model.backbone.n_features)
    feature_stats = FeatureStatistics(n_features, n_classes)
    map_stats = MapStatistics(n_features)
    expected_rows = _expected_rows(loader)
    pooled_rows = _RowBuffer((n_features,), np.float32, capacity=expected_rows)
    label_rows = _RowBuffer((), np.int64, capacity=expected_rows)
    n_steps = len(loader)
    n_images = 0
    start = time.perf_counter()
    with eval_mode(model):
        for step, batch in enumerate(loader, start=1):
            images, labels = unpack_batch(batch)
            feature_maps = model.forward_features(images.to(device, non_blocking=True))
            pooled_t, peak_softmax_t, peak_index_t = summarize_feature_maps_torch(
                feature_maps.float()
            )
            pooled = pooled_t.cpu().numpy()
            labels_np = labels.cpu().numpy().astype(np.int64, copy=False)
            map_height, map_width = int(feature_maps.shape[2]), int(feature_maps.shape[3])
            feature_stats.update(pooled.astype(np.float64), labels_np)
            map_stats.update(
                pooled.astype(np.float64),
                peak_softmax_t.cpu().numpy().astype(np.float64),
                peak_index_t.cpu().numpy(),
                map_height=map_height,
                map_width=map_width,
            )
            if keep_pooled:
                pooled_rows.append(pooled)
                label_rows.append(labels_np)
            n_images += pooled.shape[0]
            if progress is not None:
                elapsed_s = time.perf_counter() - start
                progress(
                    FeaturePassProgress(
                        step=step,
                        n_steps=n_steps,
                        n_images=n_images,
                        elapsed_s=elapsed_s,
                        eta_s=elapsed_s / step * max(n_steps - step, 0),
                    )
                )
    feature_stats = _reduce(feature_stats)
    map_stats = _reduce(map_stats)
    if feature_stats.count == 0:
        raise ValueError("features pass: the loader yielded no batch (empty data set?)")
    pooled_all: np.ndarray | None = None
    labels_all: np.ndarray | None = None
    if keep_pooled:
        pooled_all = _gather_in_dataset_order(pooled_rows.rows(), loader)
        labels_all = _gather_in_dataset_order(label_rows.rows(), loader)
    _logger.info(
        "features pass: %d images on this rank in %.1f s", n_images, time.perf_counter() - start
    )
    return FeaturePass(feature_stats, map_stats, pooled_all, labels_all)


def _expected_rows(loader: DataLoader) -> int:
    """How many images this rank's loader will yield, when it can tell (else a guess)."""
    try:
        return max(len(loader.sampler), 1)  # type: ignore[arg-type]
    except TypeError:  # an iterable-style data set has no length
        return 1024


class _RowBuffer:
    """Rows appended batch by batch into one preallocated array (doubled when full).

    Keeping a list of small per-batch arrays instead would scatter them between the large
    temporary activations on the heap, which then cannot be returned to the system: the resident
    memory grew ~70 times faster than the kept rows in the features-pass benchmark.
    """

    def __init__(self, row_shape: tuple[int, ...], dtype: type, *, capacity: int) -> None:
        self._array: np.ndarray = np.empty((max(capacity, 1), *row_shape), dtype=dtype)
        self._n_rows = 0

    def append(self, rows: np.ndarray) -> None:
        end = self._n_rows + rows.shape[0]
        if end > self._array.shape[0]:
            capacity = max(end, 2 * self._array.shape[0])
            grown = np.empty((capacity, *self._array.shape[1:]), dtype=self._array.dtype)
            grown[: self._n_rows] = self._array[: self._n_rows]
            self._array = grown
        self._array[self._n_rows : end] = rows
        self._n_rows = end

    def rows(self) -> np.ndarray:
        """The rows appended so far (a view when the buffer is exactly full, else a copy)."""
        if self._n_rows == self._array.shape[0]:
            return self._array
        return self._array[: self._n_rows].copy()


def _gather_in_dataset_order(rows: np.ndarray, loader: DataLoader) -> np.ndarray:
    """Put every rank's rows back in dataset order (rank r held items r, r + W, ...)."""
    if not distributed.is_distributed():
        return rows
    per_rank = distributed.all_gather_rows(rows)
    n_ranks = len(per_rank)
    n_total = sum(part.shape[0] for part in per_rank)
    merged = np.empty((n_total, *rows.shape[1:]), dtype=rows.dtype)
    for rank_index, part in enumerate(per_rank):
        merged[rank_index::n_ranks] = part
    return merged


# ----------------------------------------------------------------------------- save / load


def save_feature_pass(path_dir: str | os.PathLike[str], feature_pass: FeaturePass) -> Path:
    """Write a features pass to a folder: ``feature_pass.safetensors`` + ``feature_pass.json``.

    The tensors file holds every accumulator array (``feature_stats.<name>``,
    ``map_stats.<name>``) and, when kept, ``pooled`` and ``labels``; the JSON file names the
    format and the sizes. Each file is written atomically. No pickle.

    Args:
        path_dir: the folder (created if missing).
        feature_pass: what :func:`extract_features` returned.

    Returns:
        The folder.
    """
    folder = Path(path_dir)
    arrays: dict[str, np.ndarray] = {}
    for prefix, statistics in (
        ("feature_stats", feature_pass.feature_stats),
        ("map_stats", feature_pass.map_stats),
    ):
        for name, array in statistics.to_arrays().items():
            # np.array, not np.ascontiguousarray: the latter turns 0-d counts into 1-d arrays
            arrays[f"{prefix}.{name}"] = np.array(array, order="C", copy=True)
    if feature_pass.pooled is not None:
        arrays["pooled"] = np.ascontiguousarray(feature_pass.pooled, dtype=np.float32)
    if feature_pass.labels is not None:
        arrays["labels"] = np.ascontiguousarray(feature_pass.labels, dtype=np.int64)
    metadata = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "n_images": int(feature_pass.feature_stats.count),
        "has_pooled": feature_pass.pooled is not None,
        "tensors_file": _TENSORS_FILE,
        "keys": sorted(arrays),
    }
    with atomic_path(folder / _TENSORS_FILE) as temporary:
        save_file(arrays, str(temporary))
    # The JSON is written last: a folder with a JSON file holds a complete tensors file.
    atomic_write_text(folder / _METADATA_FILE, json.dumps(metadata, indent=2, sort_keys=True))
    return folder


def load_feature_pass(path_dir: str | os.PathLike[str]) -> FeaturePass:
    """Read a folder written by :func:`save_feature_pass`.

    Args:
        path_dir: the folder.

    Returns:
        The :class:`FeaturePass`.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the files are not an openqpm features pass, or they disagree.
    """
    folder = Path(path_dir)
    metadata_path = folder / _METADATA_FILE
    tensors_path = folder / _TENSORS_FILE
    for path in (metadata_path, tensors_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the features pass first")
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{metadata_path} is not valid JSON: {error}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT:
        raise ValueError(f"{metadata_path} is not an openqpm features pass (no format {_FORMAT})")
    if metadata.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"{metadata_path}: format_version {metadata.get('format_version')!r} is not "
            f"{_FORMAT_VERSION}, the one this openqpm reads"
        )
    arrays = load_file(str(tensors_path))
    if sorted(arrays) != sorted(metadata.get("keys", [])):
        raise ValueError(
            f"{tensors_path} holds {sorted(arrays)}, but {metadata_path} lists "
            f"{metadata.get('keys')}: the two files are from different runs"
        )

    def with_prefix(prefix: str) -> dict[str, np.ndarray]:
        return {
            key[len(prefix) + 1 :]: value
            for key, value in arrays.items()
            if key.startswith(prefix + ".")
        }

    feature_stats = FeatureStatistics.from_arrays(with_prefix("feature_stats"))
    map_stats = MapStatistics.from_arrays(with_prefix("map_stats"))
    pooled = arrays.get("pooled")
    labels = arrays.get("labels")
    if pooled is not None and pooled.shape[0] != int(metadata["n_images"]):
        raise ValueError(
            f"{tensors_path}: pooled has {pooled.shape[0]} rows, "
            f"the metadata says {metadata['n_images']} images"
        )
    return FeaturePass(feature_stats, map_stats, pooled, labels)
