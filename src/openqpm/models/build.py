"""Building a run's dense model from its configuration and its training set."""

from __future__ import annotations

import logging
from typing import Any

import torch

from openqpm.config import DataConfig, ModelConfig, resolved_reduced_strides
from openqpm.models.backbones import Backbone, create_backbone
from openqpm.models.head import DenseHead
from openqpm.models.model import QPMModel

__all__ = ["PretrainedHeadError", "dense_model_for"]

_logger = logging.getLogger(__name__)


class PretrainedHeadError(ValueError):
    """The pretrained classifier must be the dense head but cannot be; the message says why."""


def dense_model_for(
    model: ModelConfig,
    data: DataConfig,
    train_set: Any,
    *,
    require_pretrained_head: bool = False,
) -> QPMModel:
    """A new dense model (backbone + linear head) for ``train_set``'s classes.

    The backbone's weights come from ``model.weights`` when given. So does the dense head when
    the file holds the backbone's published classifier (``fc`` of the torchvision ResNets and
    Inception-v3) with ``train_set``'s number of classes, as the reference code does for
    ImageNet: the classifier's class order must then be the data set's (the ImageNet loader
    orders the classes by WordNet id, as torchvision's checkpoints do). Otherwise the head
    starts from PyTorch's default initialisation, with a warning that says why when a file was
    given.

    The saved model's metadata records what a user needs to feed it new images: the data set,
    the input size, the crop (resolved for the data set), the augmentation recipe (whose test
    transform it implies) and the normalisation of the training set.

    Args:
        model: the backbone, its weights file and the dense head's dropout.
        data: the data set name, input size, crop and augmentation of the run.
        train_set: a data set with ``n_classes``, ``class_names`` and ``mean_std``.
        require_pretrained_head: the head must come from the weights file (``dense.skip``: the
            pretrained model is the dense model, and a random head would be meaningless).

    Returns:
        The model, on the CPU, in training mode.

    Raises:
        PretrainedHeadError: ``require_pretrained_head`` and the head cannot come from the file;
            the message names the file and the class counts.
    """
    from openqpm.data._registry import resolved_crop

    backbone = create_backbone(
        model.arch, weights_path=model.weights, reduced_strides=resolved_reduced_strides(model)
    )
    n_classes = int(train_set.n_classes)
    head = DenseHead(backbone.n_features, n_classes, dropout=model.dense_dropout)
    problem = _load_pretrained_head(head, backbone, model.weights, data.dataset)
    if problem is not None:
        if require_pretrained_head:
            raise PretrainedHeadError(
                f"dense.skip=true takes the pretrained model as the dense model, but {problem}. "
                "Pass a weights file whose classifier fits the data set, or train the dense "
                "model (dense.skip=false)"
            )
        if model.weights is not None:
            _logger.warning("%s: the dense head starts from random weights", problem)
    mean, std = train_set.mean_std
    crop = resolved_crop(data.dataset, data.crop)
    metadata = {
        "dataset": data.dataset,
        "image_size_px": data.image_size_px,
        # what the images were really cropped to (a set without boxes is never cropped)
        "crop": bool(getattr(train_set, "crop", crop)),
        "augment": data.augment,
        "data_mean": list(mean),
        "data_std": list(std),
    }
    return QPMModel(backbone, head, class_names=list(train_set.class_names), metadata=metadata)


def _load_pretrained_head(
    head: DenseHead, backbone: Backbone, weights: str | None, dataset: str
) -> str | None:
    """Copy the file's classifier into ``head``; None when done, else why it cannot be."""
    n_classes, n_features = head.n_classes, head.n_features_in
    if weights is None:
        return "model.weights is null, so there is no pretrained classifier"
    if backbone.classifier_keys is None:
        return (
            f"the published classifier of backbone {backbone.name!r} does not read its feature "
            f"maps as openqpm computes them, so '{weights}' cannot provide the dense head"
        )
    classifier = backbone.read_classifier(weights)
    if classifier is None:
        keys = " and ".join(backbone.classifier_keys)
        return f"the weights file '{weights}' has no classifier ({keys})"
    weight, bias = classifier
    if weight.dim() == 2 and weight.shape[1] == n_features and bias.shape == weight.shape[:1]:
        if weight.shape[0] != n_classes:
            return (
                f"the classifier in '{weights}' has {weight.shape[0]} classes and the data set "
                f"{dataset!r} has {n_classes}"
            )
    else:
        return (
            f"the classifier in '{weights}' has shapes {tuple(weight.shape)} and "
            f"{tuple(bias.shape)}, not ({n_classes}, {n_features}) and ({n_classes},)"
        )
    with torch.no_grad():
        head.linear.weight.copy_(weight)
        head.linear.bias.copy_(bias)
    _logger.info("dense head: the pretrained classifier of '%s' (%d classes)", weights, n_classes)
    return None
