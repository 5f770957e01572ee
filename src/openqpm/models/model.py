"""QPMModel: a backbone and a head, with save/load to safetensors plus JSON metadata.

The saved file holds every tensor of the model and, in the safetensors header, a JSON document
under the key ``"openqpm"`` that describes the architecture, the classes and (for a QPM or a
sparse head) the selection and the per-class features (for a QPM head also whether it applies
the CHiQPM ReLU, for a sparse head its trainability flags), so :func:`load` rebuilds the model
with no code or weights file of the run. No pickle is involved anywhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from openqpm._io import atomic_path, read_json_header
from openqpm.models.backbones import Backbone, create_backbone
from openqpm.models.head import ArrayLike, DenseHead, QPMHead, SparseHead

if TYPE_CHECKING:  # pragma: no cover - the solver is not imported at load time
    from openqpm.solver.problem import Assignment

_logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "QPMModel",
    "load",
    "qpm_from_dense",
    "read_metadata",
    "sparse_from_dense",
]

FORMAT_NAME = "openqpm-model"
# Bump when the metadata layout changes in a way older readers cannot follow. (The "sparse"
# head type did not need a bump: older readers refuse it by its unknown head type.)
# Version 2 added the QPM head's "relu" key. A reader of version 1 would ignore it and compute
# other logits, so a file is written with the lowest version that describes it: 2 only for a
# QPM head with relu=True, 1 otherwise (such files stay readable by older openqpm versions).
FORMAT_VERSION = 2
_FORMAT_VERSION_WITHOUT_RELU = 1
_METADATA_KEY = "openqpm"

Head = DenseHead | QPMHead | SparseHead


class QPMModel(nn.Module):
    """A backbone plus a dense, QPM or sparse head, with class names and free-form metadata.

    Args:
        backbone: produces the feature maps (B, n_f, h, w).
        head: a :class:`DenseHead` over all n_f channels, a :class:`QPMHead` or a
            :class:`SparseHead`.
        class_names: one readable name per class, n_c in all.
        metadata: JSON-serialisable facts saved with the model. The pipeline should set
            ``image_size_px``, ``data_mean`` and ``data_std`` (the input normalisation) and
            ``dataset``; they are written to the top level of the saved metadata.

    Raises:
        TypeError: the head is not a DenseHead, QPMHead or SparseHead.
        ValueError: the head does not fit the backbone or the number of class names.

    Example:
        >>> model = QPMModel(create_backbone("tiny_cnn"), DenseHead(32, 3),
        ...                  class_names=["a", "b", "c"])
        >>> model(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 3])
    """

    def __init__(
        self,
        backbone: Backbone,
        head: Head,
        *,
        class_names: Sequence[str],
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(head, (DenseHead, QPMHead, SparseHead)):
            raise TypeError(
                f"head must be a DenseHead, a QPMHead or a SparseHead, got {type(head).__name__}"
            )
        names = list(class_names)
        if not all(isinstance(name, str) for name in names):
            raise ValueError("class_names must be strings")
        if len(names) != head.n_classes:
            raise ValueError(
                f"{len(names)} class names given for a head with {head.n_classes} classes"
            )
        if isinstance(head, DenseHead) and head.n_features_in != backbone.n_features:
            raise ValueError(
                f"DenseHead reads {head.n_features_in} features but backbone "
                f"{backbone.name!r} has {backbone.n_features}"
            )
        if (
            isinstance(head, (QPMHead, SparseHead))
            and int(head.selected_features.max()) >= backbone.n_features
        ):
            raise ValueError(
                f"{type(head).__name__} selects channel {int(head.selected_features.max())} but "
                f"backbone {backbone.name!r} has only {backbone.n_features} channels"
            )
        self.backbone = backbone
        self.head = head
        self.class_names = names
        self.metadata: dict[str, Any] = dict(metadata or {})

    @property
    def is_qpm(self) -> bool:
        """Whether the head is a :class:`QPMHead` (False for a sparse head)."""
        return isinstance(self.head, QPMHead)

    @property
    def is_sparse(self) -> bool:
        """Whether the head is a :class:`SparseHead` (a sparse baseline's linear layer)."""
        return isinstance(self.head, SparseHead)

    @property
    def n_classes(self) -> int:
        """n_c."""
        return self.head.n_classes

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """All backbone maps (B, n_f, h, w) of normalised images (B, 3, H, W)."""
        return self.backbone(images)

    def head_feature_maps(self, feature_maps: torch.Tensor) -> torch.Tensor:
        """The maps the head reads (B, K, h, w), in head order (dense: all n_f)."""
        return self.head.select_maps(feature_maps)

    def forward_head(self, feature_maps: torch.Tensor, *, pre_logits: bool = False) -> torch.Tensor:
        """Logits (B, n_c) from backbone maps, or with ``pre_logits`` the head's input (B, K).

        The head's input is what the class weights multiply: pooled features for a dense head,
        normalised selected features for a QPM or sparse head (after dropout in training mode).
        """
        if pre_logits:
            return self.head.pre_logits(feature_maps)
        return self.head(feature_maps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_c) of normalised images (B, 3, H, W)."""
        return self.head(self.backbone(images))

    def class_weights(self) -> torch.Tensor:
        """The (n_c, K) class-feature weights, detached (use ``head.weight`` for the live one).

        For a sparse head these are the masked weights: exactly zero outside its pattern.
        """
        return self.head.weight.detach()

    def to_qpm(
        self,
        selected_features: ArrayLike,
        mean: ArrayLike,
        std: ArrayLike,
        class_feature_matrix: ArrayLike,
        *,
        dropout: float = 0.1,
        relu: bool = False,
    ) -> QPMModel:
        """A QPM built on this model's backbone (the same object, not a copy).

        Args:
            selected_features: (K,) backbone channel ids, e.g. ``Assignment.selected_features``.
            mean: (K,) training mean of the selected pooled features.
            std: (K,) training population std of the selected pooled features.
            class_feature_matrix: (n_c, K) binary, e.g. ``Assignment.class_feature_matrix()``.
            dropout: dropout on the raw pooled features during fine-tuning.
            relu: rectify the normalised features (the CHiQPM head, see :class:`QPMHead`).

        Returns:
            A new :class:`QPMModel` with the same class names and a copy of the metadata; its
            head sits on the backbone's device.

        Raises:
            ValueError: as :class:`QPMHead`, or a class count that differs from this model's.
            TypeError: ``relu`` is not a bool.
        """
        head = QPMHead(
            selected_features, mean, std, class_feature_matrix, dropout=dropout, relu=relu
        )
        if head.n_classes != self.n_classes:
            raise ValueError(
                f"class_feature_matrix has {head.n_classes} rows but the model has "
                f"{self.n_classes} classes"
            )
        head.to(_module_device(self.backbone))
        return QPMModel(
            self.backbone, head, class_names=self.class_names, metadata=dict(self.metadata)
        )

    def describe(self) -> dict[str, Any]:
        """The JSON-serialisable description :meth:`save` writes (without extra metadata)."""
        head: dict[str, Any]
        if isinstance(self.head, QPMHead):
            head = {
                "type": "qpm",
                "n_features": self.head.n_features,
                "n_per_class": self.head.n_per_class,
                "dropout": self.head.dropout.p,
                "relu": self.head.relu,
                "selected_features": self.head.selected_features.tolist(),
                "class_features": self.head.class_features,
            }
        elif isinstance(self.head, SparseHead):
            head = {
                "type": "sparse",
                "n_features": self.head.n_features,
                "dropout": self.head.dropout.p,
                "has_bias": self.head.has_bias,
                "train_normalisation": self.head.train_normalisation,
                "train_weights": self.head.train_weights,
                "train_bias": self.head.train_bias,
                "is_ternary": self.head.is_ternary,
                "n_nonzero": self.head.n_nonzero,
                "selected_features": self.head.selected_features.tolist(),
                "class_features": self.head.class_features,
            }
        else:
            head = {
                "type": "dense",
                "n_features_in": self.head.n_features_in,
                "dropout": self.head.dropout.p,
            }
        needs_relu = isinstance(self.head, QPMHead) and self.head.relu
        description: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION if needs_relu else _FORMAT_VERSION_WITHOUT_RELU,
            "openqpm_version": _openqpm_version(),
            "architecture": {
                "name": self.backbone.name,
                "reduced_strides": self.backbone.reduced_strides,
                "n_features": self.backbone.n_features,
                "options": self.backbone.options(),
            },
            "n_classes": self.n_classes,
            "class_names": list(self.class_names),
            "head": head,
            "image_size_px": self.metadata.get(
                "image_size_px", self.backbone.default_image_size_px
            ),
            "data_mean": self.metadata.get("data_mean"),
            "data_std": self.metadata.get("data_std"),
        }
        return description

    def save(self, path: str | Path, *, extra_metadata: dict[str, Any] | None = None) -> Path:
        """Write the model to a ``.safetensors`` file, atomically.

        Args:
            path: the file to write; its folder must exist.
            extra_metadata: JSON-serialisable facts added to ``metadata`` in the file only
                (e.g. the run's config hash or accuracy).

        Returns:
            The path written.

        Raises:
            ValueError: metadata that is not JSON-serialisable (the message names the key).
            FileNotFoundError: the folder does not exist.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot save model to '{path}': folder does not exist")
        user_metadata = {**self.metadata, **(extra_metadata or {})}
        for key, value in user_metadata.items():
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"model metadata {key!r} is not JSON-serialisable ({error}); "
                    "convert it to plain numbers, strings, lists or dicts"
                ) from error
        description = self.describe()
        description["metadata"] = user_metadata
        tensors = {
            key: value.detach().to("cpu").contiguous().clone()
            for key, value in self.state_dict().items()
        }
        header = {_METADATA_KEY: json.dumps(description, allow_nan=False)}
        with atomic_path(path) as temporary:
            save_file(tensors, str(temporary), metadata=header)
        _logger.info(
            "saved %s model with %d tensors to %s", description["head"]["type"], len(tensors), path
        )
        return path


def qpm_from_dense(
    dense: QPMModel,
    assignment: Assignment,
    feature_mean: ArrayLike,
    feature_std: ArrayLike,
    *,
    dropout: float,
    relu: bool = False,
) -> QPMModel:
    """The QPM of a solved assignment, on the dense model's backbone, ready for fine-tuning.

    The QPM head normalises each selected feature with fixed training-set statistics: the
    entries of ``feature_mean`` and ``feature_std`` (over all backbone features, e.g. a features
    pass's ``feature_stats.mean`` and ``.std``) at the selected features are taken.

    Args:
        dense: the trained dense model; its backbone is shared (not copied).
        assignment: an ``openqpm.solver.Assignment`` (selected features and each class's ones).
        feature_mean: (n_f,) training-set mean of every pooled backbone feature.
        feature_std: (n_f,) training-set population std of every pooled backbone feature.
        dropout: dropout on the raw pooled features during fine-tuning.
        relu: rectify the normalised features (the CHiQPM head, see :class:`QPMHead`).

    Returns:
        A new :class:`QPMModel` (see :meth:`QPMModel.to_qpm`).

    Raises:
        ValueError: statistics that are not of length n_f, or an assignment that does not fit
            the model (as :meth:`QPMModel.to_qpm`).
    """
    n_features = int(dense.backbone.n_features)
    statistics = {}
    for name, values in (("feature_mean", feature_mean), ("feature_std", feature_std)):
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (n_features,):
            raise ValueError(
                f"{name} must hold one value per backbone feature ({n_features}), got shape "
                f"{array.shape}"
            )
        statistics[name] = array
    selected = np.asarray(assignment.selected_features, dtype=np.int64)
    outside = selected[(selected < 0) | (selected >= n_features)]
    if outside.size:
        raise ValueError(
            f"the assignment selects feature {int(outside[0])} but the backbone has features "
            f"0 to {n_features - 1}"
        )
    return dense.to_qpm(
        selected,
        statistics["feature_mean"][selected],
        statistics["feature_std"][selected],
        assignment.class_feature_matrix(),
        dropout=dropout,
        relu=relu,
    )


def sparse_from_dense(
    dense: QPMModel,
    selected_features: ArrayLike,
    feature_mean: ArrayLike,
    feature_std: ArrayLike,
    weight: ArrayLike,
    bias: ArrayLike | None,
    *,
    dropout: float,
    train_normalisation: bool,
    train_weights: bool,
    train_bias: bool,
) -> QPMModel:
    """A model with a :class:`SparseHead` on the dense model's backbone (a sparse baseline).

    Unlike :func:`qpm_from_dense`, the statistics are those of the selected features only.

    Args:
        dense: the trained dense model; its backbone is shared (not copied).
        selected_features: (K,) backbone channel ids, in head order.
        feature_mean: (K,) mean of the pooled selected features, in head order.
        feature_std: (K,) std of the pooled selected features, in head order.
        weight: (n_c, K); its zeros are the sparsity pattern, kept through any training.
        bias: (n_c,), or None for no bias.
        dropout: dropout on the raw pooled features during fine-tuning.
        train_normalisation: fine-tune the mean and std.
        train_weights: fine-tune the nonzero weights.
        train_bias: fine-tune the bias.

    Returns:
        A new :class:`QPMModel` with the same class names and a copy of the metadata; its head
        sits on the backbone's device.

    Raises:
        ValueError: as :class:`SparseHead`, a selected feature outside the backbone, or a class
            count that differs from the dense model's.
    """
    head = SparseHead(
        selected_features,
        feature_mean,
        feature_std,
        weight,
        bias,
        dropout=dropout,
        train_normalisation=train_normalisation,
        train_weights=train_weights,
        train_bias=train_bias,
    )
    if head.n_classes != dense.n_classes:
        raise ValueError(
            f"weight has {head.n_classes} rows but the model has {dense.n_classes} classes"
        )
    head.to(_module_device(dense.backbone))
    return QPMModel(
        dense.backbone, head, class_names=dense.class_names, metadata=dict(dense.metadata)
    )


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a saved openqpm model, without loading its tensors.

    Args:
        path: a file written by :meth:`QPMModel.save`.

    Returns:
        The metadata dict (``format``, ``architecture``, ``class_names``, ``head``, ...).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, not written by openqpm, or a newer format.
    """
    path = Path(path)
    description = read_json_header(
        path,
        _METADATA_KEY,
        what="openqpm model",
        hint="; it may be a plain backbone checkpoint: pass it as weights_path instead",
    )
    if description.get("format") != FORMAT_NAME:
        raise ValueError(f"'{path}' metadata is not in the {FORMAT_NAME!r} format")
    version = description.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"'{path}' uses model format version {version!r}; this openqpm reads up to "
            f"{FORMAT_VERSION}: upgrade openqpm"
        )
    return description


def load(path: str | Path, *, map_location: str | torch.device = "cpu") -> QPMModel:
    """Load a model saved with :meth:`QPMModel.save`, ready for inference (eval mode).

    The backbone is rebuilt from the metadata (no weights file needed) and every tensor is
    loaded strictly.

    Args:
        path: the ``.safetensors`` file.
        map_location: the device to put the model on.

    Returns:
        The model in eval mode.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an openqpm model, or tensors that do not match the metadata.

    Example:
        >>> model = openqpm.load("runs/x/qpm.safetensors")
        >>> logits = model(images)
    """
    from safetensors.torch import load_file

    path = Path(path)
    description = read_metadata(path)
    try:
        architecture = description["architecture"]
        head_description = description["head"]
        class_names = description["class_names"]
        backbone = create_backbone(
            architecture["name"], reduced_strides=bool(architecture["reduced_strides"])
        )
        backbone.set_options(**architecture.get("options", {}))
        tensors = load_file(str(path), device="cpu")
        head: Head
        if head_description["type"] == "qpm":
            head = QPMHead(
                tensors["head.selected_features"],
                tensors["head.mean"],
                tensors["head.std"],
                tensors["head.class_feature_matrix"],
                dropout=float(head_description["dropout"]),
                # files written before the key existed hold plain QPM heads
                relu=bool(head_description.get("relu", False)),
            )
        elif head_description["type"] == "sparse":
            head = _sparse_head_from(tensors, head_description)
        elif head_description["type"] == "dense":
            head = DenseHead(
                int(head_description["n_features_in"]),
                int(description["n_classes"]),
                dropout=float(head_description["dropout"]),
            )
        else:
            raise ValueError(f"unknown head type {head_description['type']!r}")
    except KeyError as error:
        raise ValueError(f"'{path}' lacks the model entry {error}") from error
    model = QPMModel(
        backbone, head, class_names=class_names, metadata=description.get("metadata") or {}
    )
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(f"'{path}' tensors do not match its metadata: {error}") from error
    return model.to(map_location).eval()


def _sparse_head_from(tensors: dict[str, torch.Tensor], description: dict[str, Any]) -> SparseHead:
    """The sparse head a saved model describes, with the saved tensors (pattern included)."""
    has_bias = bool(description["has_bias"])
    head = SparseHead(
        tensors["head.selected_features"],
        tensors["head.mean"],
        tensors["head.std"],
        tensors["head.weight_values"],
        tensors["head.bias"] if has_bias else None,
        dropout=float(description["dropout"]),
        train_normalisation=bool(description["train_normalisation"]),
        train_weights=bool(description["train_weights"]),
        train_bias=bool(description["train_bias"]),
    )
    # A trained weight that reached exactly zero still belongs to the saved pattern, which
    # load_state_dict then restores: the mask buffer is loaded with the other tensors.
    return head


def _module_device(module: nn.Module) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


def _openqpm_version() -> str:
    import openqpm

    return str(openqpm.__version__)
