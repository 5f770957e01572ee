"""A fast certified upper bound: the MILP's root relaxation with class values as cuts.

For one class c with values ``a_d = scale * A[c, d]`` the MILP's relaxation gives the class

    max { sum_d a_d x_d : sum_d x_d = k, 0 <= x <= s }
        = min over theta of  k * theta + sum_d max(0, a_d - theta) * s_d

(LP duality; the minimum is attained at a breakpoint theta = a_j). One variable ``v[c]`` per class
with the cuts ``v[c] <= k * theta + sum_{a_d > theta} (a_d - theta) * s_d``, added for the theta
that is tightest at the current LP solution, therefore gives the same bound as the x[c, d] <= s[d]
rows, with n_c columns and a few rows per class instead of n_c * depth columns and rows (the
Benders idea of large p-median solvers). At CUB scale each LP re-solve is several times faster,
so the clique-cut loop gets further in the same time (benchmarks/experiments/benders_root.py).

Every row is valid for every feasible solution (v[c] = the class's value in the solution is at
most its best k selected values, which is the minimum over theta of the cut at the integer s;
y = s_d s_e meets the pair rows, the links y <= s and the clique cuts), and any subset of the rows
is a relaxation (a penalised pair without a y column is simply not charged). The bound reported is
not the LP's value but the Lagrangian value recomputed here from its duals with every column
bounded (weak duality), so it holds whatever the LP solver's tolerances. Distinctness is not
modelled: the bound is one for the problem with distinct sets relaxed, hence for the problem.

Rows that stay slack for a few rounds (clique cuts, pair rows, class cuts) are removed again (a
removed row only relaxes the LP); a pair row or class cut that is violated again comes back, and
stays. Clique cuts bring their pairs' y columns but not their pair rows. At CUB scale this keeps
the LP at about 6 200 rows instead of 42 000 and the bound after 360 s at 199.2 instead of 202.0
(benchmarks/experiments/README.md).

Example:
    >>> import numpy as np
    >>> from openqpm.solver.problem import AssignmentProblem
    >>> A = np.array([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]])
    >>> problem = AssignmentProblem(A, np.zeros((3, 3)), np.zeros(3), 2, 1)
    >>> result = cut_relaxation_bound(problem, time_limit_s=10)
    >>> round(result.bound, 6)  # each class its best feature: 1000 / 2 * (1 + 1)
    1000.0
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

from openqpm.solver.problem import AssignmentProblem

__all__ = ["CutBound", "CutRelaxation", "bound_rate_per_s", "cut_relaxation_bound"]


@dataclass
class _Row:
    columns: np.ndarray
    values: np.ndarray
    lower: float
    upper: float
    kind: str  # "card", "class", "pair", "link", "clique"
    slack_rounds: int = 0
    key: tuple[int, int] | None = None  # the pair of a "pair" row, (class, rank) of a "class" one


@dataclass
class CutBound:
    """The result of :func:`cut_relaxation_bound`.

    Args:
        bound: A valid upper bound on the problem's optimum (inf when no LP was solved in time).
        selection_values: (n_f,) the last LP's s, or None.
        rounds: LPs solved.
        log: One line per reported round.
        stopped: Why the loop ended: ``"time"`` (the limit, or an LP that did not finish),
            ``"converged"`` (no cut violated), ``"stalled"`` (four rounds improved the bound by
            less than ``min_relative_improvement``) or ``"rate"`` (the bound fell more slowly
            than ``min_rate_per_s``).
    """

    bound: float
    selection_values: np.ndarray | None
    rounds: int
    log: list[str] = field(default_factory=list)
    stopped: str = "time"


def bound_rate_per_s(times: Sequence[float], bounds: Sequence[float], window: int = 2) -> float:
    """The bound's relative fall per second over its last ``window`` rounds (inf before that).

    Example:
        >>> bound_rate_per_s([1.0, 2.0, 3.0], [110.0, 105.0, 100.0])  # 10 % of 100 in 2 s
        0.05
    """
    if len(times) <= window:
        return math.inf
    seconds = max(times[-1] - times[-1 - window], 1e-9)
    return (bounds[-1 - window] - bounds[-1]) / max(1.0, abs(bounds[-1])) / seconds


class CutRelaxation:
    """The relaxation on HiGHS with its own copy of the rows for exact weak-duality bounds.

    Args:
        problem: The problem.
        seed: HiGHS's random seed.
        threads: HiGHS threads.
    """

    def __init__(self, problem: AssignmentProblem, *, seed: int = 0, threads: int = 1) -> None:
        import highspy

        from openqpm.solver.exact import new_highs

        self._highspy = highspy
        self.problem = problem
        self.n, self.n_classes, self.k = (
            problem.n_all_features,
            problem.n_classes,
            problem.n_per_class,
        )
        self.values = problem.class_scale * problem.A  # (n_c, n)
        self.order = np.argsort(-self.values, axis=1, kind="stable")  # (n_c, n)
        self.sorted_values = np.take_along_axis(self.values, self.order, axis=1)  # (n_c, n)
        self.penalised = problem.R > 0  # (n, n)
        self.highs = new_highs(threads=threads, seed=seed)
        self.highs.changeObjectiveSense(highspy.ObjSense.kMaximize)
        self._inf = float(highspy.kHighsInf)
        self.cost: list[float] = []
        self.col_lower: list[float] = []
        self.col_upper: list[float] = []
        self.rows: list[_Row] = []
        self.s_column = self._add_columns(problem.b, np.zeros(self.n), np.ones(self.n))
        # any class value lies between k times its worst value and the sum of its k best
        best = self.sorted_values[:, : self.k].sum(axis=1)
        worst = self.k * np.minimum(self.sorted_values[:, -1], 0.0) - 1.0
        self.v_column = self._add_columns(np.ones(self.n_classes), worst, best)
        self._add_rows(
            [
                _Row(
                    self.s_column,
                    np.ones(self.n),
                    float(problem.n_features),
                    float(problem.n_features),
                    "card",
                )
            ]
        )
        self.pair_column: dict[tuple[int, int], int] = {}
        self.pair_rows: set[tuple[int, int]] = set()  # pairs whose y >= s_d + s_e - 1 is in
        # pair rows and class cuts dropped once: when they come back they stay (no cycling)
        self.dropped_once: set[tuple[str, tuple[int, int]]] = set()
        self.upper_links: set[tuple[int, int]] = set()
        self.class_cuts: set[tuple[int, int]] = set()
        for c in range(self.n_classes):
            self.add_class_cut(c, self.k - 1)

    # -- growth ----------------------------------------------------------------------------------

    def _add_columns(self, cost: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        count = len(cost)
        first = len(self.cost)
        self.highs.addCols(
            count,
            np.asarray(cost, dtype=np.float64),
            np.asarray(lower, dtype=np.float64),
            np.asarray(upper, dtype=np.float64),
            0,
            np.zeros(count, dtype=np.int32),
            np.zeros(0, dtype=np.int32),
            np.zeros(0),
        )
        self.cost.extend(np.asarray(cost, dtype=np.float64).tolist())
        self.col_lower.extend(np.asarray(lower, dtype=np.float64).tolist())
        self.col_upper.extend(np.asarray(upper, dtype=np.float64).tolist())
        return np.arange(first, first + count, dtype=np.int64)

    def _add_rows(self, rows: list[_Row]) -> None:
        if not rows:
            return
        lengths = np.array([row.columns.size for row in rows])
        starts = np.zeros(len(rows), dtype=np.int32)
        starts[1:] = np.cumsum(lengths)[:-1]
        lower = np.array([row.lower for row in rows])
        upper = np.array([row.upper for row in rows])
        self.highs.addRows(
            len(rows),
            np.where(np.isfinite(lower), lower, -self._inf),
            np.where(np.isfinite(upper), upper, self._inf),
            int(lengths.sum()),
            starts,
            np.concatenate([row.columns for row in rows]).astype(np.int32),
            np.concatenate([row.values for row in rows]).astype(np.float64),
        )
        self.rows.extend(rows)

    def add_class_cut(self, c: int, rank: int) -> bool:
        """``v[c] <= k theta + sum (a_d - theta)^+ s_d`` with theta = class c's value at ``rank``."""
        if (c, rank) in self.class_cuts:
            return False
        self.class_cuts.add((c, rank))
        theta = float(self.sorted_values[c, rank])
        above = self.order[c, :rank]
        coefficients = self.values[c, above] - theta
        keep = coefficients > 0
        self._add_rows(
            [
                _Row(
                    np.concatenate([[self.v_column[c]], self.s_column[above[keep]]]),
                    np.concatenate([[1.0], -coefficients[keep]]),
                    -math.inf,
                    self.k * theta,
                    "class",
                    key=(c, rank),
                )
            ]
        )
        return True

    def _pair_columns(self, pairs: list[tuple[int, int]]) -> None:
        """y columns (cost -R, in [0, 1]) for the penalised pairs (d < e) that have none."""
        new = sorted(set(pairs) - self.pair_column.keys())
        if not new:
            return
        first = np.array([d for d, _ in new])
        second = np.array([e for _, e in new])
        columns = self._add_columns(
            -self.problem.R[first, second], np.zeros(len(new)), np.ones(len(new))
        )
        for pair, column in zip(new, columns):
            self.pair_column[pair] = int(column)

    def add_pairs(self, pairs: list[tuple[int, int]]) -> int:
        """Rows ``y >= s_d + s_e - 1`` (and their y columns where missing) for penalised pairs
        (d < e) whose row is not in the model."""
        pairs = sorted(set(pairs) - self.pair_rows)
        if not pairs:
            return 0
        self._pair_columns(pairs)
        self.pair_rows.update(pairs)
        self._add_rows(
            [
                _Row(
                    np.array([self.pair_column[(d, e)], self.s_column[d], self.s_column[e]]),
                    np.array([1.0, -1.0, -1.0]),
                    -1.0,
                    math.inf,
                    "pair",
                    key=(d, e),
                )
                for d, e in pairs
            ]
        )
        return len(pairs)

    def add_upper_links(self, pairs: list[tuple[int, int]]) -> None:
        """``y <= s_d`` and ``y <= s_e`` for the given pairs."""
        rows = []
        for pair in pairs:
            if pair in self.upper_links:
                continue
            self.upper_links.add(pair)
            y = self.pair_column[pair]
            for d in pair:
                rows.append(
                    _Row(
                        np.array([y, self.s_column[d]]),
                        np.array([1.0, -1.0]),
                        -math.inf,
                        0.0,
                        "link",
                    )
                )
        self._add_rows(rows)

    def add_clique_cut(self, clique: list[int], t: int) -> None:
        """``t * sum_Q s - sum_{pairs in Q} y <= t(t+1)/2`` (see :mod:`openqpm.solver.exact`)."""
        inner = [(min(d, e), max(d, e)) for i, d in enumerate(clique) for e in clique[i + 1 :]]
        self._pair_columns(inner)
        columns = [int(self.s_column[d]) for d in clique] + [self.pair_column[p] for p in inner]
        values = [float(t)] * len(clique) + [-1.0] * len(inner)
        self._add_rows(
            [_Row(np.array(columns), np.array(values), -math.inf, t * (t + 1) / 2.0, "clique")]
        )

    def drop_slack_rows(
        self, row_values: np.ndarray, *, after_rounds: int, kinds: tuple[str, ...] = ("clique",)
    ) -> int:
        """Remove rows of ``kinds`` slack at this LP and the ``after_rounds - 1`` before it.

        A dropped pair row or class cut can come back when it is violated again (its y column
        stays: with the row gone, y only pays its penalty where a clique cut asks for it); one
        that comes back is never dropped again, so no row cycles.
        """
        remove = []
        for index, row in enumerate(self.rows):
            if row.kind not in kinds or (row.kind, row.key) in self.dropped_once:
                continue
            slack = row_values[index] < row.upper - 1e-6 and row_values[index] > row.lower + 1e-6
            row.slack_rounds = row.slack_rounds + 1 if slack else 0
            if row.slack_rounds >= after_rounds:
                remove.append(index)
        if remove:
            self.highs.deleteRows(len(remove), np.array(remove, dtype=np.int32))
            gone = set(remove)
            for index in remove:
                row = self.rows[index]
                if row.key is None:
                    continue
                self.dropped_once.add((row.kind, row.key))
                if row.kind == "pair":
                    self.pair_rows.discard(row.key)
                elif row.kind == "class":
                    self.class_cuts.discard(row.key)
            self.rows = [row for index, row in enumerate(self.rows) if index not in gone]
        return len(remove)

    # -- solving ---------------------------------------------------------------------------------

    def solve(self, time_limit_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(column values, row values, row duals)``, or None if the LP did not finish."""
        highs = self.highs
        highs.setOptionValue("time_limit", float(highs.getRunTime()) + max(0.05, time_limit_s))
        deadline = time.perf_counter() + time_limit_s
        kinds = self._highspy.cb.HighsCallbackType

        def interrupt(
            kind: int, message: str, data_out: object, data_in: object, user: object
        ) -> None:
            data_in.user_interrupt = time.perf_counter() > deadline  # type: ignore[attr-defined]

        highs.setCallback(interrupt, None)  # type: ignore[arg-type]
        highs.startCallback(kinds.kCallbackSimplexInterrupt)
        try:
            highs.run()
        finally:
            highs.stopCallback(kinds.kCallbackSimplexInterrupt)
        if highs.getModelStatus() != self._highspy.HighsModelStatus.kOptimal:
            return None
        solution = highs.getSolution()
        return (
            np.asarray(solution.col_value),
            np.asarray(solution.row_value),
            np.asarray(solution.row_dual),
        )

    def bound(self, row_duals: np.ndarray) -> float:
        """The Lagrangian value at these row duals: a valid bound for any duals (weak duality)."""
        lower = np.array([row.lower for row in self.rows])
        upper = np.array([row.upper for row in self.rows])
        duals = np.array(row_duals, dtype=np.float64)
        # a maximisation's dual of a "<=" row is >= 0 and of a ">=" row <= 0; round-off signs go
        duals[~np.isfinite(lower) & (duals < 0)] = 0.0
        duals[~np.isfinite(upper) & (duals > 0)] = 0.0
        lengths = np.array([row.columns.size for row in self.rows])
        matrix = sparse.csc_matrix(
            (
                np.concatenate([row.values for row in self.rows]),
                (
                    np.repeat(np.arange(len(self.rows)), lengths),
                    np.concatenate([row.columns for row in self.rows]),
                ),
            ),
            shape=(len(self.rows), len(self.cost)),
        )
        reduced = np.asarray(self.cost) - matrix.T @ duals
        row_term = np.where(duals > 0, duals * np.where(np.isfinite(upper), upper, 0.0), 0.0)
        row_term += np.where(duals < 0, duals * np.where(np.isfinite(lower), lower, 0.0), 0.0)
        column_lower, column_upper = np.asarray(self.col_lower), np.asarray(self.col_upper)
        column_term = np.maximum(reduced * column_lower, reduced * column_upper)
        return float(row_term.sum() + column_term.sum())

    def separate_classes(self, s: np.ndarray, v: np.ndarray) -> int:
        """For every class whose v exceeds its value at s, the tightest cut there."""
        sorted_s = s[self.order]  # (n_c, n)
        cumulative = np.cumsum(sorted_s, axis=1)
        # the breakpoint where the cumulative selection reaches k
        rank = np.minimum((cumulative < self.k - 1e-9).sum(axis=1), self.n - 1)
        theta = self.sorted_values[np.arange(self.n_classes), rank]
        value = self.k * theta + (
            np.maximum(self.sorted_values - theta[:, None], 0.0) * sorted_s
        ).sum(axis=1)
        added = 0
        for c in np.flatnonzero(v > value + 1e-7).tolist():
            added += int(self.add_class_cut(c, int(rank[c])))
        return added

    def violated_pairs(self, s: np.ndarray) -> list[tuple[int, int]]:
        """Penalised pairs without a row ``y >= s_d + s_e - 1`` whose ``s_d + s_e`` exceeds 1."""
        support = np.flatnonzero(s > 1e-6)
        over = np.triu(
            self.penalised[np.ix_(support, support)]
            & (s[support][:, None] + s[support][None, :] > 1 + 1e-6),
            1,
        )
        first, second = np.nonzero(over)
        return [
            (int(support[i]), int(support[j]))
            for i, j in zip(first, second)
            if (int(support[i]), int(support[j])) not in self.pair_rows
        ]


def cut_relaxation_bound(
    problem: AssignmentProblem,
    *,
    time_limit_s: float,
    seed: int = 0,
    max_cuts_per_round: int = 300,
    drop_slack_after: int | None = 2,
    min_relative_improvement: float = 2e-4,
    min_rate_per_s: float | None = None,
    drop_kinds: tuple[str, ...] = ("clique", "pair", "class"),
    on_round: Callable[[int, float, np.ndarray], None] | None = None,
) -> CutBound:
    """Run the cut loop of :class:`CutRelaxation` for at most ``time_limit_s`` seconds.

    Args:
        problem: The problem.
        time_limit_s: Wall-clock budget.
        seed: HiGHS's seed.
        max_cuts_per_round: Most clique cuts added per round.
        drop_slack_after: Remove a row of ``drop_kinds`` slack for this many consecutive rounds
            (None: never).
        min_relative_improvement: Stop when four rounds improve the bound by less than four times
            this (relative), once no class cut or pair is missing.
        min_rate_per_s: Stop when the bound fell by less than this (relative, per second) over
            the last two rounds (:func:`bound_rate_per_s`): the caller has a better use for the
            time (``solve(method="auto")`` gives it to the search). None: never.
        drop_kinds: The row kinds that are dropped when slack: ``"clique"``, ``"pair"``,
            ``"class"``.
        on_round: Called with (round, bound, s) after every solved LP (e.g. to round s).

    Returns:
        The best bound over the rounds (every one is valid), the last s, the rounds and a log.
    """
    from openqpm.solver.exact import _separate_cliques

    started = time.perf_counter()
    model = CutRelaxation(problem, seed=seed)
    features = np.arange(problem.n_all_features)
    best = math.inf
    last_s: np.ndarray | None = None
    history: list[float] = []
    times: list[float] = []
    log: list[str] = []
    round_index = 0
    stopped = "time"
    while True:
        left = time_limit_s - (time.perf_counter() - started)
        if left <= 0:
            break
        solved = model.solve(left)
        if solved is None:
            break
        round_index += 1
        columns, row_values, duals = solved
        bound = model.bound(duals)
        best = min(best, bound)
        history.append(best)
        times.append(time.perf_counter() - started)
        s = columns[model.s_column]
        v = columns[model.v_column]
        last_s = s
        if on_round is not None:
            on_round(round_index, best, s)
        dropped = (
            model.drop_slack_rows(row_values, after_rounds=drop_slack_after, kinds=drop_kinds)
            if drop_slack_after
            else 0
        )
        n_class = model.separate_classes(s, v)
        n_pairs = model.add_pairs(model.violated_pairs(s))
        pair_value = {
            pair: float(columns[column])
            for pair, column in model.pair_column.items()
            if column < columns.size
        }
        links = [
            pair for pair, value in pair_value.items() if value > min(s[pair[0]], s[pair[1]]) + 1e-6
        ]
        model.add_upper_links(links)
        cliques = _separate_cliques(
            s, features, pair_value, model.penalised, max_cuts=max_cuts_per_round
        )
        for clique, t, _ in cliques:
            model.add_clique_cut(clique, t)
        log.append(
            f"cut bound round {round_index}: {bound:.4f} (best {best:.4f}); +{n_class} class cuts, "
            f"+{n_pairs} pairs, +{len(links)} links, +{len(cliques)} cliques, -{dropped} slack, "
            f"{len(model.rows)} rows, {time.perf_counter() - started:.1f}s"
        )
        if not (n_class or n_pairs or links or cliques):
            stopped = "converged"
            break
        window = 4
        if (
            not (n_class or n_pairs)
            and len(history) > window
            and history[-window - 1] - history[-1]
            < window * min_relative_improvement * max(1.0, abs(history[-1]))
        ):
            stopped = "stalled"
            break
        if min_rate_per_s is not None and bound_rate_per_s(times, history) < min_rate_per_s:
            stopped = "rate"
            break
    return CutBound(
        bound=best, selection_values=last_s, rounds=round_index, log=log, stopped=stopped
    )
