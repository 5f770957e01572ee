"""Models: backbones (feature maps), heads (dense and QPM) and the QPMModel with save/load."""

from __future__ import annotations

from openqpm.models.backbones import (
    Backbone,
    backbone_names,
    check_image_size,
    check_n_features,
    create_backbone,
    register_backbone,
)
from openqpm.models.head import DenseHead, QPMHead
from openqpm.models.model import QPMModel, load, qpm_from_dense, read_metadata

__all__ = [
    "Backbone",
    "DenseHead",
    "QPMHead",
    "QPMModel",
    "backbone_names",
    "check_image_size",
    "check_n_features",
    "create_backbone",
    "load",
    "qpm_from_dense",
    "read_metadata",
    "register_backbone",
]
