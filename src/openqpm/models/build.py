"""Building a run's dense model from its configuration and its training set."""

from __future__ import annotations

from typing import Any

from openqpm.config import DataConfig, ModelConfig, resolved_reduced_strides
from openqpm.models.backbones import create_backbone
from openqpm.models.head import DenseHead
from openqpm.models.model import QPMModel

__all__ = ["dense_model_for"]


def dense_model_for(model: ModelConfig, data: DataConfig, train_set: Any) -> QPMModel:
    """A new dense model (backbone + linear head) for ``train_set``'s classes.

    The backbone's weights come from ``model.weights`` when given. The saved model's metadata
    records what a user needs to feed it new images: the data set, the input size, the crop and
    the normalisation of the training set.

    Args:
        model: the backbone, its weights file and the dense head's dropout.
        data: the data set name, input size and crop of the run.
        train_set: a data set with ``n_classes``, ``class_names`` and ``mean_std``.

    Returns:
        The model, on the CPU, in training mode.
    """
    backbone = create_backbone(
        model.arch, weights_path=model.weights, reduced_strides=resolved_reduced_strides(model)
    )
    head = DenseHead(backbone.n_features, train_set.n_classes, dropout=model.dense_dropout)
    mean, std = train_set.mean_std
    metadata = {
        "dataset": data.dataset,
        "image_size_px": data.image_size_px,
        "crop": data.crop,
        "data_mean": list(mean),
        "data_std": list(std),
    }
    return QPMModel(backbone, head, class_names=list(train_set.class_names), metadata=metadata)
