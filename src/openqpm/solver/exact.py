"""The exact solver: the linear MILP on HiGHS, with a certified upper bound.

Formulation (maximise; ``scale`` = 1000 / (n_per_class * n_c), K = n_features, k = n_per_class)::

    max  scale * sum_{c,d} A[c,d] x[c,d] - sum_{d<e penalised} R[d,e] y[d,e] + sum_d b[d] s[d]
    s.t. sum_d s[d] = K,   sum_d x[c,d] = k (every class c),   x[c,d] <= s[d],
         y[d,e] >= s[d] + s[e] - 1 (penalised pairs only),   s binary, x, y in [0, 1],
         every class a distinct set (lazily, see below).

For a fixed binary s the x-part is a uniform-matroid polytope (integral), so only s is declared
integer; an x that the distinctness cuts leave fractional only makes the relaxation overrate a
selection, which the exact re-evaluation below catches. The paper's iterative relaxation exists
only because of its bilinear form W * s: here "exactly k per class" is linear from the start.

Strengthening, each step valid for every feasible solution, so the bound stays a true bound:

* **Class prices and feature pricing.** The LP runs on a subset F of the features (column
  generation). Its row duals (eta for the cardinality, theta_c for class c) give every left-out
  feature d the reduced cost ``b[d] - eta + sum_c max(0, scale * A[c,d] - theta_c)``; the
  Lagrangian bound at those duals, plus the positive reduced costs of the left-out features, bounds
  the whole problem (:meth:`_Relaxation.lagrangian_bound`). Features with positive reduced cost are
  added until none is left.
* **Per-class depth with a tail.** Class c only gets x columns for its ``depth[c]`` best features
  overall; a "tail" variable in [0, k] with the value of its next best feature stands in for all
  others. Any solution maps to the tail model with at least its value, so the bound stays valid;
  a class whose tail is used in the LP gets a deeper list.
* **Clique cuts on the penalised pairs.** If m features of a set Q whose pairs are all penalised
  are selected, at least m(m-1)/2 >= t*m - t(t+1)/2 of their pairs are paid, for every integer t:
  ``sum_{pairs in Q} y >= t * sum_Q s - t(t+1)/2``. With ``y <= s`` (added where violated) these
  stop the LP from spreading s thinly over many redundant features, which is what makes the plain
  relaxation weak. Separated greedily from the LP solution.
* **Lazy pair rows.** When features are priced in, a penalised pair gets its y column and row
  ``y >= s[d] + s[e] - 1`` only once the LP violates it (``s[d] + s[e] > 1``) or a clique cut
  needs it: the LP is a relaxation of the full one until then (a missing y is 0, which every
  missing row allows), so each bound stays valid, and every pair among the model's features is
  added before branching, where integer selections must pay all of them.
* **Cut relaxation first (large problems).** When features are priced in, the root time goes
  first to :mod:`openqpm.solver.bound`: the same relaxation with one value variable per class and
  the cuts ``v[c] <= k theta + sum_d max(0, scale A[c,d] - theta) s[d]`` instead of x columns
  (LP duality of the class's top-k choice), whose re-solves are several times faster at CUB scale;
  its bound (recomputed from its duals) tightens the certificate, its rounded selections are
  offered as incumbents, and the phases below continue with the time it leaves.
* **Reduced-cost fixing.** A feature whose Lagrangian bound with s[d] = 1 is below the incumbent
  is in no better solution; it is fixed to 0 before branching.
* **Distinctness.** Classes with the same set T in a solution get the cut "at most one class of the
  group G uses exactly T", written with indicators z[c] >= sum_{d in T} x[c,d] - (k - 1), z >= 0,
  sum_{c in G} z[c] <= 1. It is valid because a class with exactly k features and all of T has the
  set T, and it implies the pairwise cut sum_{d in T} (x[c,d] + x[c',d]) <= 2k - 1 for every pair of
  G. (That pairwise cut is *wrong* in a formulation where classes may have more than k features,
  as in the paper's relaxation: a class with T plus one more feature would be cut off. Here every
  class has exactly k.) HiGHS has no lazy-constraint callback: a branch and bound run is
  interrupted when it finds a selection the relaxation overrates, the best sets the classes of that
  selection share are cut, or, if they all are, the selection (now evaluated exactly) is excluded,
  and the run restarts warm from the incumbent.

**Forced near-equal pairs** (``problem.forced_pairs``): for each pair (c, c') and every feature d
a column w[c,c',d] in [0, 1] with ``w <= x[c,d]``, ``w <= x[c',d]``, ``w >= x[c,d] + x[c',d] - 1``
and ``sum_d w[c,c',d] = k - 1``. Every feasible solution satisfies them with w = x[c,d] x[c',d],
so the bound stays valid. These rows need every x column of the paired classes, so with forced
pairs the model is always the full one (no feature pricing, no tails), whatever its size; the
incumbent's assignment honours the pairs exactly (:func:`openqpm.solver.search.assign_classes`).

The incumbent is a selection; its value is always recomputed exactly with the optimal distinct
assignment of :func:`openqpm.solver.search.assign_classes`, never read off the relaxation.

Example:
    >>> from openqpm.instances import generate_instance
    >>> problem = generate_instance(16, 6, 5, 2, seed=0, bias="none")
    >>> result = solve_milp(problem, time_limit_s=30)
    >>> result.gap is not None and result.gap < 1e-6  # optimum proven
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from openqpm.solver.modeling import shared_sets
from openqpm.solver.problem import (
    Assignment,
    AssignmentProblem,
    ProgressCallback,
    SolverProgress,
    relative_gap,
)

if TYPE_CHECKING:
    import highspy

_logger = logging.getLogger(__name__)

__all__ = ["MilpOptions", "distinct_set_cut_holds", "new_highs", "solve_milp"]

# the branch-and-bound root LP is solved cold, with every penalised pair of the model: several
# times the last warm re-solve of the root phase at CUB scale (see benchmarks/solver.py)
_COLD_LP_FACTOR = 8.0

# anticipated collisions: each class's best sets among its k + 2 best selected features, the
# 3 best of them (more sets or a wider window did no better on the small scale)
_ANTICIPATED_SETS = 3
_ANTICIPATED_EXTRA = 2


@contextlib.contextmanager
def _c_stdout_to_null() -> Iterator[None]:
    """Send what native code writes to the process's standard output (fd 1) to the null device."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no fd 1 to redirect: nothing can leak there
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        with contextlib.suppress(OSError, AttributeError, TypeError):  # no C library to flush
            # C stdio buffers what it writes to a pipe: flush it while fd 1 is still the null device
            ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def new_highs(*, threads: int, seed: int) -> highspy.Highs:
    """A silent ``highspy.Highs`` with the given thread count and random seed.

    highspy 1.16 prints its banner ("Running HiGHS ...") from the constructor, before
    ``output_flag`` can be turned off; library code must not print, so the constructor runs
    with the native standard output sent to the null device.
    """
    import highspy

    with _c_stdout_to_null():
        highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    highs.setOptionValue("threads", int(threads))
    highs.setOptionValue("random_seed", int(seed))
    return highs


@dataclass(frozen=True)
class MilpOptions:
    """Tuning of :func:`solve_milp`; the defaults are what the benchmark measured.

    Args:
        search_share: Share of the time limit for the structured search when no ``start`` is
            given (the MILP is a poor first-solution finder at scale).
        max_search_s: Cap on that search's time.
        root_share: Share of the remaining time for the root phase (cuts) before branching
            starts, when the model is full (small problems: branching is what proves them).
        root_share_priced: The same when features are priced in (large problems: the root
            bound is what the time buys; branching on hundreds of features barely moves it).
        full_model_max_columns: Up to this many class-feature pairs (n_c * n_f) the model holds
            every feature and every pair from the start (no pricing, no tails).
        initial_features_per_selected: Initial feature set size, in multiples of n_features.
        initial_depth_per_class: Initial depth of every class's list, in multiples of
            n_all_features * n_per_class / n_features (the depth at which a class expects k of
            its features to be selected if selection were random).
        features_added_per_round: Most features priced in per round.
        max_cuts_per_round: Most clique cuts added per round.
        min_relative_improvement: The root phase stops when a round of cuts improves the bound by
            less than this (relative).
        threads: HiGHS threads.
        cut_bound: When features are priced in (large problems), spend the root time first on the
            cut relaxation of :mod:`openqpm.solver.bound` (class values as cuts, no x columns):
            the same relaxation, several times faster per round at CUB scale, so a lower bound
            in the same time (benchmarks/experiments/cut_bound.py). The usual root phase and
            branch and bound continue with whatever time it leaves.
        cut_drop_slack_after: The cut relaxation removes a row slack for this many consecutive
            rounds (None: never).
        cut_drop_kinds: The row kinds it removes when slack (``"clique"``, ``"pair"``,
            ``"class"``).
        cut_stop_rate: When set (large problems only), the cut relaxation gets all the time and
            stops once its bound falls more slowly than this (relative, per second, over its
            last two rounds); :func:`solve_milp` then returns at once, leaving the rest of the
            time to its caller (``solve(method="auto")`` gives it to the search); likewise when
            the loop stalls (four rounds gain less than ``min_relative_improvement``: at CUB
            scale after 1 470 s, and the x-column root and branch and bound after it did not
            move the bound in the 2 130 s left). Only when the cut loop converges (no cut
            violated) do the usual root phase and branch and bound follow.
    """

    search_share: float = 0.15
    max_search_s: float = 10.0
    root_share: float = 0.3
    root_share_priced: float = 0.9
    full_model_max_columns: int = 20_000
    initial_features_per_selected: float = 3.0
    initial_depth_per_class: float = 2.0
    features_added_per_round: int = 200
    max_cuts_per_round: int = 300
    min_relative_improvement: float = 2e-4
    threads: int = 1
    cut_bound: bool = True
    cut_drop_slack_after: int | None = 2
    cut_drop_kinds: tuple[str, ...] = ("clique", "pair", "class")
    cut_stop_rate: float | None = None


def distinct_set_cut_holds(x: np.ndarray, group: Sequence[int], feature_set: Sequence[int]) -> bool:
    """Whether a 0/1 class-feature matrix satisfies the distinctness cut of a group and a set.

    The cut says: at most one class of ``group`` uses exactly the set ``feature_set``. With every
    class using exactly ``len(feature_set)`` features, that is
    ``sum_{c in group} max(0, sum_{d in set} x[c,d] - (k - 1)) <= 1``.

    Args:
        x: (n_c, n_f) assignment, every row with exactly k ones.
        group: Class indices.
        feature_set: The k feature ids.

    Returns:
        True when the cut holds for ``x``.
    """
    k = len(feature_set)
    hits = x[np.ix_(list(group), list(feature_set))].sum(axis=1)  # (|group|,)
    return float(np.maximum(hits - (k - 1), 0).sum()) <= 1 + 1e-9


# ----------------------------------------------------------------------------------------------
# the relaxation


@dataclass
class _LpResult:
    value: float
    columns: np.ndarray
    row_duals: np.ndarray
    bound: float  # Lagrangian bound of the whole problem at these duals
    excluded_reduced_costs: np.ndarray  # (n_f,) reduced cost of every feature not in the model


@dataclass
class _Rows:
    """A growing sparse matrix in triplets, with row bounds."""

    rows: list[np.ndarray] = field(default_factory=list)
    columns: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    lower: list[np.ndarray] = field(default_factory=list)
    upper: list[np.ndarray] = field(default_factory=list)
    count: int = 0


class _Relaxation:
    """The MILP model on HiGHS, grown by features, class depth, cuts and distinctness rows.

    Keeps its own copy of the matrix so that Lagrangian bounds are computed from the duals with
    exact weak duality, independently of the LP solver's tolerances.
    """

    def __init__(
        self,
        problem: AssignmentProblem,
        *,
        depth: np.ndarray,
        seed: int,
        threads: int,
        lazy_pairs: bool = False,
    ) -> None:
        import highspy

        self._highspy = highspy
        self.problem = problem
        self.scale = problem.class_scale
        self.n_classes = problem.n_classes
        self.n_all = problem.n_all_features
        self.k = problem.n_per_class
        self.infinity = float(highspy.kHighsInf)
        highs = new_highs(threads=threads, seed=seed)
        highs.changeObjectiveSense(highspy.ObjSense.kMaximize)
        self.highs = highs

        # every class's features best-first, and each feature's rank in every class
        self.order = np.argsort(-problem.A, axis=1, kind="stable").astype(np.int32)  # (n_c, n_f)
        self.rank = np.empty_like(self.order)  # (n_c, n_f)
        np.put_along_axis(
            self.rank, self.order, np.arange(self.n_all, dtype=np.int32)[None, :], axis=1
        )
        self.depth = np.minimum(depth.astype(np.int64), self.n_all)

        # column data mirrored here: cost, bounds, kind
        self.cost: list[float] = []
        self.col_lower: list[float] = []
        self.col_upper: list[float] = []
        self.matrix = _Rows()
        self._csc: sparse.csc_matrix | None = None

        self.feature_column = np.full(self.n_all, -1, dtype=np.int64)
        self.features: list[int] = []
        self.x_column: dict[tuple[int, int], int] = {}
        self.pair_column: dict[tuple[int, int], int] = {}
        self.y_upper_rows: set[tuple[int, int]] = set()
        self.no_goods: set[tuple[int, ...]] = set()
        self.distinct_indicators: list[tuple[int, int, tuple[int, ...]]] = []
        self.distinct_keys: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
        self.fixed_out: set[int] = set()
        self.penalised = problem.R > 0  # (n_f, n_f)
        # lazy: a pair's y column and row only once the LP violates it or a cut needs it
        self.lazy_pairs = lazy_pairs

        # row 0: cardinality; rows 1..n_c: classes
        self._add_rows(
            np.array([float(problem.n_features)] + [float(self.k)] * self.n_classes),
            np.array([float(problem.n_features)] + [float(self.k)] * self.n_classes),
            [],
        )
        self.tail_column = np.full(self.n_classes, -1, dtype=np.int64)
        tail_costs = np.array([self._tail_cost(c) for c in range(self.n_classes)])
        tails = self._add_columns(
            tail_costs,
            np.zeros(self.n_classes),
            np.where(self.depth < self.n_all, float(self.k), 0.0),
            [(np.array([1 + c]), np.array([1.0])) for c in range(self.n_classes)],
        )
        self.tail_column[:] = tails
        # forced pairs: (column of w[c,c',d], c, c', d)
        self.pair_share_columns: list[tuple[int, int, int, int]] = []

    # -- low-level growth ----------------------------------------------------------------------

    def _tail_cost(self, class_index: int) -> float:
        depth = int(self.depth[class_index])
        if depth >= self.n_all:
            return 0.0
        return self.scale * float(self.problem.A[class_index, self.order[class_index, depth]])

    def _add_columns(
        self,
        costs: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
        entries: list[tuple[np.ndarray, np.ndarray]],
    ) -> np.ndarray:
        """Add columns with their (row indices, values) entries; returns their indices."""
        first = len(self.cost)
        count = len(costs)
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        starts = np.zeros(count, dtype=np.int32)
        lengths = np.array([len(rows) for rows, _ in entries], dtype=np.int64)
        starts[1:] = np.cumsum(lengths)[:-1]
        indices = (
            np.concatenate([rows for rows, _ in entries]).astype(np.int32)
            if lengths.sum()
            else np.zeros(0, dtype=np.int32)
        )
        values = (
            np.concatenate([vals for _, vals in entries]).astype(np.float64)
            if lengths.sum()
            else np.zeros(0)
        )
        self.highs.addCols(
            count,
            np.asarray(costs, dtype=np.float64),
            np.asarray(lower, dtype=np.float64),
            np.asarray(upper, dtype=np.float64),
            int(indices.size),
            starts,
            indices,
            values,
        )
        columns = np.arange(first, first + count, dtype=np.int64)
        self.cost.extend(float(c) for c in costs)
        self.col_lower.extend(float(v) for v in lower)
        self.col_upper.extend(float(v) for v in upper)
        if indices.size:
            self.matrix.rows.append(indices.astype(np.int64))
            self.matrix.columns.append(np.repeat(columns, lengths))
            self.matrix.values.append(values)
        self._csc = None
        return columns

    def _add_rows(
        self,
        lower: np.ndarray,
        upper: np.ndarray,
        entries: list[tuple[np.ndarray, np.ndarray]],
    ) -> np.ndarray:
        """Add rows with their (column indices, values) entries; returns their indices."""
        count = len(lower)
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        first = self.matrix.count
        if entries:
            lengths = np.array([len(cols) for cols, _ in entries], dtype=np.int64)
            indices = np.concatenate([cols for cols, _ in entries]).astype(np.int32)
            values = np.concatenate([vals for _, vals in entries]).astype(np.float64)
        else:
            lengths = np.zeros(count, dtype=np.int64)
            indices = np.zeros(0, dtype=np.int32)
            values = np.zeros(0)
        starts = np.zeros(count, dtype=np.int32)
        starts[1:] = np.cumsum(lengths)[:-1]
        highs_lower = np.where(np.isfinite(lower), lower, -self.infinity)
        highs_upper = np.where(np.isfinite(upper), upper, self.infinity)
        self.highs.addRows(
            count, highs_lower, highs_upper, int(indices.size), starts, indices, values
        )
        rows = np.arange(first, first + count, dtype=np.int64)
        self.matrix.count += count
        self.matrix.lower.append(np.asarray(lower, dtype=np.float64))
        self.matrix.upper.append(np.asarray(upper, dtype=np.float64))
        if indices.size:
            self.matrix.rows.append(np.repeat(rows, lengths))
            self.matrix.columns.append(indices.astype(np.int64))
            self.matrix.values.append(values)
        self._csc = None
        return rows

    # -- model growth --------------------------------------------------------------------------

    def add_features(self, new_features: Sequence[int]) -> None:
        """Add features with their s column, x columns within each class's depth, pair rows."""
        problem = self.problem
        new = [int(d) for d in new_features if self.feature_column[int(d)] < 0]
        if not new:
            return
        s_columns = self._add_columns(
            problem.b[new],
            np.zeros(len(new)),
            np.ones(len(new)),
            [(np.array([0]), np.array([1.0])) for _ in new],
        )
        self.feature_column[new] = s_columns
        self.features.extend(new)
        new_array = np.array(new)
        in_depth = self.rank[:, new_array] < self.depth[:, None]  # (n_c, n_new)
        class_indices, positions = np.nonzero(in_depth)
        self._add_x(class_indices, new_array[positions])

        if not self.lazy_pairs:
            # penalised pairs between the new features and every feature in the model
            members = np.array(self.features)
            self.add_pairs([(d, int(e)) for d in new for e in members[self.penalised[d, members]]])

    def add_pairs(self, pairs: Sequence[tuple[int, int]]) -> int:
        """Add y columns and their rows ``y >= s_d + s_e - 1`` for penalised pairs of model
        features (either order; pairs already there are skipped). Returns the number added."""
        keys = sorted({(min(d, e), max(d, e)) for d, e in pairs} - self.pair_column.keys())
        if not keys:
            return 0
        first = np.array([d for d, _ in keys])
        second = np.array([e for _, e in keys])
        columns = self._add_columns(
            -self.problem.R[first, second],
            np.zeros(first.size),
            np.ones(first.size),
            [(np.zeros(0, dtype=np.int64), np.zeros(0))] * first.size,
        )
        for key, column in zip(keys, columns):
            self.pair_column[key] = int(column)
        # y - s_d - s_e >= -1
        self._add_rows(
            np.full(first.size, -1.0),
            np.full(first.size, np.inf),
            [
                (
                    np.array([column, self.feature_column[d], self.feature_column[e]]),
                    np.array([1.0, -1.0, -1.0]),
                )
                for d, e, column in zip(first, second, columns)
            ],
        )
        return len(keys)

    def complete_pairs(self) -> int:
        """Add every penalised pair among the model's features not fixed out; returns the count."""
        members = np.array([d for d in self.features if d not in self.fixed_out])
        if members.size < 2:
            return 0
        inner = np.triu(self.penalised[np.ix_(members, members)], 1)
        first, second = np.nonzero(inner)
        return self.add_pairs(list(zip(members[first].tolist(), members[second].tolist())))

    def violated_pairs(self, s_values: np.ndarray) -> list[tuple[int, int]]:
        """Penalised pairs without a y column whose ``s_d + s_e`` exceeds 1 at the LP's s.

        Args:
            s_values: (n_model_features,) LP values of s, aligned with ``self.features``.
        """
        features = np.array(self.features)
        support = np.flatnonzero(s_values > 1e-6)
        ids, values = features[support], s_values[support]
        over = np.triu(
            self.penalised[np.ix_(ids, ids)] & (values[:, None] + values[None, :] > 1 + 1e-6), 1
        )
        first, second = np.nonzero(over)
        return [
            (int(ids[i]), int(ids[j]))
            for i, j in zip(first, second)
            if (int(min(ids[i], ids[j])), int(max(ids[i], ids[j]))) not in self.pair_column
        ]

    def _add_x(self, class_indices: np.ndarray, feature_ids: np.ndarray) -> None:
        """Add x[c,d] columns and their rows x - s <= 0."""
        if class_indices.size == 0:
            return
        costs = self.scale * self.problem.A[class_indices, feature_ids]
        columns = self._add_columns(
            costs,
            np.zeros(costs.size),
            np.ones(costs.size),
            [(np.array([1 + c]), np.array([1.0])) for c in class_indices],
        )
        for c, d, column in zip(class_indices, feature_ids, columns):
            self.x_column[(int(c), int(d))] = int(column)
        self._add_rows(
            np.full(costs.size, -np.inf),
            np.zeros(costs.size),
            [
                (np.array([column, self.feature_column[d]]), np.array([1.0, -1.0]))
                for d, column in zip(feature_ids, columns)
            ],
        )

    def deepen(self, class_indices: Sequence[int]) -> int:
        """Double the depth of the given classes; returns the number of x columns added."""
        added_classes, added_features = [], []
        for c in class_indices:
            old = int(self.depth[c])
            if old >= self.n_all:
                continue
            new = min(self.n_all, max(2 * old, old + 8))
            self.depth[c] = new
            for d in self.order[c, old:new]:
                if self.feature_column[d] >= 0:
                    added_classes.append(int(c))
                    added_features.append(int(d))
            column = int(self.tail_column[c])
            self.cost[column] = self._tail_cost(c)
            self.highs.changeColCost(column, self.cost[column])
            if new >= self.n_all:
                self.col_upper[column] = 0.0
                self.highs.changeColBounds(column, 0.0, 0.0)
        self._add_x(
            np.array(added_classes, dtype=np.int64), np.array(added_features, dtype=np.int64)
        )
        self._csc = None
        return len(added_classes)

    def add_clique_cut(self, clique: Sequence[int], t: int) -> None:
        """``t * sum_Q s - sum_{pairs in Q} y <= t(t+1)/2`` for a clique Q of penalised pairs."""
        self.add_pairs(list(itertools.combinations(clique, 2)))
        columns = [int(self.feature_column[d]) for d in clique]
        values = [float(t)] * len(columns)
        for i, d in enumerate(clique):
            for e in clique[i + 1 :]:
                columns.append(self.pair_column[(min(d, e), max(d, e))])
                values.append(-1.0)
        self._add_rows(
            np.array([-np.inf]),
            np.array([t * (t + 1) / 2.0]),
            [(np.array(columns), np.array(values))],
        )

    def add_pair_upper_links(self, pairs: Sequence[tuple[int, int]]) -> None:
        """``y[d,e] <= s[d]`` and ``y[d,e] <= s[e]`` for the given pairs."""
        entries = []
        for pair in pairs:
            if pair in self.y_upper_rows:
                continue
            self.y_upper_rows.add(pair)
            column = self.pair_column[pair]
            for d in pair:
                entries.append((np.array([column, self.feature_column[d]]), np.array([1.0, -1.0])))
        if entries:
            self._add_rows(np.full(len(entries), -np.inf), np.zeros(len(entries)), entries)

    def add_distinct_cut(self, group: Sequence[int], feature_set: Sequence[int]) -> bool:
        """At most one class of ``group`` uses exactly ``feature_set``; False if not expressible."""
        k = self.k
        for c in group:
            for d in feature_set:
                if (int(c), int(d)) not in self.x_column:
                    return False
        z_columns = self._add_columns(
            np.zeros(len(group)),
            np.zeros(len(group)),
            np.ones(len(group)),
            [(np.zeros(0, dtype=np.int64), np.zeros(0))] * len(group),
        )
        entries = []
        for c, z in zip(group, z_columns):
            self.distinct_indicators.append((int(z), int(c), tuple(int(d) for d in feature_set)))
            columns = [int(z)] + [self.x_column[(int(c), int(d))] for d in feature_set]
            entries.append((np.array(columns), np.array([1.0] + [-1.0] * len(feature_set))))
        # z_c - sum_{d in T} x[c,d] >= 1 - k
        self._add_rows(np.full(len(group), 1.0 - k), np.full(len(group), np.inf), entries)
        self._add_rows(np.array([-np.inf]), np.array([1.0]), [(z_columns, np.ones(len(group)))])
        return True

    def add_forced_pairs(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Rows making each pair share exactly k - 1 features (needs the full model's x columns).

        For every feature d: ``w <= x[c,d]``, ``w <= x[c',d]``, ``w >= x[c,d] + x[c',d] - 1`` and
        ``sum_d w = k - 1``, which the products w = x[c,d] x[c',d] of any feasible solution meet.
        """
        for first, second in pairs:
            features = [
                d
                for d in range(self.n_all)
                if (first, d) in self.x_column and (second, d) in self.x_column
            ]
            if len(features) < self.n_all:
                raise RuntimeError("forced pairs need every x column (the full model)")
            count = len(features)
            w_columns = self._add_columns(
                np.zeros(count),
                np.zeros(count),
                np.ones(count),
                [(np.zeros(0, dtype=np.int64), np.zeros(0))] * count,
            )
            upper_entries = []
            lower_entries = []
            for d, w in zip(features, w_columns):
                self.pair_share_columns.append((int(w), first, second, d))
                x_first, x_second = self.x_column[(first, d)], self.x_column[(second, d)]
                upper_entries.append((np.array([int(w), x_first]), np.array([1.0, -1.0])))
                upper_entries.append((np.array([int(w), x_second]), np.array([1.0, -1.0])))
                lower_entries.append(
                    (np.array([int(w), x_first, x_second]), np.array([1.0, -1.0, -1.0]))
                )
            self._add_rows(np.full(2 * count, -np.inf), np.zeros(2 * count), upper_entries)
            self._add_rows(np.full(count, -1.0), np.full(count, np.inf), lower_entries)
            self._add_rows(
                np.array([float(self.k - 1)]),
                np.array([float(self.k - 1)]),
                [(w_columns, np.ones(count))],
            )

    def add_no_good(self, selection: Sequence[int]) -> None:
        """Exclude one selection: ``sum_{d in S} s[d] <= K - 1``.

        Not valid for the problem itself, only for the search that remains once the selection's
        exact value is known (the incumbent is at least that value, so the bound stays valid).
        """
        key = tuple(sorted(int(d) for d in selection))
        if key in self.no_goods:
            return
        self.no_goods.add(key)
        columns = self.feature_column[list(key)]
        self._add_rows(
            np.array([-np.inf]),
            np.array([float(len(key) - 1)]),
            [(columns, np.ones(len(key)))],
        )

    def fix_out(self, features: Sequence[int]) -> None:
        """Fix s[d] = 0 for features proven to be in no better solution."""
        for d in features:
            column = int(self.feature_column[d])
            if column >= 0 and d not in self.fixed_out:
                self.fixed_out.add(int(d))
                self.col_upper[column] = 0.0
                self.highs.changeColBounds(column, 0.0, 0.0)

    def _set_integer(self, columns: Sequence[int]) -> None:
        columns_array = np.asarray(columns, dtype=np.int32)
        self.highs.changeColsIntegrality(
            columns_array.size,
            columns_array,
            np.full(columns_array.size, self._highspy.HighsVarType.kInteger),
        )

    def set_selection_integer(self) -> None:
        """Declare every s column integer (for the branch-and-bound phase)."""
        columns = self.feature_column[self.feature_column >= 0]
        self._set_integer(columns.tolist())

    # -- solving -------------------------------------------------------------------------------

    def _matrix_csc(self) -> sparse.csc_matrix:
        if self._csc is None:
            n_rows, n_columns = self.matrix.count, len(self.cost)
            if self.matrix.rows:
                self._csc = sparse.csc_matrix(
                    (
                        np.concatenate(self.matrix.values),
                        (np.concatenate(self.matrix.rows), np.concatenate(self.matrix.columns)),
                    ),
                    shape=(n_rows, n_columns),
                )
            else:
                self._csc = sparse.csc_matrix((n_rows, n_columns))
        return self._csc

    def solve_lp(self, time_limit_s: float) -> _LpResult | None:
        """Solve the LP relaxation; None when it did not finish."""
        highs = self.highs
        # an LP solve measures HiGHS's time limit against the run time the object accumulated
        # over all its runs (a MIP solve measures it from its own start: highspy 1.15), so the
        # root's re-solves must add what earlier rounds spent or they stop at once
        highs.setOptionValue(
            "time_limit", float(highs.getRunTime()) + max(0.05, float(time_limit_s))
        )
        highs.setOptionValue("solve_relaxation", True)
        # HiGHS checks its time limit rarely inside a large LP: the callback enforces it
        deadline = time.perf_counter() + float(time_limit_s)
        kinds = self._highspy.cb.HighsCallbackType

        def interrupt(kind: int, message: str, data_out: Any, data_in: Any, user: Any) -> None:
            data_in.user_interrupt = time.perf_counter() > deadline

        highs.setCallback(interrupt, None)  # type: ignore[arg-type]
        highs.startCallback(kinds.kCallbackSimplexInterrupt)
        try:
            highs.run()
        finally:
            highs.stopCallback(kinds.kCallbackSimplexInterrupt)
            highs.setOptionValue("solve_relaxation", False)
        status = highs.getModelStatus()
        if status != self._highspy.HighsModelStatus.kOptimal:
            _logger.debug("LP stopped with %s", highs.modelStatusToString(status))
            return None
        solution = highs.getSolution()
        columns = np.asarray(solution.col_value)
        duals = np.asarray(solution.row_dual)
        bound, excluded = self.lagrangian_bound(duals)
        return _LpResult(
            value=float(highs.getInfo().objective_function_value),
            columns=columns,
            row_duals=duals,
            bound=bound,
            excluded_reduced_costs=excluded,
        )

    def lagrangian_bound(self, row_duals: np.ndarray) -> tuple[float, np.ndarray]:
        """A valid upper bound on the whole problem from any row duals (weak duality).

        Returns:
            ``(bound, excluded)``: the bound, and (n_f,) the reduced cost of every feature that is
            not in the model (-inf for those that are).
        """
        lower = np.concatenate(self.matrix.lower)
        upper = np.concatenate(self.matrix.upper)
        duals = self._padded_duals(row_duals)
        # a maximisation's dual of a "<=" row is >= 0 and of a ">=" row <= 0; round-off signs go
        duals[~np.isfinite(lower) & (duals < 0)] = 0.0
        duals[~np.isfinite(upper) & (duals > 0)] = 0.0
        cost = np.asarray(self.cost)
        reduced = cost - self._matrix_csc().T @ duals  # (n_columns,)
        column_lower = np.asarray(self.col_lower)
        column_upper = np.asarray(self.col_upper)
        row_term = np.where(duals > 0, duals * np.where(np.isfinite(upper), upper, 0.0), 0.0)
        row_term += np.where(duals < 0, duals * np.where(np.isfinite(lower), lower, 0.0), 0.0)
        column_term = np.maximum(reduced * column_lower, reduced * column_upper)
        bound = float(row_term.sum() + column_term.sum())

        # left-out features: s at most 1, x rows' duals chosen as max(0, scale A - theta)
        eta, theta = duals[0], duals[1 : 1 + self.n_classes]
        in_depth = self.rank < self.depth[:, None]  # (n_c, n_f)
        gain = np.maximum(self.scale * self.problem.A - theta[:, None], 0.0) * in_depth
        excluded = self.problem.b - eta + gain.sum(axis=0)  # (n_f,)
        excluded[self.feature_column >= 0] = -np.inf
        bound += float(np.maximum(excluded[np.isfinite(excluded)], 0.0).sum())
        return bound, excluded

    def _padded_duals(self, row_duals: np.ndarray) -> np.ndarray:
        """Duals for every current row: rows added after the solve get 0 (always valid)."""
        duals = np.zeros(self.matrix.count)
        given = np.asarray(row_duals, dtype=np.float64)
        duals[: given.size] = given
        return duals

    def reduced_costs(self, row_duals: np.ndarray) -> np.ndarray:
        """Reduced costs of the model's columns at sign-corrected duals (as the bound uses)."""
        lower = np.concatenate(self.matrix.lower)
        upper = np.concatenate(self.matrix.upper)
        duals = self._padded_duals(row_duals)
        duals[~np.isfinite(lower) & (duals < 0)] = 0.0
        duals[~np.isfinite(upper) & (duals > 0)] = 0.0
        result: np.ndarray = np.asarray(self.cost) - self._matrix_csc().T @ duals
        return result

    def start_vector(self, selection: Sequence[int], class_features: list[list[int]]) -> np.ndarray:
        """A full column vector for a solution, for HiGHS's warm start."""
        values = np.zeros(len(self.cost))
        selected = {int(d) for d in selection}
        for d in selected:
            if self.feature_column[d] >= 0:
                values[self.feature_column[d]] = 1.0
        tails = np.zeros(self.n_classes)
        for c, features in enumerate(class_features):
            for d in features:
                column = self.x_column.get((c, int(d)))
                if column is None:
                    tails[c] += 1
                else:
                    values[column] = 1.0
        values[self.tail_column] = tails
        for (d, e), column in self.pair_column.items():
            if d in selected and e in selected:
                values[column] = 1.0
        for column, c, feature_set in self.distinct_indicators:
            values[column] = float(set(feature_set) == {int(d) for d in class_features[c]})
        for column, first, second, d in self.pair_share_columns:
            values[column] = float(d in class_features[first] and d in class_features[second])
        return values


# ----------------------------------------------------------------------------------------------
# separation


def _separate_cliques(
    selection_values: np.ndarray,
    features: np.ndarray,
    pair_value: dict[tuple[int, int], float],
    penalised: np.ndarray,
    *,
    max_cuts: int,
) -> list[tuple[list[int], int, float]]:
    """Greedy separation of clique cuts from an LP solution.

    Args:
        selection_values: (n_model_features,) LP values of s, aligned with ``features``.
        features: Feature ids in the model.
        pair_value: LP value of y per penalised pair (d < e).
        penalised: (n_f, n_f) boolean penalty graph.
        max_cuts: Most cuts returned.

    Returns:
        ``(clique, t, violation)`` triples, most violated first.
    """
    support = np.flatnonzero(selection_values > 1e-6)
    if support.size < 2:
        return []
    ids = features[support]
    values = selection_values[support]
    adjacency = penalised[np.ix_(ids, ids)]  # (n_support, n_support)
    cuts: dict[tuple[int, ...], tuple[list[int], int, float]] = {}
    for start in np.argsort(-values, kind="stable"):
        members = [int(start)]
        candidates = np.flatnonzero(adjacency[start])
        while candidates.size:
            best = int(candidates[np.argmax(values[candidates])])
            members.append(best)
            candidates = candidates[adjacency[best, candidates]]
        if len(members) < 2:
            continue
        key = tuple(sorted(int(ids[m]) for m in members))
        if key in cuts:
            continue
        total = float(values[members].sum())
        t = math.floor(total)
        if t < 1:
            continue
        paid = sum(
            pair_value.get((key[i], key[j]), 0.0)
            for i in range(len(key))
            for j in range(i + 1, len(key))
        )
        violation = t * total - t * (t + 1) / 2.0 - paid
        if violation > 1e-4:
            cuts[key] = (list(key), t, violation)
    ranked = sorted(cuts.values(), key=lambda cut: -cut[2])
    return ranked[:max_cuts]


# ----------------------------------------------------------------------------------------------
# the solver


class _Clock:
    def __init__(self, time_limit_s: float) -> None:
        self.started = time.perf_counter()
        self.deadline = self.started + time_limit_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.deadline - time.perf_counter()


@dataclass
class _State:
    problem: AssignmentProblem
    clock: _Clock
    progress: ProgressCallback | None
    selection: list[int]
    class_features: list[list[int]]
    objective: float
    bound: float = math.inf
    log: list[str] = field(default_factory=list)
    evaluated: dict[tuple[int, ...], float] = field(default_factory=dict)

    def note(self, message: str) -> None:
        self.log.append(f"{self.clock.elapsed():7.2f}s {message}")
        _logger.info("milp: %s", message)
        if self.progress is not None:
            bound = None if math.isinf(self.bound) else max(self.bound, self.objective)
            self.progress(
                SolverProgress(
                    elapsed_s=self.clock.elapsed(),
                    objective=self.objective,
                    bound=bound,
                    gap=relative_gap(self.objective, bound),
                    message=message,
                )
            )

    def offer(self, selection: Sequence[int]) -> bool:
        """Evaluate a selection exactly; keep it if it beats the incumbent."""
        from openqpm.solver.search import assign_classes

        key = tuple(sorted(int(d) for d in selection))
        if len(key) != self.problem.n_features or len(set(key)) != len(key):
            return False
        if key in self.evaluated:
            return False
        class_features, value = assign_classes(self.problem, list(key))
        self.evaluated[key] = value
        if value > self.objective + 1e-9 * max(1.0, abs(self.objective)):
            self.selection, self.class_features, self.objective = list(key), class_features, value
            return True
        return False

    def tighten(self, bound: float) -> None:
        self.bound = min(self.bound, bound)


def _start_state(
    problem: AssignmentProblem,
    clock: _Clock,
    *,
    start: Assignment | Sequence[int] | np.ndarray | None,
    seed: int,
    progress: ProgressCallback | None,
    options: MilpOptions,
) -> _State:
    """The incumbent: the given start, or a short structured search."""
    from openqpm.solver.search import start_solution

    search_s = min(options.search_share * clock.left(), options.max_search_s)
    selection, class_features, value, source = start_solution(
        problem, start, search_s=search_s, seed=seed
    )
    state = _State(
        problem=problem,
        clock=clock,
        progress=progress,
        selection=sorted(int(d) for d in selection),
        class_features=class_features,
        objective=value,
    )
    state.evaluated[tuple(state.selection)] = value
    state.note(f"incumbent from {source}: {value:.6f}")
    return state


def solve_milp(
    problem: AssignmentProblem,
    *,
    time_limit_s: float,
    seed: int = 0,
    start: Assignment | Sequence[int] | np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    options: MilpOptions | None = None,
) -> Assignment:
    """Solve the linear MILP on HiGHS: the optimum, or the best solution with a certified bound.

    Args:
        problem: The problem.
        time_limit_s: Wall-clock budget (the search for a start, if any, included).
        seed: HiGHS's random seed and the search's seed.
        start: A solution or a selection to start from; without one a short structured search
            provides it.
        progress: Called with a :class:`SolverProgress` at each phase and improvement.
        options: Tuning (see :class:`MilpOptions`).

    Returns:
        The best solution found, ``method="milp"``, with ``bound`` a proven upper bound on the
        optimum and ``gap`` the relative gap (0 when optimality is proven); both None only when
        the time ran out before the first relaxation was solved.

    Raises:
        ValueError: If ``time_limit_s`` is not positive or ``start`` is not a valid selection.
        ImportError: If highspy is not installed.
    """
    if not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be positive, got {time_limit_s}")
    options = options or MilpOptions()
    clock = _Clock(float(time_limit_s))
    state = _start_state(problem, clock, start=start, seed=seed, progress=progress, options=options)
    _run(problem, state, seed=seed, options=options)
    bound: float | None = max(state.bound, state.objective)
    if bound is not None and math.isinf(bound):
        bound = None  # the time ran out before the first relaxation was solved
        state.note("no bound: the time ran out before the first relaxation")
    elif bound is not None and bound - state.objective <= 1e-9 * max(1.0, abs(state.objective)):
        bound = state.objective  # proven optimal up to round-off
    return Assignment(
        selected_features=state.selection,
        class_features=state.class_features,
        objective=state.objective,
        bound=bound,
        gap=relative_gap(state.objective, bound),
        method="milp",
        time_s=clock.elapsed(),
        log=state.log,
    )


def _initial_model(
    problem: AssignmentProblem, state: _State, *, seed: int, options: MilpOptions
) -> _Relaxation:
    """The starting model: everything for small problems; for large ones the incumbent's
    features plus those worth most at the incumbent's class prices, with short class lists."""
    n_all, n_classes = problem.n_all_features, problem.n_classes
    # forced pairs need every class-feature column: no pricing then (see the module docstring)
    full = n_all * n_classes <= options.full_model_max_columns or bool(problem.forced_pairs)
    if full:
        depth = np.full(n_classes, n_all)
        features = list(range(n_all))
    else:
        expected = n_all * problem.n_per_class / problem.n_features
        depth = np.full(n_classes, math.ceil(options.initial_depth_per_class * expected))
        # prices from the incumbent: each class's k-th best value inside the selection
        selected_values = np.sort(problem.A[:, state.selection], axis=1)  # (n_c, K)
        theta = problem.class_scale * selected_values[:, -problem.n_per_class]
        worth = problem.b + np.maximum(problem.class_scale * problem.A - theta[:, None], 0).sum(0)
        n_initial = int(options.initial_features_per_selected * problem.n_features)
        features = sorted(set(state.selection) | set(np.argsort(-worth)[:n_initial].tolist()))
    model = _Relaxation(
        problem, depth=depth, seed=seed, threads=options.threads, lazy_pairs=not full
    )
    model.add_features(features)
    model.add_forced_pairs(problem.forced_pairs)
    state.note(
        f"model: {len(model.features)} features, {len(model.x_column)} class-feature columns, "
        f"{len(model.pair_column)} penalised pairs"
        + (" (full)" if full else "")
        + (
            f", {len(problem.forced_pairs)} forced pairs (feature pricing off)"
            if problem.forced_pairs
            else ""
        )
    )
    return model


def _run(problem: AssignmentProblem, state: _State, *, seed: int, options: MilpOptions) -> None:
    """Root phase (pricing, class depth, cuts), reduced-cost fixing, then branch and bound."""
    clock = state.clock
    model = _initial_model(problem, state, seed=seed, options=options)
    full = (
        model.depth.min() >= problem.n_all_features
        and len(model.features) == problem.n_all_features
    )
    if not full and options.cut_bound:
        share = 1.0 if options.cut_stop_rate is not None else options.root_share_priced
        stopped = _cut_root(problem, state, time_s=clock.left() * share, seed=seed, options=options)
        # with a stop rate (auto), a cut loop that stalls or slows hands the rest back: the
        # x-column root and branch and bound after it never moved the bound at this size
        if clock.left() <= 0 or (options.cut_stop_rate is not None and stopped != "converged"):
            return
    root_time_s = clock.left() * (options.root_share if full else options.root_share_priced)
    root_started = clock.elapsed()
    last: _LpResult | None = None
    history: list[float] = []
    round_index = 0
    while clock.elapsed() - root_started < root_time_s and clock.left() > 0:
        round_index += 1
        lp_started = clock.elapsed()
        result = model.solve_lp(clock.left())
        lp_seconds = clock.elapsed() - lp_started
        if result is None:
            break
        last = result
        state.tighten(result.bound)
        history.append(result.bound)
        features = np.array(model.features)
        s_values = result.columns[model.feature_column[features]]
        # a rounding of the LP: its most selected features
        state.offer(features[np.argsort(-s_values, kind="stable")[: problem.n_features]].tolist())

        # separate cuts, price features in, deepen classes whose tail is used: all in one round
        # (the separation reads the solution, so it runs before the model grows)
        pair_value = {pair: float(result.columns[col]) for pair, col in model.pair_column.items()}
        violated_links = [
            pair
            for pair, value in pair_value.items()
            if value
            > min(
                result.columns[model.feature_column[pair[0]]],
                result.columns[model.feature_column[pair[1]]],
            )
            + 1e-6
        ]
        cuts = _separate_cliques(
            s_values, features, pair_value, model.penalised, max_cuts=options.max_cuts_per_round
        )
        tails = result.columns[model.tail_column]
        deep = [
            c
            for c in np.flatnonzero(tails > 1e-6).tolist()
            if model.depth[c] < problem.n_all_features
        ]
        positive = np.flatnonzero(result.excluded_reduced_costs > 1e-9)
        chosen = positive[np.argsort(-result.excluded_reduced_costs[positive], kind="stable")]
        chosen = chosen[: options.features_added_per_round]
        n_pairs = model.add_pairs(model.violated_pairs(s_values)) if model.lazy_pairs else 0
        model.add_pair_upper_links(violated_links)
        for clique, t, _ in cuts:
            model.add_clique_cut(clique, t)
        model.add_features(chosen.tolist())
        model.deepen(deep)
        state.note(
            f"root round {round_index}: LP {result.value:.4f}, bound {state.bound:.4f}; "
            f"+{chosen.size} features, {len(deep)} deeper classes, {len(cuts)} clique cuts, "
            f"{len(violated_links)} links, +{n_pairs} pairs"
        )
        if not (chosen.size or deep or cuts or violated_links or n_pairs):
            break
        window = 4
        if len(history) > window and (history[-window - 1] - history[-1]) < (
            window * options.min_relative_improvement * max(1.0, abs(history[-1]))
        ):
            break
    if last is None or clock.left() <= 0:
        return

    # reduced-cost fixing against the incumbent, at the last duals (rows added since get 0)
    bound, excluded = model.lagrangian_bound(last.row_duals)
    state.tighten(bound)
    reduced = model.reduced_costs(last.row_duals)
    features = np.array(model.features)
    feature_reduced = reduced[model.feature_column[features]]
    # with s[d] = 1 forced, the Lagrangian bound drops by -rc (rc < 0): below the incumbent, no
    # solution with d can beat it
    out = features[bound + np.minimum(feature_reduced, 0.0) < state.objective]
    # the incumbent's own features cannot qualify; round-off must not make them
    out = np.setdiff1d(out, state.selection)
    model.fix_out(out.tolist())
    state.note(f"reduced-cost fixing: {out.size} of {features.size} features fixed to 0")
    if not full and clock.left() < _COLD_LP_FACTOR * lp_seconds:
        # HiGHS solves the branch-and-bound root from scratch and cannot be interrupted during
        # it: starting it this late would overrun the time limit for nothing
        state.note(f"branch and bound skipped: {clock.left():.1f}s left, too little for this model")
        return
    if model.lazy_pairs:
        # integer selections must pay every penalised pair they hold
        state.note(f"branch and bound: {model.complete_pairs()} penalised pairs completed")
    _branch_and_bound(problem, state, model, bound, excluded, seed=seed)


def _cut_root(
    problem: AssignmentProblem, state: _State, *, time_s: float, seed: int, options: MilpOptions
) -> str:
    """The root bound from :func:`openqpm.solver.bound.cut_relaxation_bound`; each round's LP
    selection, rounded to its ``n_features`` largest values, is offered as an incumbent.
    Returns why the cut loop stopped (``CutBound.stopped``)."""
    from openqpm.solver.bound import cut_relaxation_bound

    def on_round(round_index: int, bound: float, selection_values: np.ndarray) -> None:
        state.tighten(bound)
        rounded = np.argsort(-selection_values, kind="stable")[: problem.n_features]
        improved = state.offer(rounded.tolist())
        state.note(
            f"cut bound round {round_index}: bound {state.bound:.4f}"
            + (f"; new incumbent {state.objective:.6f}" if improved else "")
        )

    result = cut_relaxation_bound(
        problem,
        time_limit_s=max(0.0, time_s),
        seed=seed,
        max_cuts_per_round=options.max_cuts_per_round,
        drop_slack_after=options.cut_drop_slack_after,
        drop_kinds=options.cut_drop_kinds,
        min_relative_improvement=options.min_relative_improvement,
        min_rate_per_s=options.cut_stop_rate,
        on_round=on_round,
    )
    state.note(
        f"cut bound: {result.rounds} rounds, bound {state.bound:.4f}, stopped: {result.stopped}"
        + (f" ({result.log[-1]})" if result.log else "")
    )
    return result.stopped


def _branch_and_bound(
    problem: AssignmentProblem,
    state: _State,
    model: _Relaxation,
    root_bound: float,
    excluded_reduced_costs: np.ndarray,
    *,
    seed: int,
) -> None:
    """HiGHS's branch and bound on the model, restarted with new distinctness cuts.

    HiGHS has no lazy-constraint callback, so a run is interrupted as soon as it finds a solution
    that the relaxation overrates (duplicate classes): the collisions of that selection become
    cuts, or, when none is new, the selection (now evaluated exactly) is excluded, and the run
    restarts warm from the incumbent. A run that ends optimal with a value no better than the
    incumbent proves the incumbent optimal.
    """
    import highspy

    callback_type = highspy.cb.HighsCallbackType
    clock = state.clock
    highs = model.highs
    model.set_selection_integer()
    excluded = excluded_reduced_costs[np.isfinite(excluded_reduced_costs)]
    # a solution using left-out features E is worth at most L_F + sum_{d in E} rc_d with
    # L_F = root bound - sum of positive rc, and E holds at least one feature
    outside_bound = root_bound + min(0.0, float(excluded.max())) if excluded.size else -math.inf
    tolerance = 1e-7 * max(1.0, abs(state.objective))
    overrated: list[list[int]] = []
    run_started = [time.perf_counter()]
    interrupt_window_s = [1.0]

    def callback(kind: int, message: str, data_out: Any, data_in: Any, user: Any) -> None:
        if kind == callback_type.kCallbackMipImprovingSolution:
            values = np.asarray(data_out.mip_solution)
            features = np.array(model.features)
            chosen = sorted(features[values[model.feature_column[features]] > 0.5].tolist())
            if state.offer(chosen):
                state.note(f"branch and bound: new incumbent {state.objective:.6f}")
            exact = state.evaluated.get(tuple(chosen))
            if exact is not None and float(data_out.objective_function_value) > exact + tolerance:
                overrated.append(chosen)
        elif kind == callback_type.kCallbackSimplexInterrupt:
            # the LPs of a large model (the root's above all) run long between MIP checks
            data_in.user_interrupt = clock.left() <= 0
        elif kind == callback_type.kCallbackMipInterrupt:
            dual_bound = float(data_out.mip_dual_bound)
            if math.isfinite(dual_bound):
                state.tighten(max(dual_bound, outside_bound))
            # restarting is cheap while the tree is young; an old tree is worth finishing. The
            # input struct outlives a run: the flag must be cleared as well as set.
            young = time.perf_counter() - run_started[0] < interrupt_window_s[0]
            data_in.user_interrupt = (bool(overrated) and young) or clock.left() <= 0

    def settle(selection: Sequence[int]) -> tuple[int, int]:
        """Cut the collisions of a selection, or exclude it; returns (cuts, exclusions)."""
        added = 0
        groups = _anticipated_duplicates(problem, selection, n_sets_per_class=_ANTICIPATED_SETS)
        for group, feature_set in groups:
            key = (tuple(group), tuple(feature_set))
            if key not in model.distinct_keys:
                model.distinct_keys.add(key)
                added += int(model.add_distinct_cut(group, feature_set))
        if added:
            return added, 0
        model.add_no_good(selection)
        return 0, 1

    cuts, _ = settle(state.selection)
    state.note(f"branch and bound: {cuts} distinctness cuts anticipated from the incumbent")
    highs.setCallback(callback, None)  # type: ignore[arg-type]
    highs.startCallback(callback_type.kCallbackMipImprovingSolution)
    highs.startCallback(callback_type.kCallbackMipInterrupt)
    highs.startCallback(callback_type.kCallbackSimplexInterrupt)
    try:
        while clock.left() > 0.05:
            highs.setOptionValue("time_limit", clock.left())
            highs.setOptionValue("mip_rel_gap", 1e-7)
            solution = highspy.HighsSolution()
            solution.col_value = model.start_vector(state.selection, state.class_features).tolist()
            solution.value_valid = True
            highs.setSolution(solution)
            overrated.clear()
            run_started[0] = time.perf_counter()
            interrupt_window_s[0] = max(1.0, 0.05 * clock.left())
            highs.run()
            status = highs.getModelStatus()
            info = highs.getInfo()
            if status == highspy.HighsModelStatus.kOptimal:
                values = np.asarray(highs.getSolution().col_value)
                features = np.array(model.features)
                chosen = sorted(features[values[model.feature_column[features]] > 0.5].tolist())
                state.offer(chosen)
                relaxed_value = float(info.objective_function_value)
                if relaxed_value <= state.objective + tolerance:
                    # no selection left unsettled is worth more than the incumbent
                    state.tighten(state.objective)
                    state.note("branch and bound: optimal")
                    return
                state.tighten(max(relaxed_value, outside_bound))
                overrated.append(chosen)
            elif status != highspy.HighsModelStatus.kInterrupt or not overrated:
                dual_bound = float(info.mip_dual_bound)
                if math.isfinite(dual_bound):
                    state.tighten(max(dual_bound, outside_bound))
                state.note(f"branch and bound stopped: {highs.modelStatusToString(status)}")
                return
            cuts = exclusions = 0
            for selection in overrated:
                new_cuts, new_exclusions = settle(selection)
                cuts += new_cuts
                exclusions += new_exclusions
            state.note(
                f"branch and bound: restart with {cuts} distinctness cuts, "
                f"{exclusions} selections excluded"
            )
    finally:
        highs.stopCallback(callback_type.kCallbackMipImprovingSolution)
        highs.stopCallback(callback_type.kCallbackMipInterrupt)
        highs.stopCallback(callback_type.kCallbackSimplexInterrupt)


def _anticipated_duplicates(
    problem: AssignmentProblem, selection: Sequence[int], *, n_sets_per_class: int
) -> list[tuple[list[int], list[int]]]:
    """Groups of classes that share one of their best sets inside a selection.

    For every class, its ``n_sets_per_class`` best k-subsets of its k+2 best selected features;
    every subset that is among the best of two or more classes gives a group. Cutting these before
    branching saves the re-solves that would discover the collisions one at a time (each cut is
    valid whatever the selection, so anticipating can only cost rows).
    """
    k = problem.n_per_class
    selected = np.asarray(sorted(int(d) for d in selection))
    values = problem.A[:, selected]  # (n_c, K)
    width = min(k + _ANTICIPATED_EXTRA, selected.size)
    best = np.argsort(-values, axis=1, kind="stable")[:, :width]  # (n_c, width)
    combinations = np.array(list(itertools.combinations(range(width), k)))  # (n_comb, k)
    class_sets = []
    for c in range(problem.n_classes):
        members = best[c, combinations]  # (n_comb, k) positions in the selection
        totals = values[c, members].sum(axis=1)
        for row in np.argsort(-totals, kind="stable")[:n_sets_per_class]:
            class_sets.append((c, tuple(sorted(int(d) for d in selected[members[row]]))))
    return [(group, list(key)) for group, key in shared_sets(class_sets)]
