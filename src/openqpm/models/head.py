"""Classification heads: the dense head of the black-box model, the QPM head and the sparse
head of the baselines (SLDD-Model, Q-SENN, glm-saga5).

All take the backbone's feature maps (B, n_f, h, w) and expose the same small interface:

* ``select_maps(feature_maps)`` -> (B, K, h, w): the channels the head reads, in head order;
* ``pre_logits(feature_maps)`` -> (B, K): what the final linear map multiplies (dense: pooled
  features after dropout; QPM and sparse: normalised features, dropout applied before
  normalisation, and for a QPM head built with ``relu=True`` (CHiQPM) rectified);
* ``forward(feature_maps)`` -> (B, n_c) logits;
* ``weight``: the live (n_c, K) class-feature weight (a trainable parameter for the dense
  head, a frozen buffer for the QPM head, the masked weight for the sparse head), which the
  diversity loss reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

__all__ = ["DenseHead", "QPMHead", "SparseHead"]

# The QPM normalisation divides by max(std, _MIN_STD), as the reference, so dead features
# (std 0) give finite values.
_MIN_STD = 1e-6

ArrayLike = torch.Tensor | np.ndarray | Sequence[Any]


def _check_dropout(dropout: float) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return float(dropout)


class DenseHead(nn.Module):
    """The black-box head: global average pooling, dropout, then a linear layer with bias.

    Args:
        n_features_in: n_f, the number of backbone channels.
        n_classes: n_c.
        dropout: dropout probability on the pooled features (0.2 in the paper).

    Raises:
        ValueError: non-positive sizes or a dropout outside [0, 1).
    """

    def __init__(self, n_features_in: int, n_classes: int, *, dropout: float = 0.2) -> None:
        super().__init__()
        for field, value in (("n_features_in", n_features_in), ("n_classes", n_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DenseHead {field} must be a positive integer, got {value!r}")
        self.n_features_in = n_features_in
        self.n_classes = n_classes
        self.dropout = nn.Dropout(_check_dropout(dropout))
        self.linear = nn.Linear(n_features_in, n_classes)

    @property
    def weight(self) -> torch.Tensor:
        """The live (n_c, n_f) weight; gradients flow through it."""
        return self.linear.weight

    def select_maps(self, feature_maps: torch.Tensor) -> torch.Tensor:
        """The maps the head reads: all of them, (B, n_f, h, w)."""
        return feature_maps

    def pre_logits(self, feature_maps: torch.Tensor) -> torch.Tensor:
        """Pooled features after dropout, (B, n_f)."""
        return self.dropout(feature_maps.mean(dim=(2, 3)))  # (B, n_f)

    def forward(self, feature_maps: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_c) from the backbone's maps (B, n_f, h, w)."""
        return self.linear(self.pre_logits(feature_maps))


class QPMHead(nn.Module):
    """The QPM head: selected channels, frozen normalisation and a frozen binary assignment.

    ``logits = W @ ((dropout(pool(M[selected])) - mean) / max(std, 1e-6))`` with W the binary
    class-feature matrix and no bias. Everything is a buffer: nothing in the head trains. As in
    the reference code, dropout acts on the raw pooled features before normalisation, so a
    dropped feature becomes -mean/std rather than 0.

    With ``relu=True`` (the CHiQPM head) the normalised features pass through a ReLU before W:
    ``logits = W @ relu(normalised)``. Every feature then contributes >= 0 to its classes'
    logits, which is what makes "a class's strongest features" and the hierarchy of classes
    that share features meaningful. The ReLU adds no parameter; the normalisation stays frozen.

    Args:
        selected_features: (K,) distinct backbone channel indices, in head order.
        mean: (K,) training-set mean of the pooled selected features.
        std: (K,) training-set (population) std of the pooled selected features.
        class_feature_matrix: (n_c, K) in {0, 1}, the same number of ones in every row, rows
            distinct; column k belongs to ``selected_features[k]``.
        dropout: dropout probability on the raw pooled features (0.1 in the paper).
        relu: apply a ReLU to the normalised features (CHiQPM); False is the QPM head.

    Raises:
        ValueError: shapes that disagree, a non-binary matrix, unequal row sums, duplicated
            rows or selected features, negative or non-finite values.
        TypeError: ``relu`` is not a bool.

    Example:
        >>> head = QPMHead([3, 7], [0.5, 1.0], [0.1, 0.2], [[1, 0], [0, 1]])
        >>> head.class_features
        [[3], [7]]
    """

    selected_features: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    class_feature_matrix: torch.Tensor

    def __init__(
        self,
        selected_features: ArrayLike,
        mean: ArrayLike,
        std: ArrayLike,
        class_feature_matrix: ArrayLike,
        *,
        dropout: float = 0.1,
        relu: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(relu, bool):
            raise TypeError(f"QPMHead relu must be a bool, got {relu!r}")
        selected = _check_selected(selected_features, "QPMHead")
        n_selected = selected.numel()
        mean_tensor, std_tensor = _check_statistics(mean, std, n_selected, "QPMHead")

        matrix = _as_tensor(class_feature_matrix, "class_feature_matrix").float()
        if matrix.dim() != 2 or matrix.shape[1] != n_selected or matrix.shape[0] == 0:
            raise ValueError(
                f"QPMHead class_feature_matrix must have shape (n_classes, {n_selected}), "
                f"got {tuple(matrix.shape)}"
            )
        if not ((matrix == 0) | (matrix == 1)).all():
            raise ValueError("QPMHead class_feature_matrix must contain only 0 and 1")
        row_sums = matrix.sum(dim=1)
        if not (row_sums == row_sums[0]).all() or int(row_sums[0]) == 0:
            raise ValueError(
                "QPMHead class_feature_matrix must have the same positive number of ones in "
                f"every row, got row sums {sorted(set(row_sums.int().tolist()))}"
            )
        if torch.unique(matrix, dim=0).shape[0] != matrix.shape[0]:
            raise ValueError(
                "QPMHead class_feature_matrix has identical rows: two classes use the same "
                "features and cannot be told apart"
            )

        self.register_buffer("selected_features", selected)
        self.register_buffer("mean", mean_tensor)
        self.register_buffer("std", std_tensor)
        self.register_buffer("class_feature_matrix", matrix)
        self.dropout = nn.Dropout(_check_dropout(dropout))
        self.relu = relu

    @property
    def n_classes(self) -> int:
        """n_c."""
        return int(self.class_feature_matrix.shape[0])

    @property
    def n_features(self) -> int:
        """K, the number of selected features."""
        return int(self.selected_features.numel())

    @property
    def n_per_class(self) -> int:
        """The number of features every class uses."""
        return int(self.class_feature_matrix[0].sum())

    @property
    def class_features(self) -> list[list[int]]:
        """For every class, the backbone channel ids of its features, in head order."""
        selected = self.selected_features.tolist()
        return [
            [selected[k] for k in torch.nonzero(row).flatten().tolist()]
            for row in self.class_feature_matrix
        ]

    @property
    def weight(self) -> torch.Tensor:
        """The frozen binary (n_c, K) class-feature matrix."""
        return self.class_feature_matrix

    def select_maps(self, feature_maps: torch.Tensor) -> torch.Tensor:
        """The selected maps (B, K, h, w) out of the backbone's (B, n_f, h, w)."""
        # No range check here: it would cost a device sync per batch; QPMModel checks the
        # selection against the backbone once, and index_select fails on a bad index anyway.
        return feature_maps.index_select(1, self.selected_features)  # (B, K, h, w)

    def pre_logits(self, feature_maps: torch.Tensor) -> torch.Tensor:
        """Normalised selected features (B, K); dropout acts before the normalisation.

        With ``relu`` the normalised features are passed through a ReLU (all >= 0).
        """
        pooled = self.dropout(self.select_maps(feature_maps).mean(dim=(2, 3)))  # (B, K)
        normalised = (pooled - self.mean) / self.std.clamp(min=_MIN_STD)
        return functional.relu(normalised) if self.relu else normalised

    def logits_from_pre_logits(self, pre_logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_c) from :meth:`pre_logits`'s output (B, K): each class's sum of its
        features. ``forward(maps)`` is ``logits_from_pre_logits(pre_logits(maps))``, so a caller
        that needs both draws dropout once."""
        return pre_logits @ self.class_feature_matrix.to(pre_logits.dtype).T  # (B, n_c)

    def forward(self, feature_maps: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_c): each class's sum of its (rectified, with ``relu``) features."""
        return self.logits_from_pre_logits(self.pre_logits(feature_maps))

    def extra_repr(self) -> str:
        return (
            f"n_features={self.n_features}, n_classes={self.n_classes}, "
            f"n_per_class={self.n_per_class}, relu={self.relu}"
        )


class SparseHead(nn.Module):
    """The head of the sparse baselines: selected channels, a normalisation and a sparse linear
    layer with an optional bias (SLDD-Model, Q-SENN, glm-saga5).

    ``logits = (W * M) @ ((dropout(pool(maps[selected])) - mean) / max(std, 1e-6)) + b`` with
    W continuous or ternary and M = (W != 0) the sparsity pattern, fixed when the head is built.
    As in :class:`QPMHead`, dropout acts on the raw pooled features before the normalisation.

    The pattern never changes: M is a frozen buffer, the live weight is
    ``where(M, stored weight, 0)`` (so the stored weight's gradient is exactly zero outside M,
    even where the upstream gradient is NaN or infinite), and loading a state dict re-applies M
    to the stored weight. Any optimiser whose update of a zero parameter with a zero gradient is
    zero (SGD with momentum, weight decay or Nesterov, Adam, AdamW, ...) therefore keeps the zero
    weights exactly zero.

    Each of mean/std, W and b is a trainable parameter when its flag is on and a frozen buffer
    otherwise; the state-dict keys are the same either way (``selected_features``, ``mask``,
    ``mean``, ``std``, ``weight_values`` and ``bias`` when there is one).

    Args:
        selected_features: (K,) distinct backbone channel indices, in head order.
        mean: (K,) mean of the pooled selected features (e.g. over the training set).
        std: (K,) std of the pooled selected features, >= 0.
        weight: (n_c, K) finite weights; the nonzero entries are the ones that are used.
        bias: (n_c,) finite, or None for no bias.
        dropout: dropout probability on the raw pooled features.
        train_normalisation: train mean and std.
        train_weights: train the nonzero weights (the zeros stay zero).
        train_bias: train the bias (needs one).

    Raises:
        ValueError: shapes that disagree, duplicated or negative selected features, negative or
            non-finite values, or ``train_bias`` without a bias.
        TypeError: a flag that is not a bool.

    Example:
        >>> head = SparseHead([3, 7, 9], [0.5, 1.0, 0.0], [0.1, 0.2, 1.0],
        ...                   [[0.8, 0.0, -0.3], [0.0, 1.2, 0.0]], [0.1, -0.1])
        >>> head.class_features
        [[3, 9], [7]]
    """

    selected_features: torch.Tensor
    mask: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    weight_values: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        selected_features: ArrayLike,
        mean: ArrayLike,
        std: ArrayLike,
        weight: ArrayLike,
        bias: ArrayLike | None = None,
        *,
        dropout: float = 0.1,
        train_normalisation: bool = False,
        train_weights: bool = False,
        train_bias: bool = False,
    ) -> None:
        super().__init__()
        flags = {
            "train_normalisation": train_normalisation,
            "train_weights": train_weights,
            "train_bias": train_bias,
        }
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise TypeError(f"SparseHead {name} must be a bool, got {flag!r}")
        selected = _check_selected(selected_features, "SparseHead")
        n_selected = selected.numel()
        # a trained scale may cross zero: the head divides by its magnitude (see pre_logits)
        mean_tensor, std_tensor = _check_statistics(
            mean, std, n_selected, "SparseHead", signed=True
        )

        weight_tensor = _as_tensor(weight, "weight", owner="SparseHead").float()
        if weight_tensor.dim() != 2 or weight_tensor.shape[1] != n_selected:
            raise ValueError(
                f"SparseHead weight must have shape (n_classes, {n_selected}), "
                f"got {tuple(weight_tensor.shape)}"
            )
        if weight_tensor.shape[0] == 0:
            raise ValueError("SparseHead weight must have at least one class row")
        if not torch.isfinite(weight_tensor).all():
            raise ValueError("SparseHead weight has non-finite values")
        n_classes = int(weight_tensor.shape[0])

        bias_tensor = None
        if bias is not None:
            bias_tensor = _as_tensor(bias, "bias", owner="SparseHead").float()
            if tuple(bias_tensor.shape) != (n_classes,):
                raise ValueError(
                    f"SparseHead bias must have shape ({n_classes},), one value per weight row, "
                    f"got {tuple(bias_tensor.shape)}"
                )
            if not torch.isfinite(bias_tensor).all():
                raise ValueError("SparseHead bias has non-finite values")
        elif train_bias:
            raise ValueError("SparseHead train_bias=True needs a bias (got bias=None)")

        self.train_normalisation = train_normalisation
        self.train_weights = train_weights
        self.train_bias = train_bias
        self.register_buffer("selected_features", selected)
        mask = weight_tensor != 0
        self.register_buffer("mask", mask)
        self._register("mean", mean_tensor, trainable=train_normalisation)
        self._register("std", std_tensor, trainable=train_normalisation)
        self._register("weight_values", weight_tensor * mask, trainable=train_weights)
        if bias_tensor is None:
            self.register_buffer("bias", None)
        else:
            self._register("bias", bias_tensor, trainable=train_bias)
        self.dropout = nn.Dropout(_check_dropout(dropout))
        self.register_load_state_dict_post_hook(_apply_mask_after_load)

    def _register(self, name: str, tensor: torch.Tensor, *, trainable: bool) -> None:
        """``tensor`` as a trainable parameter or a frozen buffer, under the same name."""
        if trainable:
            self.register_parameter(name, nn.Parameter(tensor))
        else:
            self.register_buffer(name, tensor)

    @property
    def n_classes(self) -> int:
        """n_c."""
        return int(self.weight_values.shape[0])

    @property
    def n_features(self) -> int:
        """K, the number of selected features."""
        return int(self.selected_features.numel())

    @property
    def has_bias(self) -> bool:
        """Whether the head adds a bias."""
        return self.bias is not None

    @property
    def weight(self) -> torch.Tensor:
        """The live masked (n_c, K) weight; gradients flow to the entries inside the pattern.

        ``where`` rather than a product: its gradient outside the pattern is exactly zero even
        when the incoming one is not finite (0 x NaN would be NaN).
        """
        return torch.where(self.mask, self.weight_values, 0.0)

    @property
    def n_nonzero(self) -> int:
        """The number of nonzero weights."""
        return int((self.weight.detach() != 0).sum())

    @property
    def is_ternary(self) -> bool:
        """Whether every nonzero weight has the same magnitude (weights in {-a, 0, a})."""
        weight = self.weight.detach()
        magnitudes = weight[weight != 0].abs()
        return bool(magnitudes.numel() > 0 and torch.all(magnitudes == magnitudes[0]))

    @property
    def class_features(self) -> list[list[int]]:
        """For every class, the backbone channel ids of its nonzero weights, in head order."""
        selected = self.selected_features.tolist()
        return [
            [selected[k] for k in torch.nonzero(row).flatten().tolist()]
            for row in self.weight.detach()
        ]

    def select_maps(self, feature_maps: torch.Tensor) -> torch.Tensor:
        """The selected maps (B, K, h, w) out of the backbone's (B, n_f, h, w)."""
        return feature_maps.index_select(1, self.selected_features)  # (B, K, h, w)

    def pre_logits(self, feature_maps: torch.Tensor) -> torch.Tensor:
        """Normalised selected features (B, K); dropout acts before the normalisation."""
        pooled = self.dropout(self.select_maps(feature_maps).mean(dim=(2, 3)))  # (B, K)
        # |std|: a trainable scale can be pushed through zero by SGD; its magnitude is the scale
        return (pooled - self.mean) / self.std.abs().clamp(min=_MIN_STD)

    def forward(self, feature_maps: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_c): the sparse linear map of the normalised features, plus the bias."""
        normalised = self.pre_logits(feature_maps)
        bias = None if self.bias is None else self.bias.to(normalised.dtype)
        return functional.linear(normalised, self.weight.to(normalised.dtype), bias)  # (B, n_c)

    def extra_repr(self) -> str:
        return (
            f"n_features={self.n_features}, n_classes={self.n_classes}, "
            f"n_nonzero={self.n_nonzero}, has_bias={self.has_bias}, "
            f"train_normalisation={self.train_normalisation}, "
            f"train_weights={self.train_weights}, train_bias={self.train_bias}"
        )


def _apply_mask_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """Zero a loaded sparse head's stored weights outside its (loaded) pattern."""
    if isinstance(module, SparseHead):
        with torch.no_grad():
            module.weight_values.mul_(module.mask.to(module.weight_values.dtype))


def _check_selected(selected_features: ArrayLike, owner: str) -> torch.Tensor:
    """``selected_features`` as a (K,) long tensor of distinct channel ids >= 0."""
    selected = _as_tensor(selected_features, "selected_features", owner=owner)
    if selected.dim() != 1 or selected.numel() == 0:
        raise ValueError(
            f"{owner} selected_features must be a non-empty 1-d list of channel indices, "
            f"got shape {tuple(selected.shape)}"
        )
    if selected.is_floating_point() and not torch.equal(selected, selected.round()):
        raise ValueError(f"{owner} selected_features must be integers")
    selected = selected.long()
    if int(selected.min()) < 0:
        raise ValueError(f"{owner} selected_features must be >= 0, got {selected.tolist()}")
    if selected.unique().numel() != selected.numel():
        raise ValueError(f"{owner} selected_features has duplicates: {selected.tolist()}")
    return selected


def _check_statistics(
    mean: ArrayLike, std: ArrayLike, n_selected: int, owner: str, *, signed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as finite (K,) float tensors, std >= 0 unless ``signed``."""
    mean_tensor = _as_tensor(mean, "mean", owner=owner).float()
    std_tensor = _as_tensor(std, "std", owner=owner).float()
    for field, tensor in (("mean", mean_tensor), ("std", std_tensor)):
        if tuple(tensor.shape) != (n_selected,):
            raise ValueError(
                f"{owner} {field} must have shape ({n_selected},) like selected_features, "
                f"got {tuple(tensor.shape)} (index the training-set statistics with "
                "selected_features)"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{owner} {field} has non-finite values")
    if not signed and (std_tensor < 0).any():
        raise ValueError(f"{owner} std must be >= 0")
    return mean_tensor, std_tensor


def _as_tensor(value: ArrayLike, field: str, *, owner: str = "QPMHead") -> torch.Tensor:
    """A CPU tensor copy of a tensor, array or nested list, with a clear error otherwise."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{owner} {field} must be array-like: {error}") from error
    if array.dtype == bool:
        array = array.astype(np.int64)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{owner} {field} must be numeric, got dtype {array.dtype}")
    return torch.from_numpy(np.array(array))
