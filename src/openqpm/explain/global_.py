"""Global explanations: which features each class uses, which classes each feature serves, and
the contrastive pairs of classes that differ in a single feature.

For a QPM every class is the sum of ``n_per_class`` features, so two classes that share
``n_per_class - 1`` features are told apart by exactly one feature each: the model's global
explanation of that pair (paper Figures 1 and 4).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openqpm._io import atomic_write_text
from openqpm.metrics import class_similarity

__all__ = ["ContrastivePair", "GlobalExplanation", "write_json_atomic"]

_FORMAT = "openqpm-global-explanation"


@dataclass(frozen=True)
class ContrastivePair:
    """Two classes that share all but one of their features.

    Features are head indices (columns of the class weights), not backbone channels.

    Attributes:
        first: class index (the smaller one).
        second: class index.
        shared_features: features both classes use, ascending.
        first_only: features only ``first`` uses (one for a QPM pair).
        second_only: features only ``second`` uses.
        attribute_similarity: cosine similarity of the two classes' annotated attribute
            vectors, or None without attributes.
    """

    first: int
    second: int
    shared_features: tuple[int, ...]
    first_only: tuple[int, ...]
    second_only: tuple[int, ...]
    attribute_similarity: float | None = None


@dataclass
class GlobalExplanation:
    """The global explanation of a model with a sparse class-feature assignment.

    Build it with :meth:`from_model` or :meth:`from_weights`; export it with :meth:`save_json`.

    Attributes:
        class_names: n_c readable names.
        class_features: per class, its features (head indices) by decreasing weight, ties in
            ascending order.
        feature_classes: per feature (head index), the classes using it, ascending.
        channel_ids: per head feature, its backbone channel id (what ``assignment.json`` and
            ``QPMHead.class_features`` list).
        contrastive_pairs: pairs of classes with equally many features sharing all but one,
            most similar by attributes first (or in class order without attributes).
        class_weights: the (n_c, K) weights as nested lists.
    """

    class_names: list[str]
    class_features: list[list[int]]
    feature_classes: list[list[int]]
    channel_ids: list[int]
    contrastive_pairs: list[ContrastivePair] = field(default_factory=list)
    class_weights: list[list[float]] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        """n_c."""
        return len(self.class_names)

    @property
    def n_features(self) -> int:
        """K, the number of head features."""
        return len(self.channel_ids)

    @classmethod
    def from_weights(
        cls,
        class_weights: np.ndarray | torch.Tensor,
        *,
        class_names: Sequence[str],
        channel_ids: Sequence[int] | None = None,
        class_attributes: np.ndarray | None = None,
    ) -> GlobalExplanation:
        """Build the explanation from a class-feature weight matrix.

        Args:
            class_weights: (n_c, K); a feature belongs to a class where its weight is nonzero.
            class_names: n_c names.
            channel_ids: K backbone channel ids; default ``0..K-1``.
            class_attributes: (n_c, n_attr) annotated class attributes to rank the pairs.

        Returns:
            The explanation.

        Raises:
            ValueError: when the lengths of the inputs disagree.
        """
        weights = np.asarray(
            class_weights.detach().cpu().numpy()
            if isinstance(class_weights, torch.Tensor)
            else class_weights,
            dtype=np.float64,
        )
        if weights.ndim != 2:
            raise ValueError(f"class_weights must be (n_c, K), got shape {weights.shape}")
        n_classes, n_features = weights.shape
        if len(class_names) != n_classes:
            raise ValueError(f"{len(class_names)} class names for {n_classes} weight rows")
        ids = list(range(n_features)) if channel_ids is None else [int(i) for i in channel_ids]
        if len(ids) != n_features:
            raise ValueError(f"{len(ids)} channel ids for {n_features} weight columns")
        class_features = []
        for row in weights:
            nonzero = np.flatnonzero(row)
            order = np.lexsort((nonzero, -row[nonzero]))  # weight descending, index ascending
            class_features.append([int(index) for index in nonzero[order]])
        feature_classes = [
            [int(c) for c in np.flatnonzero(weights[:, d])] for d in range(n_features)
        ]
        pairs = _contrastive_pairs(weights != 0, class_attributes)
        return cls(
            class_names=[str(name) for name in class_names],
            class_features=class_features,
            feature_classes=feature_classes,
            channel_ids=ids,
            contrastive_pairs=pairs,
            class_weights=weights.tolist(),
        )

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, *, class_attributes: np.ndarray | None = None
    ) -> GlobalExplanation:
        """Build the explanation of an ``openqpm.QPMModel``.

        Args:
            model: the model; its ``class_weights()``, ``class_names`` and, for a QPM or a
                sparse head, the head's ``selected_features`` are read.
            class_attributes: (n_c, n_attr) annotated class attributes to rank the pairs.

        Returns:
            The explanation.
        """
        qpm: Any = model
        selected = getattr(qpm.head, "selected_features", None)  # None for a dense head
        channel_ids = None if selected is None else [int(i) for i in selected.tolist()]
        return cls.from_weights(
            qpm.class_weights(),
            class_names=qpm.class_names,
            channel_ids=channel_ids,
            class_attributes=class_attributes,
        )

    def pairs_of(self, class_index: int) -> list[ContrastivePair]:
        """The contrastive pairs that include ``class_index``, in ranking order."""
        return [pair for pair in self.contrastive_pairs if class_index in (pair.first, pair.second)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: classes with names and features (head index and channel id),
        features with their classes, and the contrastive pairs."""
        return {
            "format": _FORMAT,
            "format_version": 1,
            "n_classes": self.n_classes,
            "n_features": self.n_features,
            "classes": [
                {
                    "index": index,
                    "name": name,
                    "features": self.class_features[index],
                    "channels": [self.channel_ids[d] for d in self.class_features[index]],
                    "weights": [self.class_weights[index][d] for d in self.class_features[index]],
                }
                for index, name in enumerate(self.class_names)
            ],
            "features": [
                {"index": d, "channel": self.channel_ids[d], "classes": self.feature_classes[d]}
                for d in range(self.n_features)
            ],
            "contrastive_pairs": [
                {
                    **asdict(pair),
                    "first_name": self.class_names[pair.first],
                    "second_name": self.class_names[pair.second],
                }
                for pair in self.contrastive_pairs
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GlobalExplanation:
        """Rebuild an explanation from :meth:`to_dict`'s output.

        Raises:
            ValueError: if the dict is not such an export.
        """
        if data.get("format") != _FORMAT:
            raise ValueError(f"not an openqpm global explanation (format {data.get('format')!r})")
        n_features = int(data["n_features"])
        weights = np.zeros((int(data["n_classes"]), n_features))
        for entry in data["classes"]:
            weights[entry["index"], entry["features"]] = entry["weights"]
        return cls(
            class_names=[entry["name"] for entry in data["classes"]],
            class_features=[list(entry["features"]) for entry in data["classes"]],
            feature_classes=[list(entry["classes"]) for entry in data["features"]],
            channel_ids=[int(entry["channel"]) for entry in data["features"]],
            contrastive_pairs=[
                ContrastivePair(
                    first=pair["first"],
                    second=pair["second"],
                    shared_features=tuple(pair["shared_features"]),
                    first_only=tuple(pair["first_only"]),
                    second_only=tuple(pair["second_only"]),
                    attribute_similarity=pair["attribute_similarity"],
                )
                for pair in data["contrastive_pairs"]
            ],
            class_weights=weights.tolist(),
        )

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON, atomically.

        Args:
            path: the file; its folder must exist.

        Returns:
            The path written.
        """
        return write_json_atomic(path, self.to_dict())


def _contrastive_pairs(
    uses: np.ndarray, class_attributes: np.ndarray | None
) -> list[ContrastivePair]:
    """Pairs of classes with equally many features, sharing all but one of them."""
    n_classes = uses.shape[0]
    counts = uses.sum(axis=1)  # (n_c,)
    shared = uses.astype(np.int64) @ uses.T.astype(np.int64)  # (n_c, n_c) shared features
    first, second = np.triu_indices(n_classes, k=1)
    keep = (counts[first] == counts[second]) & (shared[first, second] == counts[first] - 1)
    keep &= counts[first] >= 1
    first, second = first[keep], second[keep]
    similarity = None
    if class_attributes is not None:
        attributes = np.asarray(class_attributes, dtype=np.float64)
        if attributes.ndim != 2 or attributes.shape[0] != n_classes:
            raise ValueError(
                f"class_attributes must be (n_c={n_classes}, n_attr), got {attributes.shape}"
            )
        similarity = class_similarity(attributes)
        order = np.argsort(-similarity[first, second], kind="stable")
        first, second = first[order], second[order]
    pairs = []
    for a, b in zip(first.tolist(), second.tolist()):
        both = uses[a] & uses[b]
        pairs.append(
            ContrastivePair(
                first=a,
                second=b,
                shared_features=tuple(int(d) for d in np.flatnonzero(both)),
                first_only=tuple(int(d) for d in np.flatnonzero(uses[a] & ~uses[b])),
                second_only=tuple(int(d) for d in np.flatnonzero(uses[b] & ~uses[a])),
                attribute_similarity=None if similarity is None else float(similarity[a, b]),
            )
        )
    return pairs


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON through a temporary file in the same folder.

    Args:
        path: the file; its folder must exist.
        data: JSON-serialisable data (NaN is refused).

    Returns:
        The path written.

    Raises:
        FileNotFoundError: when the folder does not exist.
        ValueError: when the data is not JSON-serialisable.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write '{path}': folder does not exist")
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")
    return path
