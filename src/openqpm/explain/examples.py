"""Choosing images to show: one pass over a data set, then example and top-image choices.

:func:`scan_dataset` runs the model once over a data set and keeps per image only small
summaries (prediction, runner-up, the head's input features, each feature map's peak and the
spatial distinctness of the predicted class's maps). The choices below work on that summary, so
showing 200 classes costs one pass, not 200.

The reference code can pick a misclassified image as a class's example (spec §5.3); here the
candidates are filtered to correctly classified images *before* scoring, so it cannot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from openqpm._io import eval_mode
from openqpm.metrics import diversity_scores

_logger = logging.getLogger(__name__)

__all__ = ["DatasetScan", "choose_example", "class_mistakes", "scan_dataset", "top_activating"]

ProgressCallback = Callable[[str, int, int], None]


@dataclass
class DatasetScan:
    """Per-image summaries of one model pass over a data set (index = data set index).

    Attributes:
        labels: (N,) true classes.
        predictions: (N,) predicted classes.
        runner_up: (N,) the class with the second largest logit.
        logit_margin: (N,) predicted logit minus runner-up logit.
        features: (N, K) float32, what the class weights multiply (QPM: normalised features).
        peak_activations: (N, K) float32, the spatial maximum of each head feature map.
        distinctness: (N,) float32 in [1/k, 1]: SID-style spatial diversity of the predicted
            class's (up to 5) most weighted maps; high when they peak in different places.
    """

    labels: np.ndarray
    predictions: np.ndarray
    runner_up: np.ndarray
    logit_margin: np.ndarray
    features: np.ndarray
    peak_activations: np.ndarray
    distinctness: np.ndarray

    @property
    def correct(self) -> np.ndarray:
        """(N,) bool, whether each image is classified correctly."""
        return self.predictions == self.labels


@torch.no_grad()
def scan_dataset(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    num_workers: int = 0,
    progress: ProgressCallback | None = None,
) -> DatasetScan:
    """Run ``model`` over ``dataset`` once and keep the per-image summaries.

    Memory is O(N * K) for the features and peaks (K = head features) plus one batch of maps.

    Args:
        model: an ``openqpm.QPMModel``; put in eval mode for the pass, training flag restored.
        dataset: yields (image tensor, label) in index order.
        device: where the forward passes run.
        batch_size: images per forward pass.
        num_workers: DataLoader workers.
        progress: called as ``progress("scan", done_batches, total_batches)``.

    Returns:
        The :class:`DatasetScan`.

    Raises:
        ValueError: on an empty data set or a model with fewer than two classes.
    """
    qpm: Any = model
    weights = qpm.class_weights().detach().float().cpu()  # (n_c, K)
    if weights.shape[0] < 2:
        raise ValueError("explanations need a model with at least two classes")
    # SID@5 where every class has 5 features, else as many as the smallest class has
    n_per_image = int(min(5, max(1, int((weights != 0).sum(dim=1).min()))))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    parts: dict[str, list[np.ndarray]] = {
        name: [] for name in ("labels", "predictions", "runner_up", "margin", "features", "peaks")
    }
    distinct: list[np.ndarray] = []
    with eval_mode(model):
        for batch_index, (images, labels) in enumerate(loader):
            backbone_maps = qpm.forward_features(images.to(device))  # (B, n_f, h, w)
            logits = qpm.forward_head(backbone_maps).float()  # (B, n_c)
            top_two = logits.topk(2, dim=1)
            maps = qpm.head_feature_maps(backbone_maps).float()  # (B, K, h, w)
            features = qpm.forward_head(backbone_maps, pre_logits=True).float()  # (B, K)
            predictions = top_two.indices[:, 0]
            distinct.append(
                diversity_scores(maps, weights, predictions, k=n_per_image).cpu().numpy()
            )
            parts["labels"].append(torch.as_tensor(labels).numpy())
            parts["predictions"].append(predictions.cpu().numpy())
            parts["runner_up"].append(top_two.indices[:, 1].cpu().numpy())
            parts["margin"].append((top_two.values[:, 0] - top_two.values[:, 1]).cpu().numpy())
            parts["features"].append(features.cpu().numpy())
            parts["peaks"].append(maps.flatten(2).amax(dim=2).cpu().numpy())  # (B, K)
            if progress is not None:
                progress("scan", batch_index + 1, len(loader))
    if not parts["labels"]:
        raise ValueError("the data set is empty")
    return DatasetScan(
        labels=np.concatenate(parts["labels"]).astype(np.int64),
        predictions=np.concatenate(parts["predictions"]).astype(np.int64),
        runner_up=np.concatenate(parts["runner_up"]).astype(np.int64),
        logit_margin=np.concatenate(parts["margin"]).astype(np.float32),
        features=np.concatenate(parts["features"]).astype(np.float32),
        peak_activations=np.concatenate(parts["peaks"]).astype(np.float32),
        distinctness=np.concatenate(distinct).astype(np.float32),
    )


def example_scores(scan: DatasetScan, class_features: list[int]) -> np.ndarray:
    """How good each image is as an example of a class with these features (higher is better).

    score = distinctness x sigmoid(weakest of the class's features): the class's maps should
    peak in different places and *all* its features should be active. The score says nothing
    about correctness; :func:`choose_example` filters for that first.

    Args:
        scan: the data set summary.
        class_features: the class's features (head indices).

    Returns:
        (N,) scores in (0, 1).
    """
    if not class_features:
        return np.zeros(len(scan.labels), dtype=np.float64)
    weakest = scan.features[:, class_features].min(axis=1).astype(np.float64)  # (N,)
    activity = 1.0 / (1.0 + np.exp(-weakest))
    return scan.distinctness.astype(np.float64) * activity


def choose_example(scan: DatasetScan, class_features: list[int], class_index: int) -> int | None:
    """The best example image of a class: correctly classified, features active and distinct.

    Only images whose label *and* prediction are ``class_index`` are candidates; among them the
    highest :func:`example_scores` wins (the lowest index on ties).

    Args:
        scan: the data set summary.
        class_features: the class's features (head indices).
        class_index: the class.

    Returns:
        A data set index, or None when no image of the class is classified correctly.
    """
    candidates = np.flatnonzero((scan.labels == class_index) & (scan.predictions == class_index))
    if len(candidates) == 0:
        return None
    scores = example_scores(scan, class_features)[candidates]
    return int(candidates[int(np.argmax(scores))])


def class_mistakes(scan: DatasetScan, class_index: int) -> np.ndarray:
    """Images of a class that the model gets wrong, most confidently wrong first.

    Args:
        scan: the data set summary.
        class_index: the true class.

    Returns:
        Data set indices.
    """
    wrong = np.flatnonzero((scan.labels == class_index) & (scan.predictions != class_index))
    order = np.argsort(-scan.logit_margin[wrong], kind="stable")
    return wrong[order]


def top_activating(scan: DatasetScan, feature_index: int, *, n_images: int = 8) -> np.ndarray:
    """The images on which one feature is strongest (pooled value), strongest first.

    Args:
        scan: the data set summary.
        feature_index: head feature index.
        n_images: how many.

    Returns:
        Up to ``n_images`` data set indices.

    Raises:
        IndexError: for a feature index out of range.
    """
    if not 0 <= feature_index < scan.features.shape[1]:
        raise IndexError(f"feature {feature_index} out of range [0, {scan.features.shape[1]})")
    order = np.argsort(-scan.features[:, feature_index], kind="stable")
    return order[:n_images]
