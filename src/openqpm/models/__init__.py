"""Models: backbones (feature maps), heads (dense, QPM and sparse) and the QPMModel with
save/load."""

from __future__ import annotations

from openqpm.models.backbones import (
    Backbone,
    backbone_names,
    check_image_size,
    check_n_features,
    create_backbone,
    register_backbone,
)
from openqpm.models.head import DenseHead, QPMHead, SparseHead
from openqpm.models.model import (
    QPMModel,
    load,
    qpm_from_dense,
    read_metadata,
    sparse_from_dense,
)

__all__ = [
    "Backbone",
    "DenseHead",
    "QPMHead",
    "QPMModel",
    "SparseHead",
    "backbone_names",
    "check_image_size",
    "check_n_features",
    "create_backbone",
    "load",
    "qpm_from_dense",
    "read_metadata",
    "register_backbone",
    "sparse_from_dense",
]
