"""The QPM assignment problem, its solutions and the one independent validator.

This is the only module that uses the paper's symbols. With ``n_c`` classes, ``n_f`` backbone
features, ``n_features`` (the paper's n_f*) features to select and ``n_per_class`` (the paper's
n_wc) features per class:

* ``A`` (n_c, n_f): class-feature similarity, the paper's A (section 3.2), Pearson correlation of
  each feature with each class indicator, scaled to max |A| = 1.
* ``R`` (n_f, n_f): feature-feature similarity, the paper's R (section 3.3), symmetric,
  non-negative, zero diagonal, already thresholded at eps and rescaled (section 4.1.1); only the
  penalised pairs are nonzero.
* ``b`` (n_f,): the feature bias, the paper's b (section 3.4, eq. 8, appendix D).
* ``s`` in {0, 1}^n_f: the selection; ``W`` in {0, 1}^(n_c x n_f): the class-feature assignment.

The objective to maximise (paper eqs. 1, 5-7 with the scaling of eq. 17) is::

    Z = 1000 / (n_per_class * n_c) * sum_{c,d} A[c,d] W[c,d]
        - sum_{d<d'} R[d,d'] s_d s_d'
        + sum_d b[d] s_d

subject to ``sum_d s_d = n_features``; ``W[c,d] <= s_d``; ``sum_d W[c,d] = n_per_class`` for every
class; no two classes with the same feature set (paper eqs. 2-4).

Optionally (CHiQPM's forced near-equal class pairs) ``forced_pairs`` lists class pairs (c, c')
that must share exactly ``n_per_class - 1`` features: ``sum_d W[c,d] W[c',d] = n_per_class - 1``,
so the two classes differ in exactly one feature each.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openqpm._io import atomic_write, atomic_write_text

_logger = logging.getLogger(__name__)

__all__ = [
    "Assignment",
    "AssignmentProblem",
    "InvalidAssignmentError",
    "ProblemFileError",
    "ProgressCallback",
    "SolveInterrupted",
    "SolverProgress",
    "checked_selection",
    "relative_gap",
    "validate_assignment",
]


class ProblemFileError(ValueError):
    """A problem file (``problem.npz``) that cannot be read: the message names it and why."""


_PROBLEM_KEYS = ("A", "R", "b", "n_features", "n_per_class")
_ASSIGNMENT_KEYS = (
    "selected_features",
    "class_features",
    "objective",
    "bound",
    "gap",
    "method",
    "time_s",
    "log",
    "n_features",
    "n_per_class",
)


# ----------------------------------------------------------------------------------------------
# helpers


def relative_gap(objective: float, bound: float | None) -> float | None:
    """Relative optimality gap of a maximisation: ``(bound - objective) / max(|objective|, 1e-9)``.

    Args:
        objective: Value of the best known solution.
        bound: Proven upper bound on the optimum, or None when none is known.

    Returns:
        The gap as a fraction (0.01 = 1 %), or None when ``bound`` is None.

    Example:
        >>> relative_gap(400.0, 404.0)
        0.01
    """
    if bound is None:
        return None
    # the floor keeps the gap finite when the objective is (nearly) zero
    return (float(bound) - float(objective)) / max(abs(float(objective)), 1e-9)


def _as_count(value: Any, name: str) -> int:
    """An integer count from an int-like value, refusing bools, floats with fractions, etc."""
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be an integer, got the boolean {value!r}")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return int(value)
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _checked_forced_pairs(value: Any, n_classes: int) -> tuple[tuple[int, int], ...]:
    """The forced class pairs as sorted ``(c, c')`` tuples, each checked; ``()`` for None."""
    if value is None:
        return ()
    array = np.asarray(value)
    if array.size == 0:
        return ()
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(
            f"forced_pairs must be a sequence of (c, c') pairs, got shape {array.shape}"
        )
    pairs: list[tuple[int, int]] = []
    for row in array.tolist():
        first = _as_count(row[0], f"forced pair {row}: class")
        second = _as_count(row[1], f"forced pair {row}: class")
        if not (0 <= first < n_classes and 0 <= second < n_classes):
            raise ValueError(
                f"forced pair ({first}, {second}): class indices must lie in [0, {n_classes})"
            )
        if first == second:
            raise ValueError(f"forced pair ({first}, {second}): a class cannot pair with itself")
        pair = (min(first, second), max(first, second))
        if pair in pairs:
            raise ValueError(f"forced pair ({first}, {second}) is given twice")
        pairs.append(pair)
    return tuple(pairs)


def _as_float_array(value: Any, name: str, ndim: int) -> np.ndarray:
    """A read-only float64 copy of ``value`` with ``ndim`` dimensions and finite entries."""
    try:
        array = np.array(value, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a numeric array, got {type(value).__name__}") from error
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        where = np.argwhere(~np.isfinite(array))[0]
        raise ValueError(
            f"{name} must be finite, found {array[tuple(where)]} at index {tuple(int(i) for i in where)}"
        )
    array.setflags(write=False)
    return array


# ----------------------------------------------------------------------------------------------
# the problem


class AssignmentProblem:
    """One QPM selection-and-assignment problem: constants A, R, b and the two sizes.

    The constants are copied, stored as read-only float64 arrays and checked at construction, so a
    problem that exists is always well posed (a feasible solution exists).

    Args:
        A: Class-feature similarity (n_c, n_f), finite.
        R: Penalised feature-feature similarity (n_f, n_f): symmetric, non-negative, zero diagonal,
            already thresholded and rescaled (``openqpm.constants.build_problem`` makes it).
        b: Feature bias (n_f,), finite.
        n_features: Number of features to select (the paper's n_f*).
        n_per_class: Number of selected features each class is assigned (the paper's n_wc).
        eps: The threshold R was cut at, kept for the record only.
        metadata: JSON-serialisable facts about where the problem came from, kept for the record.
        forced_pairs: Class pairs (c, c') that must share exactly ``n_per_class - 1`` features
            (CHiQPM's forced near-equal pairs); stored as sorted ``(min, max)`` tuples in the given
            order. Each needs two different valid class indices; no pair may repeat.

    Raises:
        ValueError: If a shape, a value or a size is invalid; the message names it.
        TypeError: If a size is not an integer (e.g. a bool).

    Example:
        >>> import numpy as np
        >>> A = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])  # 2 classes, 3 features
        >>> problem = AssignmentProblem(A, np.zeros((3, 3)), np.zeros(3), 2, 1)
        >>> problem.objective([0, 1], [[0], [1]])  # 1000 / (1 * 2) * (1 + 1)
        1000.0
    """

    def __init__(
        self,
        A: Any,
        R: Any,
        b: Any,
        n_features: int,
        n_per_class: int,
        *,
        eps: float | None = None,
        metadata: dict[str, Any] | None = None,
        forced_pairs: Iterable[Sequence[int]] | np.ndarray | None = None,
    ) -> None:
        A_array = _as_float_array(A, "A", 2)
        R_array = _as_float_array(R, "R", 2)
        b_array = _as_float_array(b, "b", 1)
        n_classes, n_all_features = A_array.shape
        if n_classes < 1 or n_all_features < 1:
            raise ValueError(f"A must have at least one class and one feature, got {A_array.shape}")
        if R_array.shape != (n_all_features, n_all_features):
            raise ValueError(
                f"R must have shape {(n_all_features, n_all_features)} to match A "
                f"{A_array.shape}, got {R_array.shape}"
            )
        if b_array.shape != (n_all_features,):
            raise ValueError(
                f"b must have shape ({n_all_features},) to match A {A_array.shape}, "
                f"got {b_array.shape}"
            )
        asymmetry = np.abs(R_array - R_array.T)
        if asymmetry.max() > 1e-9 * max(1.0, float(np.abs(R_array).max())):
            row, col = (
                int(i) for i in np.unravel_index(int(np.argmax(asymmetry)), asymmetry.shape)
            )
            raise ValueError(
                f"R must be symmetric: R[{row},{col}] = {R_array[row, col]} but "
                f"R[{col},{row}] = {R_array[col, row]}"
            )
        nonzero_diagonal = np.flatnonzero(np.diagonal(R_array))
        if nonzero_diagonal.size:
            d = int(nonzero_diagonal[0])
            raise ValueError(f"R must have a zero diagonal, got R[{d},{d}] = {R_array[d, d]}")
        negative = np.argwhere(R_array < 0)
        if negative.size:
            row, col = (int(i) for i in negative[0])
            raise ValueError(f"R must be non-negative, got R[{row},{col}] = {R_array[row, col]}")
        n_features = _as_count(n_features, "n_features")
        n_per_class = _as_count(n_per_class, "n_per_class")
        if not 1 <= n_per_class <= n_features <= n_all_features:
            raise ValueError(
                "need 1 <= n_per_class <= n_features <= number of features in A, got "
                f"n_per_class={n_per_class}, n_features={n_features}, "
                f"features in A={n_all_features}"
            )
        pairs = _checked_forced_pairs(forced_pairs, n_classes)
        if pairs and n_features < n_per_class + 1:
            raise ValueError(
                f"forced pairs {[list(p) for p in pairs]} need two sets sharing n_per_class - 1 = "
                f"{n_per_class - 1} features, hence at least n_per_class + 1 = {n_per_class + 1} "
                f"selected features, but n_features={n_features}"
            )
        n_class_sets = math.comb(n_features, n_per_class)
        if n_class_sets < n_classes:
            raise ValueError(
                f"{n_classes} classes cannot all get distinct sets: only C({n_features}, "
                f"{n_per_class}) = {n_class_sets} sets of n_per_class={n_per_class} exist among "
                f"n_features={n_features} features; raise n_features or n_per_class"
            )
        if eps is not None:
            eps = float(eps)
            if not math.isfinite(eps):
                raise ValueError(f"eps must be finite or None, got {eps}")
        if metadata is not None:
            try:
                json.dumps(metadata, allow_nan=False)
            except (TypeError, ValueError) as error:
                raise ValueError(f"metadata must be JSON-serialisable: {error}") from error
        # exact symmetry so that every consumer may read either triangle
        if asymmetry.max() > 0:
            R_array = (R_array + R_array.T) / 2.0
            R_array.setflags(write=False)
        self.A = A_array
        self.R = R_array
        self.b = b_array
        self.n_features = n_features
        self.n_per_class = n_per_class
        self.eps = eps
        self.metadata: dict[str, Any] = dict(metadata) if metadata is not None else {}
        self.forced_pairs: tuple[tuple[int, int], ...] = pairs

    def __repr__(self) -> str:
        return (
            f"AssignmentProblem(n_classes={self.n_classes}, n_all_features={self.n_all_features}, "
            f"n_features={self.n_features}, n_per_class={self.n_per_class}, "
            f"n_penalised_pairs={self.n_penalised_pairs}"
            + (
                f", forced_pairs={[list(p) for p in self.forced_pairs]}"
                if self.forced_pairs
                else ""
            )
            + ")"
        )

    @property
    def n_classes(self) -> int:
        """Number of classes n_c (rows of A)."""
        return int(self.A.shape[0])

    @property
    def n_all_features(self) -> int:
        """Number of candidate features n_f (columns of A)."""
        return int(self.A.shape[1])

    @property
    def class_scale(self) -> float:
        """The factor 1000 / (n_per_class * n_c) on the assignment term.

        The paper (eq. 17) scales the assignment term so that its weight relative to R and b does
        not drift with n_c and n_per_class; for the default 5 per class and 200 classes it is 1.
        """
        return 1000.0 / (self.n_per_class * self.n_classes)

    @property
    def n_penalised_pairs(self) -> int:
        """Number of unordered feature pairs with a positive penalty in R."""
        return int(np.count_nonzero(np.triu(self.R, k=1)))

    def penalised_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The unordered pairs with a positive penalty.

        Returns:
            ``(first, second, weight)``: int64 arrays with ``first < second`` and the float64 penalty
            ``R[first, second]``, in row-major order of the upper triangle.
        """
        first, second = np.nonzero(np.triu(self.R, k=1))
        return first.astype(np.int64), second.astype(np.int64), self.R[first, second].copy()

    def objective_terms(
        self, selected_features: Iterable[int], class_features: Sequence[Iterable[int]]
    ) -> dict[str, float]:
        """The three terms of Z for a selection and an assignment (feasibility is not checked).

        Args:
            selected_features: Selected feature ids (the support of s).
            class_features: For each class, the feature ids it is assigned (the rows of W).

        Returns:
            ``{"assignment": class_scale * sum A*W, "redundancy": sum_{d<d'} R s s,
            "bias": b . s, "objective": assignment - redundancy + bias}``.

        Raises:
            ValueError: If the number of classes or a feature id is out of range.
        """
        selected = np.fromiter((int(d) for d in selected_features), dtype=np.int64)
        if len(class_features) != self.n_classes:
            raise ValueError(
                f"class_features has {len(class_features)} classes, the problem {self.n_classes}"
            )
        rows: list[int] = []
        cols: list[int] = []
        for class_index, features in enumerate(class_features):
            for d in features:
                rows.append(class_index)
                cols.append(int(d))
        every_id = np.concatenate([selected, np.asarray(cols, dtype=np.int64)])
        if every_id.size and (every_id.min() < 0 or every_id.max() >= self.n_all_features):
            raise ValueError(
                f"feature ids must lie in [0, {self.n_all_features}), got "
                f"{int(every_id.min())}..{int(every_id.max())}"
            )
        assignment = self.class_scale * float(self.A[rows, cols].sum())
        unique_selected = np.unique(selected)
        # R has a zero diagonal, so half the block sum is the sum over unordered pairs d < d'
        redundancy = 0.5 * float(self.R[np.ix_(unique_selected, unique_selected)].sum())
        bias = float(self.b[unique_selected].sum())
        return {
            "assignment": assignment,
            "redundancy": redundancy,
            "bias": bias,
            "objective": assignment - redundancy + bias,
        }

    def objective(
        self, selected_features: Iterable[int], class_features: Sequence[Iterable[int]]
    ) -> float:
        """The objective Z (to maximise) of a selection and an assignment.

        Feasibility is not checked here; use :func:`validate_assignment` for that.

        Args:
            selected_features: Selected feature ids (the support of s).
            class_features: For each class, the feature ids it is assigned (the rows of W).

        Returns:
            Z = class_scale * sum_{c,d} A[c,d] W[c,d] - sum_{d<d'} R[d,d'] s_d s_d' + b . s.

        Raises:
            ValueError: If the number of classes or a feature id is out of range.
        """
        return self.objective_terms(selected_features, class_features)["objective"]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the problem to ``path`` (an ``.npz`` file), atomically, without pickle.

        Keys: ``A``, ``R``, ``b``, ``n_features``, ``n_per_class`` and, when set, ``eps``,
        ``metadata`` (a JSON string) and ``forced_pairs`` (int64, shape (n_pairs, 2)).

        Args:
            path: Destination file; its folder is created if needed.
        """
        arrays: dict[str, np.ndarray] = {
            "A": self.A,
            "R": self.R,
            "b": self.b,
            "n_features": np.asarray(self.n_features, dtype=np.int64),
            "n_per_class": np.asarray(self.n_per_class, dtype=np.int64),
        }
        if self.eps is not None:
            arrays["eps"] = np.asarray(self.eps, dtype=np.float64)
        if self.metadata:
            arrays["metadata"] = np.asarray(json.dumps(self.metadata, sort_keys=True))
        if self.forced_pairs:
            arrays["forced_pairs"] = np.asarray(self.forced_pairs, dtype=np.int64).reshape(-1, 2)
        atomic_write(path, lambda f: np.savez(f, **arrays), binary=True)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AssignmentProblem:
        """Read a problem written by :meth:`save` (``allow_pickle=False``).

        Args:
            path: An ``.npz`` file with the keys ``A``, ``R``, ``b``, ``n_features``,
                ``n_per_class`` (optionally ``eps``, ``metadata``, ``forced_pairs``; files
                without ``forced_pairs`` load with none).

        Returns:
            The problem, validated as at construction.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ProblemFileError: (a ValueError) If the file is not a readable npz (an empty file
                too), lacks a key, or holds invalid values; the message names the file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"problem file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                contents = {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError) as error:  # EOFError: an empty file
            raise ProblemFileError(
                f"{path}: not a readable npz problem file ({error or type(error).__name__})"
            ) from error
        missing = [key for key in _PROBLEM_KEYS if key not in contents]
        if missing:
            raise ProblemFileError(
                f"{path}: missing key(s) {', '.join(missing)}; a problem file needs "
                f"{', '.join(_PROBLEM_KEYS)}"
            )
        metadata = None
        if "metadata" in contents:
            try:
                metadata = json.loads(str(contents["metadata"]))
            except json.JSONDecodeError as error:
                raise ProblemFileError(
                    f"{path}: key 'metadata' is not valid JSON ({error})"
                ) from error
        try:
            return cls(
                contents["A"],
                contents["R"],
                contents["b"],
                contents["n_features"],
                contents["n_per_class"],
                eps=float(contents["eps"]) if "eps" in contents else None,
                metadata=metadata,
                forced_pairs=contents.get("forced_pairs"),
            )
        except (TypeError, ValueError) as error:
            raise ProblemFileError(f"{path}: {error}") from error


# ----------------------------------------------------------------------------------------------
# solutions


@dataclass
class SolverProgress:
    """One progress report of a solver, passed to the ``progress`` callback.

    Args:
        elapsed_s: Seconds since the solver started.
        objective: Best objective found so far, or None before the first solution.
        bound: Best proven upper bound, or None when the method proves none.
        gap: Relative gap (see :func:`relative_gap`), or None.
        message: A short human-readable note (phase, event).
    """

    elapsed_s: float
    objective: float | None
    bound: float | None = None
    gap: float | None = None
    message: str = ""


ProgressCallback = Callable[[SolverProgress], None]
"""Signature of the ``progress`` argument of every solver."""


@dataclass
class Assignment:
    """A solution: the selected features and each class's features, with how it was found.

    Feature ids are always ids of the problem's n_f candidate features (columns of A). Lists are
    sorted and converted to plain ints at construction. When ``bound`` is given and ``gap`` is not,
    the gap is filled in with :func:`relative_gap`.

    Args:
        selected_features: The ``n_features`` selected ids, ascending.
        class_features: One ascending list of ``n_per_class`` ids per class.
        objective: The objective Z of this solution.
        bound: A proven upper bound on the optimum, or None.
        gap: Relative gap ``(bound - objective) / max(|objective|, 1e-9)``, or None.
        method: Name of the solver that produced it.
        time_s: Wall time the solver took.
        log: Human-readable lines about the solve.
    """

    selected_features: list[int]
    class_features: list[list[int]]
    objective: float
    bound: float | None = None
    gap: float | None = None
    method: str = ""
    time_s: float = 0.0
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.selected_features = sorted(int(d) for d in self.selected_features)
        self.class_features = [sorted(int(d) for d in features) for features in self.class_features]
        self.objective = float(self.objective)
        self.bound = None if self.bound is None else float(self.bound)
        if self.gap is None:
            self.gap = relative_gap(self.objective, self.bound)
        else:
            self.gap = float(self.gap)
        self.time_s = float(self.time_s)
        self.log = [str(line) for line in self.log]

    @property
    def n_classes(self) -> int:
        """Number of classes (length of ``class_features``)."""
        return len(self.class_features)

    def W(self, n_all_features: int) -> np.ndarray:
        """The dense binary assignment over all candidate features.

        Args:
            n_all_features: Number of candidate features n_f (columns of the result).

        Returns:
            uint8 array (n_c, n_all_features), 1 where a class uses a feature.

        Raises:
            ValueError: If a feature id does not fit.
        """
        matrix = np.zeros((self.n_classes, n_all_features), dtype=np.uint8)
        for class_index, features in enumerate(self.class_features):
            for d in features:
                if not 0 <= d < n_all_features:
                    raise ValueError(
                        f"class {class_index} uses feature {d}, outside [0, {n_all_features})"
                    )
                matrix[class_index, d] = 1
        return matrix

    def class_feature_matrix(self) -> np.ndarray:
        """The assignment restricted to the selected features, in ``selected_features`` order.

        This is the frozen weight matrix of the QPM head (column k = ``selected_features[k]``).

        Returns:
            uint8 array (n_c, n_features) in {0, 1}.

        Raises:
            ValueError: If a class uses a feature that is not selected.
        """
        column_of = {d: k for k, d in enumerate(self.selected_features)}
        matrix = np.zeros((self.n_classes, len(self.selected_features)), dtype=np.uint8)
        for class_index, features in enumerate(self.class_features):
            for d in features:
                if d not in column_of:
                    raise ValueError(f"class {class_index} uses feature {d}, which is not selected")
                matrix[class_index, column_of[d]] = 1
        return matrix

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dictionary that :meth:`save` writes."""
        return {
            "selected_features": list(self.selected_features),
            "class_features": [list(features) for features in self.class_features],
            "objective": self.objective,
            "bound": self.bound,
            "gap": self.gap,
            "method": self.method,
            "time_s": self.time_s,
            "log": list(self.log),
            "n_features": len(self.selected_features),
            "n_per_class": len(self.class_features[0]) if self.class_features else 0,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the assignment as JSON (``assignment.json``), atomically.

        Args:
            path: Destination file; its folder is created if needed.

        Raises:
            ValueError: If a number is not finite (JSON cannot hold it).
        """
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        atomic_write_text(path, text + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Assignment:
        """Read an assignment written by :meth:`save`.

        Args:
            path: A JSON file with at least ``selected_features``, ``class_features``,
                ``objective``.

        Returns:
            The assignment (not validated against a problem: call :func:`validate_assignment`).

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If the file is not JSON or a key is missing or malformed; the message
                names the file and the key.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"assignment file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not a JSON assignment file ({error})") from error
        if not isinstance(data, dict):
            # malformed file content is a ValueError like every other check of the file
            raise ValueError(  # noqa: TRY004
                f"{path}: expected a JSON object, got {type(data).__name__}"
            )
        for key in ("selected_features", "class_features", "objective"):
            if key not in data:
                raise ValueError(f"{path}: missing key {key!r}")
        selected = data["selected_features"]
        if not isinstance(selected, list) or not all(_is_json_int(d) for d in selected):
            raise ValueError(f"{path}: 'selected_features' must be a list of integers")
        class_features = data["class_features"]
        if not isinstance(class_features, list) or not all(
            isinstance(features, list) and all(_is_json_int(d) for d in features)
            for features in class_features
        ):
            raise ValueError(f"{path}: 'class_features' must be a list of lists of integers")
        for key in ("objective", "bound", "gap", "time_s"):
            value = data.get(key)
            if value is not None and not _is_json_number(value):
                raise ValueError(f"{path}: {key!r} must be a number, got {value!r}")
        if data["objective"] is None:
            raise ValueError(f"{path}: 'objective' must be a number, got null")
        log = data.get("log", [])
        if not isinstance(log, list) or not all(isinstance(line, str) for line in log):
            raise ValueError(f"{path}: 'log' must be a list of strings")
        for key, actual in (
            ("n_features", len(selected)),
            ("n_per_class", len(class_features[0]) if class_features else 0),
        ):
            if key in data and data[key] != actual:
                raise ValueError(f"{path}: {key!r} is {data[key]} but the lists imply {actual}")
        return cls(
            selected_features=selected,
            class_features=class_features,
            objective=data["objective"],
            bound=data.get("bound"),
            gap=data.get("gap"),
            method=str(data.get("method", "")),
            time_s=data.get("time_s") or 0.0,
            log=log,
        )


def _is_json_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_json_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------
# validation


def checked_selection(
    problem: AssignmentProblem, selection: Assignment | Sequence[int] | np.ndarray
) -> np.ndarray:
    """A selection (or a solution's) as a sorted int64 array, after checking it fits ``problem``.

    Every solver's ``start`` argument goes through here, so a bad start fails before any solving.

    Raises:
        ValueError: If it is not a 1-D list of n_features distinct ids in [0, n_all_features).
    """
    if isinstance(selection, Assignment):
        selection = selection.selected_features
    selected = np.asarray(selection)
    if selected.ndim != 1 or not (np.issubdtype(selected.dtype, np.integer) or selected.size == 0):
        raise ValueError(f"a selection must be a 1-D list of integer feature ids, got {selected!r}")
    selected = np.sort(selected.astype(np.int64))
    if selected.size != problem.n_features:
        raise ValueError(
            f"a selection must have n_features={problem.n_features} ids, got {selected.size}"
        )
    if selected[0] < 0 or selected[-1] >= problem.n_all_features:
        raise ValueError(
            f"selected feature ids must lie in [0, {problem.n_all_features}), got "
            f"{int(selected[0])}..{int(selected[-1])}"
        )
    repeated = selected[1:][selected[1:] == selected[:-1]]
    if repeated.size:
        raise ValueError(f"feature {int(repeated[0])} is selected twice")
    return selected


class InvalidAssignmentError(ValueError):
    """An assignment violates a constraint of its problem or misreports its objective."""


class SolveInterrupted(KeyboardInterrupt):
    """Ctrl-C during a solve, carrying the best valid assignment found until then.

    Attributes:
        assignment: the best assignment so far (validated; its ``log`` says it was interrupted).
        path: where a caller saved it, if it did.
    """

    def __init__(self, assignment: Assignment) -> None:
        super().__init__("interrupted during the solve")
        self.assignment = assignment
        self.path: Path | None = None


def validate_assignment(
    problem: AssignmentProblem, assignment: Assignment, *, rtol: float = 1e-6
) -> None:
    """Check an assignment against its problem, independently of any solver.

    Checks: exactly ``n_features`` selected ids, distinct, ascending, in range; one list per class
    with exactly ``n_per_class`` distinct ids, all selected; no two classes with the same set; the
    objective recomputed from the constants equals the reported one; every forced pair of classes
    shares exactly ``n_per_class - 1`` features; a reported bound is not below
    the objective and the reported gap matches :func:`relative_gap`.

    Args:
        problem: The problem the assignment claims to solve.
        assignment: The solution to check.
        rtol: Relative tolerance for the objective, bound and gap comparisons (relative to
            ``max(1, |objective|)``).

    Raises:
        InvalidAssignmentError: On the first violation; the message names the class or feature.
    """
    n_all = problem.n_all_features
    selected = list(assignment.selected_features)
    if len(selected) != problem.n_features:
        raise InvalidAssignmentError(
            f"{len(selected)} features selected, the problem asks for exactly {problem.n_features}"
        )
    for position, d in enumerate(selected):
        if not _is_json_int(d) and not isinstance(d, np.integer):
            raise InvalidAssignmentError(f"selected feature {d!r} is not an integer")
        if not 0 <= d < n_all:
            raise InvalidAssignmentError(f"selected feature {d} is outside [0, {n_all})")
        if position and d <= selected[position - 1]:
            if d == selected[position - 1]:
                raise InvalidAssignmentError(f"feature {d} is selected twice")
            raise InvalidAssignmentError("selected_features is not in ascending order")
    selected_set = set(selected)

    if len(assignment.class_features) != problem.n_classes:
        raise InvalidAssignmentError(
            f"{len(assignment.class_features)} classes assigned, the problem has "
            f"{problem.n_classes}"
        )
    owner_of_set: dict[tuple[int, ...], int] = {}
    for class_index, features in enumerate(assignment.class_features):
        if len(features) != problem.n_per_class:
            raise InvalidAssignmentError(
                f"class {class_index} has {len(features)} features, exactly "
                f"{problem.n_per_class} are required"
            )
        if len(set(features)) != len(features):
            raise InvalidAssignmentError(f"class {class_index} lists a feature twice: {features}")
        for d in features:
            if d not in selected_set:
                raise InvalidAssignmentError(
                    f"class {class_index} uses feature {d}, which is not selected"
                )
        key = tuple(sorted(features))
        if key in owner_of_set:
            raise InvalidAssignmentError(
                f"classes {owner_of_set[key]} and {class_index} have the same features {list(key)}"
            )
        owner_of_set[key] = class_index
    for first, second in problem.forced_pairs:
        shared = len(set(assignment.class_features[first]) & set(assignment.class_features[second]))
        if shared != problem.n_per_class - 1:
            raise InvalidAssignmentError(
                f"forced pair ({first}, {second}) shares {shared} features, exactly "
                f"n_per_class - 1 = {problem.n_per_class - 1} are required"
            )

    # recomputed with plain loops, deliberately not through AssignmentProblem.objective
    scale = 1000.0 / (problem.n_per_class * problem.n_classes)
    assignment_term = 0.0
    for class_index, features in enumerate(assignment.class_features):
        for d in features:
            assignment_term += float(problem.A[class_index, d])
    redundancy = 0.0
    for i, first in enumerate(selected):
        for second in selected[i + 1 :]:
            redundancy += float(problem.R[first, second])
    bias = sum(float(problem.b[d]) for d in selected)
    recomputed = scale * assignment_term - redundancy + bias
    reported = assignment.objective
    tolerance = rtol * max(1.0, abs(recomputed))
    if not math.isfinite(reported) or abs(reported - recomputed) > tolerance:
        raise InvalidAssignmentError(
            f"reported objective {reported!r} differs from the recomputed {recomputed!r}"
        )
    if assignment.bound is not None:
        if not math.isfinite(assignment.bound) or assignment.bound < reported - tolerance:
            raise InvalidAssignmentError(
                f"bound {assignment.bound!r} is below the objective {reported!r}"
            )
        expected_gap = relative_gap(reported, assignment.bound)
        if assignment.gap is None or not math.isclose(
            assignment.gap, expected_gap or 0.0, rel_tol=1e-6, abs_tol=rtol
        ):
            raise InvalidAssignmentError(
                f"gap {assignment.gap!r} does not match (bound - objective) / max(|objective|, "
                f"1e-9) = {expected_gap!r}"
            )
    elif assignment.gap is not None:
        raise InvalidAssignmentError(f"gap {assignment.gap!r} is reported without a bound")
    _logger.debug("assignment by %r is valid, objective %.6g", assignment.method, reported)
