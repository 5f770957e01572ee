"""Structured search: a fast anytime heuristic for the QPM selection-and-assignment problem.

Two observations make the problem a search over selections only:

1. For a fixed selection S the objective's redundancy and bias terms are fixed, and the best
   assignment gives every class its ``n_per_class`` highest-A features inside S, except that
   classes may collide on the same set. Making them distinct is an assignment problem (classes to
   distinct subsets of S); :func:`assign_classes` solves it *exactly*: each class's subsets are
   enumerated best-first, a Hungarian algorithm matches classes to subsets, and its dual values
   certify that no subset outside the enumerated lists could do better (otherwise the lists of the
   classes concerned grow and the matching is solved again).
2. Swapping one selected feature out and one candidate in changes each class's top set in a way
   that depends only on the class's k-th and (k+1)-th best values inside S, so the *relaxed* change
   (duplicates ignored) of every one of the ``n_features x n_f`` swaps is one matrix product.
   The relaxed value is an upper bound on the exact one, so a swap whose relaxed value does not beat
   the current exact value can be skipped without evaluating it.

The search: a greedy start (or a given start), descent on the relaxed value, then best-improvement
swap descent on the exact value (only the promising swaps are evaluated exactly), then iterated
"ruin and recreate" (drop a few random features, refill greedily with some randomness, descend)
with occasional full restarts, until the time or iteration limit. Everything random comes from one
seeded generator, so for a fixed ``max_iterations`` the result does not depend on the wall clock.

Forced near-equal class pairs (``problem.forced_pairs``): the assignment of a selection must then
let every pair share exactly ``n_per_class - 1`` features (:func:`_forced_pair_subsets`). An exact
branch and bound finds the best such assignment when it finishes within a work budget (it does when
the pairs' classes barely compete with the others for subsets); otherwise a greedy construction
places each component of the pair graph from its best few starting subsets and matches the other
classes optimally around them (feasible, not proven optimal). Without the budget one evaluation
took minutes on the generated "small" problem with 3 pairs of near-identical classes.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from openqpm.solver.problem import (
    Assignment,
    AssignmentProblem,
    ProgressCallback,
    SolveInterrupted,
    SolverProgress,
    checked_selection,
)

_logger = logging.getLogger(__name__)

__all__ = ["assign_classes", "solve_search"]

# a swap must improve the objective by more than this (relative to max(1, |objective|)) to count
_IMPROVEMENT_RTOL = 1e-9
# at most this many swaps are evaluated exactly per descent step when duplicates make the relaxed
# ranking imprecise; a heuristic cap that keeps one step cheap at ImageNet scale
_MAX_EXACT_EVALUATIONS_PER_STEP = 8
# perturbation ("ruin and recreate"): drop 1..max(2, _RUIN_SHARE * n_features) random features of
# the current selection and refill it greedily, each pick among the _GREEDY_CHOICES best; after
# _RESTART_AFTER rounds without a new best, rebuild the whole selection that way; a round's result
# becomes the current selection unless it is worse than both the current one and the best minus
# _ACCEPT_WORSE_SHARE of its size. Chosen on generated CUB-scale problems (30 s, 2 seeds): plain
# swap kicks and no restarts stalled ~1.9 % below this setting, restarts alone ~0.7 % below.
_RUIN_SHARE = 0.2
_GREEDY_CHOICES = 3
_RESTART_AFTER = 10
_ACCEPT_WORSE_SHARE = 0.004
# pair moves: at a swap-local optimum, the _PAIR_FIRST_MOVES best first swaps by relaxed gain are
# each followed by the best second swap (two swaps that only pay together: on the generated
# "small" problem the search's local optimum was two swaps from a better selection, each swap
# alone worsening it)
_PAIR_FIRST_MOVES = 32
# bound on the memo of evaluated selections (a few hundred bytes each)
_MAX_REMEMBERED_SELECTIONS = 50_000


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Limit BLAS to one thread while searching, restoring the previous setting afterwards.

    The search's matrix products are small (50 x 200 x 2048 at CUB scale); with several BLAS
    threads on a busy machine they run many times slower than on one (``benchmarks/solver.py``).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an optional speed-up (installed with scikit-learn)
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ----------------------------------------------------------------------------------------------
# exact assignment for a fixed selection


class _SubsetEnumerator:
    """The ``k``-subsets of one class's selected features in non-increasing order of their A sum.

    Best-first enumeration over position tuples into the values sorted in descending order: the
    successors of a tuple move one position one step down. Every subset other than the best has a
    predecessor (move its first movable position one step up) whose sum is at least as large, so a
    max-heap pops the subsets in non-increasing order.
    """

    def __init__(self, values: np.ndarray, feature_ids: np.ndarray, k: int) -> None:
        order = np.argsort(-values, kind="stable")
        self._sorted_values = values[order]
        self._sorted_ids = feature_ids[order]
        self._k = k
        first = tuple(range(k))
        self._heap: list[tuple[float, tuple[int, ...]]] = [(-self._sum(first), first)]
        self._seen = {first}
        self.subsets: list[tuple[int, ...]] = []
        self.values: list[float] = []

    def _sum(self, positions: tuple[int, ...]) -> float:
        return float(self._sorted_values[list(positions)].sum())

    @property
    def exhausted(self) -> bool:
        """True when every subset has been produced."""
        return not self._heap

    def extend_to(self, count: int) -> None:
        """Produce subsets until ``count`` exist or none is left."""
        n_values = len(self._sorted_values)
        while len(self.subsets) < count and self._heap:
            negative_value, positions = heapq.heappop(self._heap)
            self.subsets.append(tuple(sorted(int(d) for d in self._sorted_ids[list(positions)])))
            self.values.append(-negative_value)
            for t in range(self._k):
                moved = positions[t] + 1
                limit = positions[t + 1] if t + 1 < self._k else n_values
                if moved < limit:
                    successor = positions[:t] + (moved,) + positions[t + 1 :]
                    if successor not in self._seen:
                        self._seen.add(successor)
                        heapq.heappush(self._heap, (-self._sum(successor), successor))


def _hungarian_max(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximum-weight assignment of every row to a distinct column, with optimal duals.

    Shortest augmenting paths with potentials (the Kuhn-Munkres algorithm in its O(n^2 m) form),
    on costs = -weights; the inner loop is vectorised over the columns.

    Args:
        weights: (n_rows, n_columns) finite, n_rows <= n_columns.

    Returns:
        ``(column_of_row, row_duals, column_duals)`` where ``row_duals[i] + column_duals[j] >=
        weights[i, j]`` for all i, j, ``column_duals >= 0``, equality on the matched pairs, so
        ``row_duals.sum() + column_duals.sum()`` equals the optimum (LP duality).
    """
    n_rows, n_columns = weights.shape
    cost = -weights
    # index 0 is the algorithm's virtual column/row; real ones are 1-based
    row_potential = np.zeros(n_rows + 1)
    column_potential = np.zeros(n_columns + 1)
    row_of_column = np.zeros(n_columns + 1, dtype=np.int64)
    previous_column = np.zeros(n_columns + 1, dtype=np.int64)
    for row in range(1, n_rows + 1):
        row_of_column[0] = row
        column = 0
        min_slack = np.full(n_columns + 1, np.inf)
        used = np.zeros(n_columns + 1, dtype=bool)
        while True:
            used[column] = True
            current_row = row_of_column[column]
            slack = cost[current_row - 1] - row_potential[current_row] - column_potential[1:]
            free = ~used[1:]
            better = free & (slack < min_slack[1:])
            min_slack[1:][better] = slack[better]
            previous_column[1:][better] = column
            candidates = np.where(free, min_slack[1:], np.inf)
            next_column = int(np.argmin(candidates)) + 1
            delta = candidates[next_column - 1]
            row_potential[row_of_column[used]] += delta
            column_potential[used] -= delta
            min_slack[1:][free] -= delta
            column = next_column
            if row_of_column[column] == 0:
                break
        while column:
            previous = previous_column[column]
            row_of_column[column] = row_of_column[previous]
            column = previous
    column_of_row = np.empty(n_rows, dtype=np.int64)
    matched = np.flatnonzero(row_of_column[1:])
    column_of_row[row_of_column[1:][matched] - 1] = matched
    # back to the maximisation view: u_i + v_j >= w_ij with v >= 0
    return column_of_row, -row_potential[1:], -column_potential[1:]


def _duals_certify(
    weights: np.ndarray,
    column_of_row: np.ndarray,
    row_duals: np.ndarray,
    column_duals: np.ndarray,
    tolerance: float,
) -> bool:
    """Whether the matching and its duals form an optimality certificate (dual feasibility,
    distinct columns, zero duality gap) up to ``tolerance``."""
    matched_value = float(weights[np.arange(len(column_of_row)), column_of_row].sum())
    dual_value = float(row_duals.sum() + column_duals.sum())
    violation = float((weights - row_duals[:, None] - column_duals[None, :]).max())
    return (
        len(set(column_of_row.tolist())) == len(column_of_row)
        and violation <= tolerance
        and float(column_duals.min()) >= -tolerance
        and abs(matched_value - dual_value) <= tolerance * max(1, len(column_of_row))
    )


def _linked_classes(candidate_lists: list[list[tuple[int, ...]]]) -> list[list[int]]:
    """Groups of classes linked by sharing a candidate subset (union-find), in index order."""
    parent = list(range(len(candidate_lists)))

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    owner: dict[tuple[int, ...], int] = {}
    for class_index, subsets in enumerate(candidate_lists):
        for subset in subsets:
            if subset in owner:
                parent[root(class_index)] = root(owner[subset])
            else:
                owner[subset] = class_index
    groups: dict[int, list[int]] = {}
    for class_index in range(len(candidate_lists)):
        groups.setdefault(root(class_index), []).append(class_index)
    return list(groups.values())


def _best_single_swaps(
    sorted_rows: np.ndarray, k: int, n_singles: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``n_singles`` best single swaps, and a bound on the change of any other swap.

    A single swap takes member ``out`` (of the ``k`` best) out and non-member ``k + inn`` in. The
    best swap not taken is a single swap after the ``n_singles`` best or, at best, a double swap
    (the k-th best out for the best non-member, the (k-1)-th out for the second best non-member),
    since every further swap only lowers the value.

    Args:
        sorted_rows: (n, K) each row's values in descending order.
        k: Subset size, ``k < K``.
        n_singles: How many single swaps to take per row.

    Returns:
        ``(swaps, excluded)``: (n, min(n_singles, k * (K - k))) flat swap indices
        ``out * (K - k) + inn``, best first; (n,) an upper bound on the change of every swap not
        taken, -inf when there is none.
    """
    n_rows, n_selected = sorted_rows.shape
    members = sorted_rows[:, :k]  # (n, k)
    others = sorted_rows[:, k:]  # (n, K-k)
    change = others[:, None, :] - members[:, :, None]  # (n, k, K-k) member i out, other j in
    flat = change.reshape(n_rows, -1)  # (n, k*(K-k))
    n_take = min(n_singles, flat.shape[1])
    if n_take < flat.shape[1]:
        best = np.argpartition(-flat, n_take, axis=1)[:, : n_take + 1]  # (n, n_take+1)
        best_change = np.take_along_axis(flat, best, axis=1)
        best = np.take_along_axis(best, np.argsort(-best_change, axis=1, kind="stable"), 1)
        excluded = flat[np.arange(n_rows), best[:, n_take]]
    else:
        best = np.argsort(-flat, axis=1, kind="stable")
        excluded = np.full(n_rows, -np.inf)
    if k >= 2 and n_selected - k >= 2:
        excluded = np.maximum(excluded, change[:, k - 1, 0] + change[:, k - 2, 1])
    return best[:, :n_take], excluded


class _CandidateLists:
    """Each colliding class's candidate subsets, with a threshold bounding every unlisted one.

    A class without a list has one candidate, its best subset. A class in a collision gets a
    candidate list and a threshold: an upper bound on the value of every subset *not* in its list.
    Lists start cheap (:meth:`start`): the best subset plus its best single swaps (one member out,
    one non-member in), with threshold max(next single swap, best double swap) since every further
    swap only lowers the value. Growing (:meth:`grow`) switches to exact best-first enumeration.

    Attributes:
        values: (n_c, K) the A values of the selected features, column j = ``selected[j]``.
        selected: (K,) feature ids.
        k: Features per class.
        order: (n_c, K) each class's columns, best first.
        sorted_values: (n_c, K) each class's values in descending order.
        top_sets: Each class's best subset (sorted feature ids).
        top_values: (n_c,) each class's best subset's value.
        column_of_selected: Feature id -> its column in ``values``.
        lists: Class -> its candidate subsets, best first (only classes that have a list).
        thresholds: Class -> an upper bound on the value of every subset not in its list.
        enumerators: Class -> its best-first enumeration, once its list has grown.
    """

    def __init__(
        self,
        values: np.ndarray,
        selected: np.ndarray,
        k: int,
        order: np.ndarray,
        top_sets: list[tuple[int, ...]],
    ) -> None:
        self.values = values
        self.selected = selected
        self.k = k
        self.order = order
        self.sorted_values = np.take_along_axis(values, order, axis=1)  # (n_c, K) descending
        self.top_sets = top_sets
        self.top_values = self.sorted_values[:, :k].sum(axis=1)  # (n_c,)
        self.column_of_selected = {int(d): j for j, d in enumerate(selected)}
        self.lists: dict[int, list[tuple[int, ...]]] = {}
        self.thresholds: dict[int, float] = {}
        self.enumerators: dict[int, _SubsetEnumerator] = {}

    def subset_value(self, class_index: int, subset: tuple[int, ...]) -> float:
        """The class's A sum over ``subset``."""
        return float(self.values[class_index, [self.column_of_selected[d] for d in subset]].sum())

    def weights(self, members: list[int], subsets: list[tuple[int, ...]]) -> np.ndarray:
        """(members, subsets): each member's A sum over each subset."""
        positions = np.array([[self.column_of_selected[d] for d in s] for s in subsets])
        return self.values[np.asarray(members)][:, positions].sum(axis=2)

    def candidates(self, class_index: int) -> list[tuple[int, ...]]:
        """The class's list, or its best subset alone when it has none."""
        return self.lists.get(class_index) or [self.top_sets[class_index]]

    def has_list(self, class_index: int) -> bool:
        """Whether the class has a candidate list."""
        return class_index in self.lists

    def list_lengths(self, class_indices: list[int]) -> tuple[int, ...]:
        """The length of each class's list."""
        return tuple(len(self.lists[c]) for c in class_indices)

    def start(self, class_indices: list[int], n_singles: int) -> None:
        """For each class: its best subset and its ``n_singles`` best single swaps."""
        rows = np.asarray(class_indices)
        swaps, excluded = _best_single_swaps(self.sorted_values[rows], self.k, n_singles)
        n_others = self.values.shape[1] - self.k
        ranked_ids = self.selected[self.order[rows]].tolist()  # (n, K) ids best first
        for row, class_index in enumerate(class_indices):
            ids = ranked_ids[row]
            subsets = [self.top_sets[class_index]]
            for flat_index in swaps[row].tolist():
                out, inn = divmod(flat_index, n_others)
                swapped = ids[:out] + ids[out + 1 : self.k] + [ids[self.k + inn]]
                subsets.append(tuple(sorted(swapped)))
            self.lists[class_index] = subsets
            self.thresholds[class_index] = float(self.top_values[class_index] + excluded[row])

    def grow(self, class_index: int) -> None:
        """Double the class's list with exact best-first enumeration."""
        enumerator = self.enumerators.get(class_index)
        if enumerator is None:
            enumerator = _SubsetEnumerator(self.values[class_index], self.selected, self.k)
            self.enumerators[class_index] = enumerator
        length = 2 * len(self.lists[class_index])
        enumerator.extend_to(length + 1)
        self.lists[class_index] = enumerator.subsets[:length]
        # the next subset in line bounds every unlisted one
        self.thresholds[class_index] = (
            enumerator.values[length] if len(enumerator.values) > length else -np.inf
        )


@dataclass(frozen=True)
class _MatchStep:
    """The outcome of matching one component: its members' subsets (in member order), or else
    (``subsets`` None) the classes whose lists must grow before the component is matched again."""

    subsets: list[tuple[int, ...]] | None = None
    grow: list[int] = field(default_factory=list)


def _match_component(lists: _CandidateLists, members: list[int], tolerance: float) -> _MatchStep:
    """Match a component's classes to distinct subsets of the union of their lists, and certify it.

    With the duals (u, v), v >= 0, of :func:`_hungarian_max`, a class's unlisted subsets cannot
    improve the matching when ``u_c >= threshold_c``; if that holds for every member the matching
    is optimal over *all* subsets (LP duality; the assignment LP is integral). The classes failing
    it must grow their lists, as must every growable list when the lists hold too few subsets.
    """
    columns = list(dict.fromkeys(s for c in members for s in lists.lists[c]))
    if len(columns) < len(members):
        return _MatchStep(grow=[c for c in members if lists.thresholds[c] > -np.inf])
    # (members, columns): each member's A sum over each candidate subset
    weights = lists.weights(members, columns)
    column_of_row, row_duals, column_duals = _hungarian_max(weights)
    if not _duals_certify(weights, column_of_row, row_duals, column_duals, tolerance):
        # never seen in tests; round-off on extreme inputs could cause it: keep a valid
        # (scipy-optimal over these lists) matching rather than fail the whole solve
        _logger.warning("class matching not certified; using it without a certificate")
        column_of_row = linear_sum_assignment(-weights)[1]
        return _MatchStep(subsets=[columns[int(column)] for column in column_of_row])
    failing = [
        class_index
        for row, class_index in enumerate(members)
        if row_duals[row] < lists.thresholds[class_index] - tolerance
    ]
    if failing:
        return _MatchStep(grow=failing)
    return _MatchStep(subsets=[columns[int(column)] for column in column_of_row])


def _match_classes(lists: _CandidateLists, tolerance: float) -> list[tuple[int, ...]]:
    """Every class's subset: components of classes sharing candidates are matched and certified
    (:func:`_match_component`), lists grow where that fails, until every component is certified.

    A class whose best subset another class wants joins that component with a short list of its
    own. Components already certified are remembered by their members and list lengths.
    """
    n_classes = len(lists.values)
    chosen: dict[int, tuple[int, ...]] = {}
    # components already matched and certified, keyed by their members and lists
    solved: dict[tuple[tuple[int, ...], tuple[int, ...]], list[tuple[int, ...]]] = {}
    changed = True
    while changed:
        changed = False
        chosen.clear()
        for members in _linked_classes([lists.candidates(c) for c in range(n_classes)]):
            if len(members) == 1:
                chosen[members[0]] = lists.candidates(members[0])[0]
                continue
            newcomers = [c for c in members if not lists.has_list(c)]
            if newcomers:
                # a class whose best subset another class wants joins the matching
                lists.start(newcomers, 2)
                changed = True
                continue
            key = (tuple(members), lists.list_lengths(members))
            if key not in solved:
                step = _match_component(lists, members, tolerance)
                if step.subsets is None:
                    for class_index in step.grow:
                        lists.grow(class_index)
                    changed = True
                    continue
                solved[key] = step.subsets
            chosen.update(zip(members, solved[key], strict=True))
    return [chosen[class_index] for class_index in range(n_classes)]


def _distinct_subsets(
    values: np.ndarray, selected: np.ndarray, k: int
) -> tuple[list[tuple[int, ...]], float, int]:
    """The optimal distinct ``k``-subsets of ``selected`` for all classes.

    Every class starts on its best subset. A class in a collision gets a candidate list and a
    threshold: an upper bound on the value of every subset *not* in its list
    (:class:`_CandidateLists`). Classes whose lists share a subset form a component, matched by
    :func:`_hungarian_max` over the union of their lists. With duals (u, v), v >= 0, a class's
    unlisted subsets cannot improve the matching when ``u_c >= threshold_c``; if that holds for
    every member the matching is optimal over *all* subsets (LP duality; the assignment LP is
    integral). A class failing it gets a longer list (:func:`_match_classes`).

    Lists start cheap: the best subset plus its best single swaps (one member out, one
    non-member in), with threshold max(next single swap, best double swap) since every further
    swap only lowers the value. Growing switches to exact best-first enumeration.

    Args:
        values: (n_c, K) the A values of the selected features, column j = ``selected[j]``.
        selected: (K,) feature ids.
        k: Features per class.

    Returns:
        ``(subsets, loss, n_moved)``: one sorted feature-id tuple per class, the total A value lost
        against every class taking its own best subset, and how many classes did not get theirs.
    """
    n_classes = len(values)
    order = np.argsort(-values, axis=1, kind="stable")  # (n_c, K) best first
    top_ids = np.sort(selected[order[:, :k]], axis=1)  # (n_c, k) each class's best subset
    _, first_of, inverse = np.unique(top_ids, axis=0, return_index=True, return_inverse=True)
    top_sets = [tuple(int(d) for d in row) for row in top_ids]
    if len(first_of) == n_classes:
        return top_sets, 0.0, 0

    lists = _CandidateLists(values, selected, k, order, top_sets)
    inverse = inverse.ravel()
    group_size = np.bincount(inverse, minlength=len(first_of))
    # g classes on one best subset: at least g - 1 of them must move
    colliding = np.flatnonzero(group_size[inverse] > 1)
    for size in np.unique(group_size[inverse[colliding]]).tolist():
        same_size = colliding[group_size[inverse[colliding]] == size].tolist()
        lists.start(same_size, max(4, 2 * size))

    tolerance = 1e-9 * (1.0 + k * float(np.abs(values).max()))
    subsets = _match_classes(lists, tolerance)
    loss = 0.0
    n_moved = 0
    for class_index, subset in enumerate(subsets):
        if subset != top_sets[class_index]:
            n_moved += 1
            loss += float(lists.top_values[class_index]) - lists.subset_value(class_index, subset)
    return subsets, loss, n_moved


def _subset_loss(
    values: np.ndarray, selected: np.ndarray, k: int, subsets: list[tuple[int, ...]]
) -> tuple[float, int]:
    """``(loss, n_moved)`` of per-class subsets against every class on its own best subset."""
    column_of = {int(d): j for j, d in enumerate(selected)}
    top_values = -np.sort(-values, axis=1)[:, :k].sum(axis=1)
    top_ids = np.sort(selected[np.argsort(-values, axis=1, kind="stable")[:, :k]], axis=1)
    loss = 0.0
    n_moved = 0
    for class_index, subset in enumerate(subsets):
        if subset != tuple(int(d) for d in top_ids[class_index]):
            n_moved += 1
            achieved = float(values[class_index, [column_of[d] for d in subset]].sum())
            loss += float(top_values[class_index]) - achieved
    return loss, n_moved


def _pair_components(
    pairs: Sequence[tuple[int, int]],
) -> tuple[list[list[int]], dict[int, int | None], dict[int, list[int]]]:
    """The components of the pair graph, each in breadth-first order, each class's anchor (an
    earlier partner, None for the first of a component) and each class's partners."""
    partners: dict[int, list[int]] = {}
    for first, second in pairs:
        partners.setdefault(first, []).append(second)
        partners.setdefault(second, []).append(first)
    components: list[list[int]] = []
    anchor: dict[int, int | None] = {}
    for root in sorted(partners):
        if root in anchor:
            continue
        anchor[root] = None
        component: list[int] = []
        queue = [root]
        while queue:
            node = queue.pop(0)
            component.append(node)
            for other in sorted(partners[node]):
                if other not in anchor:
                    anchor[other] = node
                    queue.append(other)
        components.append(component)
    return components, anchor, partners


# first margin below the best value (in units of max |A| + 1) within which the forced-pair
# assignment enumerates each component's configurations; it grows 4-fold until the result is proven
_PAIR_FIRST_SLACK = 0.05
# work budget (placements tried + branches combined) of the exact forced-pair assignment of one
# selection; past it the greedy construction answers. Placing one class costs ~20 us here, so the
# budget keeps one evaluation near a tenth of a second (demo problem, 25 pairs); on that
# problem the greedy construction matched the exact optimum on each of 5 selections tried.
_PAIR_EXACT_BUDGET = 1_000
# starting subsets the greedy construction tries for a component's first class
_PAIR_GREEDY_STARTS = 8
# ... and at most this many while none of them lets the whole component be placed
_PAIR_GREEDY_MAX_STARTS = 256


class _PairBudgetExceeded(Exception):
    """The exact forced-pair assignment ran out of its work budget."""


_Configuration = tuple[float, dict[int, tuple[int, ...]]]


def _forced_pair_subsets(
    values: np.ndarray,
    selected: np.ndarray,
    k: int,
    pairs: Sequence[tuple[int, int]],
    *,
    budget: int | None = _PAIR_EXACT_BUDGET,
) -> tuple[list[tuple[int, ...]], float, int]:
    """Distinct ``k``-subsets of ``selected`` under the forced pairs: optimal within ``budget``.

    Every forced pair (c, c') must share exactly ``k - 1`` features. When the unconstrained optimum
    (:func:`_distinct_subsets`) already satisfies every pair it is returned. Otherwise:

    * each component of the pair graph gets its *configurations* (a subset per member, distinct,
      every pair inside sharing k - 1) worth at least its best configuration minus a slack s: the
      first member runs through its subsets best-first (:class:`_SubsetEnumerator`), every later
      one through the ``k * (K - k)`` one-swap neighbours of an already placed partner's subset;
    * a depth-first branch and bound picks one configuration per component (distinct across
      components) and matches the other classes optimally to the subsets left
      (:func:`_distinct_subsets`, with one "phantom" class per taken subset whose weight on it
      dominates every trade-off), cutting a branch when it plus the best configurations of the
      remaining components plus the other classes' unconstrained optimum V0 cannot beat the best;
    * an assignment left out holds a configuration below its component's best minus s, so it is
      worth less than U - s with U = sum of the best configurations + V0: the best found is optimal
      once it reaches U - s (or nothing was left out); otherwise s grows 4-fold and all repeats.

    When that takes more than ``budget`` units of work (a placement tried or a branch combined;
    None: no limit) the result is :meth:`_PairedAssignment.greedy`'s instead: feasible, not
    proven optimal.

    Returns:
        As :func:`_distinct_subsets`.

    Raises:
        ValueError: If no assignment satisfies the forced pairs and distinctness.
    """
    free, _, _ = _distinct_subsets(values, selected, k)
    if all(len(set(free[c]) & set(free[d])) == k - 1 for c, d in pairs):
        loss, n_moved = _subset_loss(values, selected, k, free)
        return free, loss, n_moved
    paired = _PairedAssignment(values, selected, k, pairs, budget=budget)
    try:
        subsets = paired.solve()
    except _PairBudgetExceeded:
        subsets = paired.greedy()
    loss, n_moved = _subset_loss(values, selected, k, subsets)
    return subsets, loss, n_moved


class _PairedAssignment:
    """The branch and bound of :func:`_forced_pair_subsets` over one selection's values."""

    def __init__(
        self,
        values: np.ndarray,
        selected: np.ndarray,
        k: int,
        pairs: Sequence[tuple[int, int]],
        *,
        budget: int | None = None,
    ) -> None:
        self.values, self.selected, self.k, self.pairs = values, selected, k, pairs
        self.budget_left = budget
        self.n_classes = len(values)
        self.column_of = {int(d): j for j, d in enumerate(selected)}
        self.selected_ids = [int(d) for d in selected]
        self.components, self.anchor, self.partners = _pair_components(pairs)
        paired = {c for component in self.components for c in component}
        self.others = [c for c in range(self.n_classes) if c not in paired]
        self.other_free: list[tuple[int, ...]] = []
        self.other_value = 0.0
        if self.others:
            self.other_free, _, _ = _distinct_subsets(values[self.others], selected, k)
            self.other_value = sum(
                self.value_of(c, s) for c, s in zip(self.others, self.other_free, strict=True)
            )
        self.top_values = -np.sort(-values, axis=1)[:, :k].sum(axis=1)
        self.scale = 1.0 + float(np.abs(values).max())
        self.tolerance = 1e-9 * self.scale * k * self.n_classes
        # the branch and bound's incumbent
        self.best_value = -np.inf
        self.best_sets: dict[int, tuple[int, ...]] | None = None
        self.chosen: dict[int, tuple[int, ...]] = {}

    def value_of(self, class_index: int, subset: tuple[int, ...]) -> float:
        return float(self.values[class_index, [self.column_of[d] for d in subset]].sum())

    def spend(self) -> None:
        """Count one unit of work against the budget."""
        if self.budget_left is not None:
            self.budget_left -= 1
            if self.budget_left < 0:
                raise _PairBudgetExceeded

    def match_others(self, taken: set[tuple[int, ...]]) -> tuple[float, list[tuple[int, ...]]]:
        """The unpaired classes' best distinct subsets, none of them in ``taken``."""
        if not any(s in taken for s in self.other_free):
            return self.other_value, list(self.other_free)
        # phantoms: a row worth `weight` on each feature of one taken subset, 0 elsewhere; any
        # other subset holds at most k - 1 of them, a loss no gain of the real classes can repay
        weight = 2.0 * len(self.others) * self.k * self.scale + 1.0
        phantoms = np.zeros((len(taken), len(self.selected)))
        for row, subset in enumerate(sorted(taken)):
            phantoms[row, [self.column_of[d] for d in subset]] = weight
        stacked = np.vstack([self.values[self.others], phantoms])
        subsets, _, _ = _distinct_subsets(stacked, self.selected, self.k)
        mine = subsets[: len(self.others)]
        if set(subsets[len(self.others) :]) != taken or any(s in taken for s in mine):
            raise RuntimeError("phantom matching did not keep the forced pairs' subsets")
        return sum(self.value_of(c, s) for c, s in zip(self.others, mine, strict=True)), mine

    def candidates(
        self, class_index: int, placed: dict[int, tuple[int, ...]]
    ) -> Iterator[tuple[tuple[int, ...], float]]:
        """A class's subsets best first: all of them (a component's first class) or the one-swap
        neighbours of its already placed partner's subset."""
        partner = self.anchor[class_index]
        if partner is None:
            enumerator = _SubsetEnumerator(self.values[class_index], self.selected, self.k)
            position = 0
            while True:
                enumerator.extend_to(position + 1)
                if position >= len(enumerator.subsets):
                    return
                yield enumerator.subsets[position], enumerator.values[position]
                position += 1
        base = placed[partner]
        neighbours = []
        for out in base:
            kept = [d for d in base if d != out]
            for inn in self.selected_ids:
                if inn not in base:
                    subset = tuple(sorted([*kept, inn]))
                    neighbours.append((subset, self.value_of(class_index, subset)))
        neighbours.sort(key=lambda item: (-item[1], item[0]))
        yield from neighbours

    def configurations(
        self, component: list[int], cutoff: float
    ) -> tuple[list[_Configuration], bool]:
        """The component's configurations worth at least ``cutoff``, best first, and whether
        none was left out."""
        rest_top = np.concatenate([np.cumsum(self.top_values[component][::-1])[::-1], [0.0]])
        found: list[_Configuration] = []
        complete = [True]
        self._place(component, rest_top, cutoff, 0, 0.0, {}, found, complete)
        found.sort(key=lambda item: -item[0])
        return found, complete[0]

    def _place(
        self,
        component: list[int],
        rest_top: np.ndarray,
        cutoff: float,
        position: int,
        partial: float,
        placed: dict[int, tuple[int, ...]],
        found: list[_Configuration],
        complete: list[bool],
    ) -> None:
        self.spend()
        if position == len(component):
            found.append((partial, dict(placed)))
            return
        class_index = component[position]
        taken = set(placed.values())
        for subset, value in self.candidates(class_index, placed):
            if partial + value + rest_top[position + 1] < cutoff:
                complete[0] = False
                break  # candidates come best first
            if subset in taken or any(
                other in placed and len(set(placed[other]) & set(subset)) != self.k - 1
                for other in self.partners[class_index]
            ):
                continue
            placed[class_index] = subset
            self._place(
                component, rest_top, cutoff, position + 1, partial + value, placed, found, complete
            )
            del placed[class_index]

    def best_configuration_values(self) -> list[float]:
        """Each component's best configuration value (the margin below its top sum grows until
        one is found)."""
        best_of: list[float] = []
        for component in self.components:
            margin = _PAIR_FIRST_SLACK * self.scale
            while True:
                listed, complete = self.configurations(
                    component, float(self.top_values[component].sum()) - margin
                )
                if listed or complete:
                    break
                margin *= 4.0
            if not listed:
                raise ValueError(
                    f"no subsets of {self.k} of the {len(self.selected)} selected features let "
                    f"the classes {component} meet the forced pairs "
                    f"{[list(p) for p in self.pairs]}"
                )
            best_of.append(listed[0][0])
        return best_of

    def combine(
        self,
        lists: list[list[_Configuration]],
        rest_best: np.ndarray,
        position: int,
        partial: float,
    ) -> None:
        """Depth-first: one configuration per component, distinct, then the other classes."""
        self.spend()
        chosen = self.chosen
        if position == len(self.components):
            rest, mine = self.match_others(set(chosen.values()))
            if self.best_sets is None or partial + rest > self.best_value + self.tolerance:
                self.best_value = partial + rest
                self.best_sets = dict(chosen)
                self.best_sets.update(zip(self.others, mine, strict=True))
            return
        taken = set(chosen.values())
        for value, configuration in lists[position]:
            bound = partial + value + rest_best[position + 1] + self.other_value
            if self.best_sets is not None and bound <= self.best_value + self.tolerance:
                break  # configurations come best first
            if any(subset in taken for subset in configuration.values()):
                continue
            chosen.update(configuration)
            self.combine(lists, rest_best, position + 1, partial + value)
            for class_index in configuration:
                del chosen[class_index]

    def solve(self) -> list[tuple[int, ...]]:
        """The optimal subsets, one per class; the slack grows 4-fold until optimality is proven."""
        best_of = self.best_configuration_values()
        upper = float(sum(best_of)) + self.other_value
        rest_best = np.concatenate([np.cumsum(np.array(best_of)[::-1])[::-1], [0.0]])
        slack = _PAIR_FIRST_SLACK * self.scale
        while True:
            lists: list[list[_Configuration]] = []
            all_complete = True
            for component, best in zip(self.components, best_of, strict=True):
                listed, complete = self.configurations(component, best - slack)
                lists.append(listed)
                all_complete &= complete
            self.combine(lists, rest_best, 0, 0.0)
            proven = self.best_sets is not None and (
                self.best_value >= upper - slack - self.tolerance
            )
            if all_complete or proven:
                break
            slack *= 4.0
        if self.best_sets is None:
            raise ValueError(
                f"no assignment gives every class a distinct set of {self.k} of the "
                f"{len(self.selected)} selected features while the forced pairs "
                f"{[list(p) for p in self.pairs]} share exactly {self.k - 1}"
            )
        return [self.best_sets[c] for c in range(self.n_classes)]

    def greedy(self) -> list[tuple[int, ...]]:
        """A feasible assignment, quickly and without proof of optimality.

        The components of the pair graph are placed one after another, the one with the largest
        sum of its classes' best values first (:meth:`greedy_component`); then the other classes
        are matched optimally to the subsets left (:meth:`match_others`).

        Raises:
            ValueError: a component cannot be placed from any of the starts tried.
        """
        order = sorted(
            range(len(self.components)),
            key=lambda index: -float(self.top_values[self.components[index]].sum()),
        )
        chosen: dict[int, tuple[int, ...]] = {}
        for index in order:
            chosen.update(self.greedy_component(self.components[index], set(chosen.values())))
        _, mine = self.match_others(set(chosen.values()))
        chosen.update(zip(self.others, mine, strict=True))
        return [chosen[c] for c in range(self.n_classes)]

    def greedy_component(
        self, component: list[int], taken: set[tuple[int, ...]]
    ) -> dict[int, tuple[int, ...]]:
        """The best of a few greedy placements of one component, avoiding ``taken`` subsets.

        A placement is worth its classes' values plus the unpaired classes' best matching around
        it and ``taken``. Each placement starts the component's first class on one of its best free subsets and
        gives every later class (breadth-first) its best one-swap neighbour of its anchor's
        subset that is free and shares exactly ``k - 1`` features with every placed partner.
        """
        root = component[0]
        starts = _SubsetEnumerator(self.values[root], self.selected, self.k)
        best: dict[int, tuple[int, ...]] | None = None
        best_value = -np.inf
        n_tried = position = 0
        while position < _PAIR_GREEDY_MAX_STARTS and (
            n_tried < _PAIR_GREEDY_STARTS or best is None
        ):
            starts.extend_to(position + 1)
            if position >= len(starts.subsets):
                break
            start = starts.subsets[position]
            position += 1
            if start in taken:
                continue
            n_tried += 1
            placed = self.place_greedily(component, {root: start}, taken)
            if placed is not None:
                # what the placement costs the unpaired classes counts too
                others_value, _ = self.match_others(taken | set(placed.values()))
                value = others_value + sum(self.value_of(c, s) for c, s in placed.items())
                if value > best_value:
                    best, best_value = placed, value
        if best is None:
            raise ValueError(
                f"found no subsets of {self.k} of the {len(self.selected)} selected features "
                f"that let the classes {component} meet the forced pairs "
                f"{[list(p) for p in self.pairs]} (greedy placement from {position} starts)"
            )
        return best

    def place_greedily(
        self,
        component: list[int],
        placed: dict[int, tuple[int, ...]],
        taken: set[tuple[int, ...]],
    ) -> dict[int, tuple[int, ...]] | None:
        """Place the component's later classes one by one (None: one of them found no subset)."""
        used = taken | set(placed.values())
        for class_index in component[1:]:
            for subset, _ in self.candidates(class_index, placed):
                if subset in used or any(
                    other in placed and len(set(placed[other]) & set(subset)) != self.k - 1
                    for other in self.partners[class_index]
                ):
                    continue
                placed[class_index] = subset
                used.add(subset)
                break
            else:
                return None
        return placed


def _assigned_subsets(
    values: np.ndarray, selected: np.ndarray, k: int, pairs: Sequence[tuple[int, int]]
) -> tuple[list[tuple[int, ...]], float, int]:
    """:func:`_distinct_subsets`, or :func:`_forced_pair_subsets` when pairs are forced."""
    if pairs:
        return _forced_pair_subsets(values, selected, k, pairs)
    return _distinct_subsets(values, selected, k)


def assign_classes(
    problem: AssignmentProblem, selected_features: Sequence[int] | np.ndarray
) -> tuple[list[list[int]], float]:
    """The optimal assignment of classes to features for a fixed selection.

    Every class gets ``n_per_class`` selected features, no two classes the same set, and the sum
    of A over all assignments is maximal (proven by the matching's dual values, see the module
    docstring). With forced pairs every pair also shares exactly ``n_per_class - 1`` features
    and the maximum is over those assignments (exact branch and bound, see
    :func:`_forced_pair_subsets`).

    Args:
        problem: The problem.
        selected_features: ``n_features`` distinct feature ids.

    Returns:
        ``(class_features, objective)``: one ascending id list per class, and the objective Z of
        this selection with this assignment.

    Raises:
        ValueError: If the selection has the wrong size, repeats an id or leaves the range, or
            no assignment satisfies the forced pairs.

    Example:
        >>> import numpy as np
        >>> from openqpm.solver.problem import AssignmentProblem
        >>> A = np.array([[1.0, 0.9, 0.0], [1.0, 0.8, 0.0]])  # both classes prefer feature 0
        >>> problem = AssignmentProblem(A, np.zeros((3, 3)), np.zeros(3), 2, 1)
        >>> assign_classes(problem, [0, 1])  # class 0 moves: it loses 0.1, class 1 would lose 0.2
        ([[1], [0]], 950.0)
    """
    selected = checked_selection(problem, selected_features)
    values = problem.A[:, selected]  # (n_c, n_features)
    subsets, _, _ = _assigned_subsets(values, selected, problem.n_per_class, problem.forced_pairs)
    class_features = [list(subset) for subset in subsets]
    return class_features, problem.objective(selected.tolist(), class_features)


def start_solution(
    problem: AssignmentProblem,
    start: Assignment | Sequence[int] | np.ndarray | None,
    *,
    search_s: float,
    seed: int,
) -> tuple[list[int], list[list[int]], float, str]:
    """An exact solvers' first incumbent: the given start, or a short structured search.

    Returns:
        ``(selection, class_features, objective, source)`` with the optimal distinct assignment
        for the selection and ``source`` "start" or "search".

    Raises:
        ValueError: If ``start`` is not a valid selection for ``problem``.
    """
    if start is None:
        found = solve_search(problem, time_limit_s=max(0.1, search_s), seed=seed)
        selection, source = sorted(found.selected_features), "search"
    else:
        selection, source = checked_selection(problem, start).tolist(), "start"
    class_features, value = assign_classes(problem, selection)
    return selection, class_features, value, source


# ----------------------------------------------------------------------------------------------
# search over selections


@dataclass
class _Evaluation:
    """A selection with its optimal distinct assignment."""

    selected: np.ndarray  # (n_features,) ascending ids
    subsets: list[tuple[int, ...]]  # one per class
    objective: float  # exact Z of this selection with its optimal assignment
    relaxed: float  # Z with every class on its own best subset (duplicates allowed), >= objective
    n_moved: int  # classes that could not keep their own best subset


class _Searcher:
    """The state shared by the search steps: constants, generator, clock, counters."""

    def __init__(
        self,
        problem: AssignmentProblem,
        *,
        rng: np.random.Generator,
        deadline: float,
    ) -> None:
        self.A = problem.A
        self.R = problem.R
        self.b = problem.b
        self.scale = problem.class_scale
        self.k = problem.n_per_class
        self.n_selected = problem.n_features
        self.n_all = problem.n_all_features
        self.n_classes = problem.n_classes
        self.forced_pairs = problem.forced_pairs
        self.rng = rng
        self.deadline = deadline
        self.n_evaluations = 0
        self.n_swaps = 0
        # exact objective of every selection evaluated (keyed by its sorted ids): revisits in
        # later descents are answered without re-solving the assignment
        self.known_objective: dict[bytes, float] = {}

    def out_of_time(self) -> bool:
        return time.perf_counter() >= self.deadline

    def tolerance(self, objective: float) -> float:
        return _IMPROVEMENT_RTOL * max(1.0, abs(objective))

    def evaluate(self, selected: np.ndarray) -> _Evaluation:
        """Exact objective of a selection (optimal distinct assignment)."""
        self.n_evaluations += 1
        selected = np.sort(selected)
        values = self.A[:, selected]  # (n_c, n_features)
        subsets, loss, n_moved = _assigned_subsets(values, selected, self.k, self.forced_pairs)
        top_sum = float(-np.partition(-values, self.k - 1, axis=1)[:, : self.k].sum())
        redundancy = 0.5 * float(self.R[np.ix_(selected, selected)].sum())
        relaxed = self.scale * top_sum + float(self.b[selected].sum()) - redundancy
        objective = relaxed - self.scale * loss
        if len(self.known_objective) < _MAX_REMEMBERED_SELECTIONS:
            self.known_objective[selected.tobytes()] = objective
        return _Evaluation(selected, subsets, objective, relaxed, n_moved)

    def relaxed_descent(self, selected: np.ndarray) -> np.ndarray:
        """Best-improvement swaps on the relaxed objective (duplicates ignored): cheap, no
        assignment is solved; a good selection for the exact descent to polish."""
        selected = np.sort(selected)
        while not self.out_of_time():
            gains = self.swap_gains(selected)  # (K, n_f)
            position, feature = np.unravel_index(int(np.argmax(gains)), gains.shape)
            if gains[position, feature] <= _IMPROVEMENT_RTOL:
                break
            selected[position] = feature
            selected = np.sort(selected)
        return selected

    def swap_gains(self, selected: np.ndarray) -> np.ndarray:
        """Relaxed objective change of every swap (remove ``selected[i]``, add feature j).

        With t_c and t'_c the k-th and (k+1)-th best values of class c inside the selection,
        removing r and adding a changes the class's top-k sum by ``max(t'_c, A[c,a]) - A[c,r]``
        when r is in its top k, else by ``max(0, A[c,a] - t_c)``; summed over classes this is a
        vector over a plus, for each r, a sum over the k-sets containing r (one matrix product).

        Returns:
            (n_features, n_f) gains; columns of selected features are -inf.
        """
        A = self.A
        values = A[:, selected]  # (n_c, K)
        order = np.argsort(-values, axis=1, kind="stable")  # (n_c, K) best first
        class_index = np.arange(self.n_classes)
        kth = values[class_index, order[:, self.k - 1]]  # (n_c,)
        if self.n_selected > self.k:
            next_best = values[class_index, order[:, self.k]]  # (n_c,)
        else:
            next_best = np.full(self.n_classes, -np.inf)
        excess = np.maximum(A - kth[:, None], 0.0)  # (n_c, n_f) gain of adding a, r not in top
        gain_if_not_in_top = excess.sum(axis=0)  # (n_f,)
        # (n_c, n_f): max(t', A) - max(0, A - t), what replaces a removed top-k member minus the
        # gain counted above, equals A clipped to [t', t]
        correction = np.clip(A, next_best[:, None], kth[:, None])
        in_top = np.zeros((self.n_selected, self.n_classes))  # (K, n_c): r in class c's top k
        in_top[order[:, : self.k].T, class_index[None, :]] = 1.0
        removed_value = (in_top * values.T).sum(axis=1)  # (K,)
        delta_A = gain_if_not_in_top[None, :] + in_top @ correction - removed_value[:, None]
        redundancy_with = self.R[:, selected].sum(axis=1)  # (n_f,) sum of R with the selection
        gains = (
            self.scale * delta_A
            + self.b[None, :]
            - self.b[selected][:, None]
            + redundancy_with[selected][:, None]
            - redundancy_with[None, :]
            + self.R[selected, :]
        )
        gains[:, selected] = -np.inf
        return gains

    def greedy(self, *, n_choices: int, kept: np.ndarray | None = None) -> np.ndarray:
        """Build a selection feature by feature, each time adding one of the ``n_choices`` best.

        The gain of a feature is its relaxed marginal value: for each class the amount by which it
        beats the class's current k-th best (0 while the class has fewer than k, so that early
        picks are judged by their positive correlations), plus its bias, minus its redundancy with
        the features already chosen. ``kept`` features are chosen first (ruin and recreate).
        """
        chosen: list[int] = [] if kept is None else [int(d) for d in kept]
        available = np.ones(self.n_all, dtype=bool)
        available[chosen] = False
        redundancy_with = self.R[:, chosen].sum(axis=1) if chosen else np.zeros(self.n_all)
        while len(chosen) < self.n_selected:
            if len(chosen) < self.k:
                kth = np.zeros(self.n_classes)
            else:
                values = self.A[:, chosen]  # (n_c, len(chosen))
                kth = -np.partition(-values, self.k - 1, axis=1)[:, self.k - 1]
            gains = np.maximum(self.A - kth[:, None], 0.0).sum(axis=0) * self.scale
            gains += self.b - redundancy_with
            gains[~available] = -np.inf
            n_open = int(available.sum())
            best = np.argsort(-gains, kind="stable")[: min(n_choices, n_open)]
            feature = int(best[self.rng.integers(len(best))]) if n_choices > 1 else int(best[0])
            chosen.append(feature)
            available[feature] = False
            redundancy_with += self.R[:, feature]
        return np.sort(np.asarray(chosen, dtype=np.int64))

    def improving_swap(
        self, base: np.ndarray, base_relaxed: float, gains: np.ndarray, target: float
    ) -> _Evaluation | None:
        """The first swap of ``base`` (in order of relaxed gain) whose exact value beats ``target``.

        Since the relaxed value bounds the exact one, only swaps with ``base_relaxed + gain``
        above ``target`` are candidates; at most ``_MAX_EXACT_EVALUATIONS_PER_STEP`` of them are
        evaluated exactly.

        Args:
            base: (K,) selection the swaps start from.
            base_relaxed: Relaxed objective of ``base``.
            gains: (K, n_f) relaxed gains of its swaps (:meth:`swap_gains`).
            target: Exact objective to beat.

        Returns:
            The evaluated improving selection, or None.
        """
        tolerance = self.tolerance(target)
        flat = gains.ravel()
        n_promising = int(np.count_nonzero(flat > target - base_relaxed + tolerance))
        if n_promising == 0:
            return None
        n_try = min(n_promising, _MAX_EXACT_EVALUATIONS_PER_STEP)
        best = np.argpartition(-flat, n_try - 1)[:n_try]
        best = best[np.lexsort((best, -flat[best]))]  # by gain, ties by index
        for flat_index in best:
            position, feature = divmod(int(flat_index), self.n_all)
            selected = base.copy()
            selected[position] = feature
            selected.sort()
            known = self.known_objective.get(selected.tobytes())
            if known is not None and known <= target + tolerance:
                continue
            candidate = self.evaluate(selected)
            if candidate.objective > target + tolerance:
                return candidate
        return None

    def descend(self, current: _Evaluation) -> _Evaluation:
        """Best-improvement swap descent on the exact objective (see :meth:`improving_swap`)."""
        while not self.out_of_time():
            gains = self.swap_gains(current.selected)  # (K, n_f)
            improved = self.improving_swap(
                current.selected, current.relaxed, gains, current.objective
            )
            if improved is None:
                return current
            current = improved
            self.n_swaps += 1
        return current

    def pair_descent(self, current: _Evaluation) -> _Evaluation:
        """Swap descent extended by pair moves: two swaps made together.

        At a swap-local optimum, each of the ``_PAIR_FIRST_MOVES`` best first swaps (by relaxed
        gain, possibly negative) is followed by the second swaps that can still beat the current
        exact objective (:meth:`improving_swap`). An improvement restarts the (single swap)
        descent from the new selection.
        """
        current = self.descend(current)
        while not self.out_of_time():
            flat = self.swap_gains(current.selected).ravel()  # (K * n_f,)
            n_first = min(_PAIR_FIRST_MOVES, int(np.isfinite(flat).sum()))
            if n_first == 0:
                return current
            firsts = np.argpartition(-flat, n_first - 1)[:n_first]
            firsts = firsts[np.lexsort((firsts, -flat[firsts]))]
            improved: _Evaluation | None = None
            for flat_index in firsts:
                if self.out_of_time():
                    break
                position, feature = divmod(int(flat_index), self.n_all)
                middle = current.selected.copy()
                middle[position] = feature
                middle.sort()
                improved = self.improving_swap(
                    middle,
                    current.relaxed + float(flat[flat_index]),
                    self.swap_gains(middle),
                    current.objective,
                )
                if improved is not None:
                    break
            if improved is None:
                return current
            self.n_swaps += 2
            current = self.descend(improved)
        return current


def solve_search(
    problem: AssignmentProblem,
    *,
    time_limit_s: float,
    seed: int = 0,
    start: Assignment | Sequence[int] | np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    max_iterations: int | None = None,
) -> Assignment:
    """Find a very good solution fast, by structured local search over selections.

    Greedy start (or ``start``), swap descent, then rounds of ruin and recreate followed by
    descent (iterated local search) with restarts from randomised greedy selections. For every
    selection visited the assignment is the optimal distinct one (:func:`assign_classes`). No
    upper bound is proven: ``bound`` and ``gap`` are None. BLAS is limited to one thread meanwhile.

    Args:
        problem: The problem.
        time_limit_s: Wall-clock budget; the search stops at the first check after it.
        seed: Seed of the generator behind every random choice.
        start: A solution or a selection to start from (e.g. the eps clique of
            ``openqpm.constants``); the result is at least as good as it.
        progress: Called with a :class:`SolverProgress` at every new best solution.
        max_iterations: Stop after this many perturbation rounds; with it, the result depends only
            on ``seed`` (provided the time limit is not reached first).

    Returns:
        The best solution found, ``method="search"``.

    Raises:
        ValueError: If ``time_limit_s`` is not positive, ``max_iterations`` is negative, or
            ``start`` is not a valid selection.

    Example:
        >>> import numpy as np
        >>> from openqpm.solver.problem import AssignmentProblem
        >>> rng = np.random.default_rng(0)
        >>> problem = AssignmentProblem(rng.random((6, 12)), np.zeros((12, 12)), np.zeros(12), 4, 2)
        >>> solve_search(problem, time_limit_s=5, max_iterations=10).method
        'search'
    """
    with _single_threaded_blas():
        return _solve_search(
            problem,
            time_limit_s=time_limit_s,
            seed=seed,
            start=start,
            progress=progress,
            max_iterations=max_iterations,
        )


def _solve_search(
    problem: AssignmentProblem,
    *,
    time_limit_s: float,
    seed: int,
    start: Assignment | Sequence[int] | np.ndarray | None,
    progress: ProgressCallback | None,
    max_iterations: int | None,
) -> Assignment:
    if not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be positive, got {time_limit_s}")
    if max_iterations is not None and max_iterations < 0:
        raise ValueError(f"max_iterations must be >= 0, got {max_iterations}")
    started = time.perf_counter()
    searcher = _Searcher(
        problem, rng=np.random.default_rng(seed), deadline=started + float(time_limit_s)
    )
    log: list[str] = []

    def elapsed() -> float:
        return time.perf_counter() - started

    def report(evaluation: _Evaluation, message: str) -> None:
        if progress is not None:
            progress(SolverProgress(elapsed(), evaluation.objective, None, None, message))

    if start is not None:
        first = searcher.evaluate(checked_selection(problem, start))
        log.append(f"start: given selection, objective {first.objective:.6f}")
    else:
        first = searcher.evaluate(searcher.greedy(n_choices=1))
        log.append(f"start: greedy selection, objective {first.objective:.6f}")
    relaxed_optimum = searcher.evaluate(searcher.relaxed_descent(first.selected))
    if relaxed_optimum.objective > first.objective:
        first = relaxed_optimum
    current = searcher.pair_descent(first)
    best = current
    log.append(f"descent: objective {best.objective:.6f}")
    report(best, "descent")

    # iterated local search: ruin and recreate, relaxed descent, exact descent when promising
    max_ruined = max(2, int(_RUIN_SHARE * problem.n_features))
    n_rounds = 0
    n_failures = 0
    n_restarts = 0
    interrupted = False
    try:
        while not searcher.out_of_time() and (max_iterations is None or n_rounds < max_iterations):
            n_rounds += 1
            if n_failures >= _RESTART_AFTER:
                n_failures = 0
                n_restarts += 1
                rebuilt = searcher.greedy(n_choices=_GREEDY_CHOICES)
            else:
                n_ruined = int(searcher.rng.integers(1, max_ruined + 1))
                kept = searcher.rng.permutation(current.selected)[: problem.n_features - n_ruined]
                rebuilt = searcher.greedy(n_choices=_GREEDY_CHOICES, kept=kept)
            candidate = searcher.evaluate(searcher.relaxed_descent(rebuilt))
            tolerance = searcher.tolerance(best.objective)
            # the exact descent only pays when the relaxed value leaves room to beat the best
            if candidate.relaxed > best.objective + tolerance:
                candidate = searcher.descend(candidate)
                # pair moves cost K more gain matrices each: only for a local optimum that ties or
                # beats the best (at CUB scale trying them everywhere slowed the search down)
                if candidate.objective >= best.objective - tolerance:
                    candidate = searcher.pair_descent(candidate)
            if candidate.objective > best.objective + tolerance:
                best = candidate
                n_failures = 0
                report(best, f"round {n_rounds}")
            else:
                n_failures += 1
            slack = _ACCEPT_WORSE_SHARE * abs(best.objective)
            if candidate.objective >= min(current.objective, best.objective - slack) - tolerance:
                current = candidate
    except KeyboardInterrupt:
        # Ctrl-C: `best` is only ever rebound to a finished evaluation, so it is valid here
        interrupted = True
        log.append(f"interrupted (Ctrl-C) after {n_rounds} rounds: the best solution so far")

    class_features = [list(subset) for subset in best.subsets]
    selected_features = best.selected.tolist()
    objective = problem.objective(selected_features, class_features)
    log.append(
        f"search: {n_rounds} rounds, {n_restarts} restarts, {searcher.n_swaps} improving swaps, "
        f"{searcher.n_evaluations} exact evaluations, {elapsed():.2f} s"
    )
    log.append(
        f"best: objective {objective:.6f}; {best.n_moved} classes moved off their best subset to "
        f"keep all classes distinct (optimal for this selection)"
    )
    _logger.info("search finished: objective %.6f in %.2f s", objective, elapsed())
    assignment = Assignment(
        selected_features=selected_features,
        class_features=class_features,
        objective=objective,
        bound=None,
        gap=None,
        method="search",
        time_s=elapsed(),
        log=log,
    )
    if interrupted:
        raise SolveInterrupted(assignment)
    return assignment
