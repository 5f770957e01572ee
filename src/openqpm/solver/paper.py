"""The paper's own formulation and iterative scheme, on the open-source MILP solver (reference).

This reproduces how the QPM paper (section 4.1.1, appendix C.C) and its reference code solve the
problem, so that benchmarks compare like with like; :mod:`openqpm.solver.exact` is the method to
use. Differences from the linear MILP of :mod:`openqpm.solver.exact`:

* **Bilinear edges.** Raw edges ``E_raw[d,c]`` and the selection s are independent binaries; the
  existing edges are their product ``E = E_raw * s``, linearised as the standard product
  (``E <= E_raw``, ``E <= s``, ``E >= E_raw + s - 1``).
* **Relaxed totals.** Instead of exactly ``k`` per class the first model only asks for
  ``sum E <= n_c * k`` in total and at least one feature per class (as the reference code does).
* **Iterative balance constraints (paper eq. 9).** After each solve, the classes with fewer than
  ``k`` features join C_sparse (a set that only grows) and get ``sum_{d in Gamma} E[d,c] >= k``,
  where Gamma is the union of every selection seen so far.
* **Iterative deduplication (paper eq. 10).** Once eq. 9 holds, pairs of classes with the same
  feature set must differ somewhere inside F, the union of their features in the start solution
  (``sum_{d in F} |E[d,c] - E[d,c']| >= 1``, linearised with one binary per feature of F, as the
  reference code does with a norm constraint).
* **Start solutions (appendix C.C, reference code).** Every re-solve starts from a repair of the
  last solution on its own selection: surplus assignments removed (lowest A first), deficient
  classes filled with their best free features, then duplicates removed by the cheapest swap that
  creates no new duplicate.

Re-solves continue until no constraint is violated. It is slow by design (the reason openqpm
exists); it returns a valid assignment or raises :class:`PaperFormulationTimeout`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import sparse

from openqpm.solver.exact import new_highs
from openqpm.solver.problem import (
    Assignment,
    AssignmentProblem,
    ProgressCallback,
    SolverProgress,
    checked_selection,
)

_logger = logging.getLogger(__name__)

__all__ = ["PaperFormulationTimeout", "solve_paper_formulation"]


class PaperFormulationTimeout(TimeoutError):
    """The paper's iterative scheme ran out of time before all its constraints held."""


class _PaperModel:
    """The bilinear model on HiGHS with the iterative constraints added as rows.

    Column layout: ``s`` (n_f), ``E_raw`` (n_c * n_f, class-major), ``E`` (n_c * n_f), ``y`` (one per
    penalised pair), then one binary per feature of every deduplication constraint.
    """

    def __init__(self, problem: AssignmentProblem, *, seed: int, threads: int) -> None:
        import highspy

        self._highspy = highspy
        self.problem = problem
        n_c, n_f = problem.n_classes, problem.n_all_features
        self.n_classes, self.n_all = n_c, n_f
        self.k = problem.n_per_class
        first, second, weight = problem.penalised_pairs()
        self.pairs = (first, second)
        n_edges = n_c * n_f
        self.raw_start = n_f
        self.edge_start = n_f + n_edges
        self.pair_start = n_f + 2 * n_edges
        n_columns = self.pair_start + first.size
        cost = np.concatenate(
            [
                problem.b,
                np.zeros(n_edges),
                problem.class_scale * problem.A.ravel(),  # (n_c * n_f,) class-major
                -weight,
            ]
        )
        edges = np.arange(n_edges)
        edge_feature = np.tile(np.arange(n_f), n_c)  # (n_c * n_f,): feature of each edge
        edge_class = np.repeat(np.arange(n_c), n_f)  # (n_c * n_f,): class of each edge
        raw = self.raw_start + edges
        existing = self.edge_start + edges
        rows: list[np.ndarray] = []
        columns: list[np.ndarray] = []
        values: list[np.ndarray] = []
        lower: list[np.ndarray] = []
        upper: list[np.ndarray] = []
        row = 0

        def block(row_ids: np.ndarray, column_ids: np.ndarray, coefficients: np.ndarray) -> None:
            rows.append(row_ids)
            columns.append(column_ids)
            values.append(coefficients)

        # sum s = K
        block(np.zeros(n_f, dtype=np.int64), np.arange(n_f), np.ones(n_f))
        lower.append(np.array([problem.n_features]))
        upper.append(np.array([problem.n_features]))
        row += 1
        # E - E_raw <= 0, E - s <= 0, E - E_raw - s >= -1: the product E = E_raw * s
        ids = row + edges
        block(np.concatenate([ids, ids]), np.concatenate([existing, raw]), _pm(n_edges))
        ids = row + n_edges + edges
        block(np.concatenate([ids, ids]), np.concatenate([existing, edge_feature]), _pm(n_edges))
        lower.append(np.full(2 * n_edges, -np.inf))
        upper.append(np.zeros(2 * n_edges))
        ids = row + 2 * n_edges + edges
        block(
            np.concatenate([ids, ids, ids]),
            np.concatenate([existing, raw, edge_feature]),
            np.concatenate([np.ones(n_edges), -np.ones(n_edges), -np.ones(n_edges)]),
        )
        lower.append(np.full(n_edges, -1.0))
        upper.append(np.full(n_edges, np.inf))
        row += 3 * n_edges
        # relaxed total (the reference code's "<="), and at least one feature per class
        block(np.full(n_edges, row), existing, np.ones(n_edges))
        lower.append(np.array([-np.inf]))
        upper.append(np.array([float(n_c * self.k)]))
        row += 1
        block(row + edge_class, existing, np.ones(n_edges))
        lower.append(np.ones(n_c))
        upper.append(np.full(n_c, np.inf))
        row += n_c
        # y >= s_d + s_e - 1 for the penalised pairs
        ids = row + np.arange(first.size)
        block(
            np.concatenate([ids, ids, ids]),
            np.concatenate([self.pair_start + np.arange(first.size), first, second]),
            np.concatenate([np.ones(first.size), -np.ones(first.size), -np.ones(first.size)]),
        )
        lower.append(np.full(first.size, -1.0))
        upper.append(np.full(first.size, np.inf))
        row += first.size

        matrix = sparse.csc_matrix(
            (np.concatenate(values), (np.concatenate(rows), np.concatenate(columns))),
            shape=(row, n_columns),
        )
        infinity = highspy.kHighsInf
        lp = highspy.HighsLp()
        lp.num_col_ = n_columns
        lp.num_row_ = row
        lp.sense_ = highspy.ObjSense.kMaximize
        lp.col_cost_ = cost
        lp.col_lower_ = np.zeros(n_columns)
        lp.col_upper_ = np.ones(n_columns)
        row_lower = np.concatenate(lower).astype(np.float64)
        row_upper = np.concatenate(upper).astype(np.float64)
        lp.row_lower_ = np.where(np.isfinite(row_lower), row_lower, -infinity)
        lp.row_upper_ = np.where(np.isfinite(row_upper), row_upper, infinity)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = matrix.indptr
        lp.a_matrix_.index_ = matrix.indices
        lp.a_matrix_.value_ = matrix.data
        integrality = np.full(n_columns, int(highspy.HighsVarType.kInteger))
        integrality[self.pair_start :] = int(highspy.HighsVarType.kContinuous)
        lp.integrality_ = [highspy.HighsVarType(int(v)) for v in integrality]
        highs = new_highs(threads=threads, seed=seed)
        highs.passModel(lp)
        self.highs = highs
        self.n_columns = n_columns
        # rows of the iterative constraints, replaced every round as the reference code does
        self.iterative_rows: list[int] = []

    def edge_column(self, class_index: int, feature: int | np.ndarray) -> np.ndarray:
        return np.asarray(self.edge_start + class_index * self.n_all + np.asarray(feature))

    def set_iterative_constraints(
        self,
        sparse_classes: Sequence[int],
        gamma: np.ndarray,
        dedup: Sequence[tuple[int, int, np.ndarray]],
    ) -> None:
        """Replace the eq. 9 and eq. 10 rows (and the dedup binaries) with the given ones."""
        highspy = self._highspy
        highs = self.highs
        if self.iterative_rows:
            highs.deleteRows(
                len(self.iterative_rows), np.array(self.iterative_rows, dtype=np.int32)
            )
            self.iterative_rows = []
        n_existing = highs.getNumCol()
        if n_existing > self.n_columns:
            extra = np.arange(self.n_columns, n_existing, dtype=np.int32)
            highs.deleteVars(int(extra.size), extra.tolist())
        infinity = highspy.kHighsInf
        first_row = highs.getNumRow()
        for c in sparse_classes:
            columns = self.edge_column(int(c), gamma).astype(np.int32)
            highs.addRow(float(self.k), infinity, columns.size, columns, np.ones(columns.size))
        for c, other, features in dedup:
            # v_d = 1 only where exactly one of the two classes uses d; at least one such d
            n_new = features.size
            first_column = highs.getNumCol()
            highs.addVars(n_new, np.zeros(n_new), np.ones(n_new))
            v_columns = np.arange(first_column, first_column + n_new, dtype=np.int32)
            highs.changeColsIntegrality(
                n_new, v_columns, np.full(n_new, highspy.HighsVarType.kInteger)
            )
            mine = self.edge_column(c, features).astype(np.int32)
            theirs = self.edge_column(other, features).astype(np.int32)
            for v, e_mine, e_theirs in zip(v_columns, mine, theirs):
                pair = np.array([v, e_mine, e_theirs], dtype=np.int32)
                highs.addRow(-infinity, 0.0, 3, pair, np.array([1.0, -1.0, -1.0]))
                highs.addRow(-infinity, 2.0, 3, pair, np.array([1.0, 1.0, 1.0]))
            highs.addRow(1.0, infinity, n_new, v_columns, np.ones(n_new))
        self.iterative_rows = list(range(first_row, highs.getNumRow()))

    def start_vector(self, selection: np.ndarray, edges: np.ndarray) -> np.ndarray:
        """Full column values for a selection and an (n_c, n_f) 0/1 edge matrix."""
        values = np.zeros(self.highs.getNumCol())
        values[selection] = 1.0
        flat = edges.ravel().astype(np.float64)  # (n_c * n_f,)
        values[self.raw_start : self.raw_start + flat.size] = flat
        values[self.edge_start : self.edge_start + flat.size] = flat
        first, second = self.pairs
        chosen = np.zeros(self.n_all, dtype=bool)
        chosen[selection] = True
        values[self.pair_start : self.pair_start + first.size] = chosen[first] & chosen[second]
        return values

    def solve(self, start: np.ndarray, time_limit_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Re-optimise from a start; returns (selection ids, (n_c, n_f) edges)."""
        highspy = self._highspy
        highs = self.highs
        highs.setOptionValue("time_limit", max(0.1, float(time_limit_s)))
        solution = highspy.HighsSolution()
        solution.col_value = start.tolist()
        solution.value_valid = True
        highs.setSolution(solution)
        # HiGHS checks its time limit rarely inside the LPs of a model this size: the
        # interrupt callbacks enforce the deadline wherever HiGHS offers them
        deadline = time.perf_counter() + float(time_limit_s)
        kinds = highspy.cb.HighsCallbackType
        interrupts = (
            kinds.kCallbackSimplexInterrupt,
            kinds.kCallbackIpmInterrupt,
            kinds.kCallbackMipInterrupt,
        )

        def interrupt(kind: int, message: str, data_out: Any, data_in: Any, user: Any) -> None:
            data_in.user_interrupt = time.perf_counter() > deadline

        highs.setCallback(interrupt, None)  # type: ignore[arg-type]
        for kind in interrupts:
            highs.startCallback(kind)
        try:
            highs.run()
        finally:
            for kind in interrupts:
                highs.stopCallback(kind)
        values = np.asarray(highs.getSolution().col_value)
        if values.size < self.n_columns or highs.getInfo().primal_solution_status != 2:
            raise PaperFormulationTimeout(
                "the paper formulation found no feasible solution in its time limit "
                f"({highs.modelStatusToString(highs.getModelStatus())})"
            )
        selection = np.flatnonzero(values[: self.n_all] > 0.5)
        n_edges = self.n_classes * self.n_all
        edges = values[self.edge_start : self.edge_start + n_edges].reshape(
            self.n_classes, self.n_all
        )  # (n_c, n_f)
        return selection, (edges > 0.5) & (values[None, : self.n_all] > 0.5)


def _pm(count: int) -> np.ndarray:
    """``[+1] * count + [-1] * count``."""
    return np.concatenate([np.ones(count), -np.ones(count)])


def _balance_repair(
    problem: AssignmentProblem, edges: np.ndarray, selection: np.ndarray
) -> np.ndarray:
    """Start solution of eq. 9 (reference code): exactly k selected features per class.

    Surplus assignments with the lowest A are removed from classes with more than k (keeping
    each one's top k), then every deficient class gets its best unassigned selected features.
    """
    k = problem.n_per_class
    repaired = np.zeros_like(edges)
    selected_mask = np.zeros(problem.n_all_features, dtype=bool)
    selected_mask[selection] = True
    for c in range(problem.n_classes):
        assigned = np.flatnonzero(edges[c] & selected_mask)
        keep = assigned[np.argsort(-problem.A[c, assigned], kind="stable")[:k]]
        if keep.size < k:
            free = np.setdiff1d(selection, keep)
            fill = free[np.argsort(-problem.A[c, free], kind="stable")[: k - keep.size]]
            keep = np.concatenate([keep, fill])
        repaired[c, keep] = True
    return repaired


def _dedup_repair(
    problem: AssignmentProblem, edges: np.ndarray, selection: np.ndarray
) -> np.ndarray:
    """Start solution of eq. 10 (reference code's greedy swap repair).

    Repeatedly, for a duplicate pair, the swap (one assigned feature out, one free selected
    feature in, in one of the two classes) with the smallest loss that creates no new duplicate
    is applied. Classes that cannot be fixed this way are left as they are.
    """
    edges = edges.copy()
    stuck: set[tuple[int, int]] = set()
    while True:
        pairs = [pair for pair in _duplicate_pairs(edges) if pair not in stuck]
        if not pairs:
            return edges
        c, other = pairs[0]
        existing = {tuple(np.flatnonzero(row)) for row in edges}
        best: tuple[float, int, int, int] | None = None
        for cls in (c, other):
            assigned = np.flatnonzero(edges[cls])
            free = np.setdiff1d(selection, assigned)
            for removed in assigned:
                for added in free:
                    candidate = tuple(sorted(set(assigned) - {removed} | {added}))
                    if candidate in existing:
                        continue
                    loss = float(problem.A[cls, removed] - problem.A[cls, added])
                    if best is None or loss < best[0]:
                        best = (loss, cls, int(removed), int(added))
        if best is None:
            stuck.add((c, other))
            continue
        _, chosen_class, removed_feature, added_feature = best
        edges[chosen_class, removed_feature] = False
        edges[chosen_class, added_feature] = True


def _duplicate_pairs(edges: np.ndarray) -> list[tuple[int, int]]:
    """Pairs of classes (c < c') with identical rows."""
    owner: dict[bytes, int] = {}
    pairs = []
    for c, row in enumerate(edges):
        key = np.packbits(row).tobytes()
        if key in owner:
            pairs.append((owner[key], c))
        else:
            owner[key] = c
    return pairs


def _start_selection(problem: AssignmentProblem) -> np.ndarray:
    """The start selection: the constants' compatible set when recorded, else a greedy one."""
    recorded = problem.metadata.get("start_features")
    if isinstance(recorded, list) and len(recorded) == problem.n_features:
        return np.array(sorted(int(d) for d in recorded))
    # greedy: most useful features first, skipping any penalised with one already taken
    order = np.argsort(-problem.A.max(axis=0), kind="stable")
    chosen: list[int] = []
    for d in order:
        if not chosen or not np.any(problem.R[d, chosen] > 0):
            chosen.append(int(d))
        if len(chosen) == problem.n_features:
            break
    for d in order:  # not enough compatible ones: fill with the next most useful
        if len(chosen) == problem.n_features:
            break
        if int(d) not in chosen:
            chosen.append(int(d))
    return np.array(sorted(chosen))


def solve_paper_formulation(
    problem: AssignmentProblem,
    *,
    time_limit_s: float,
    seed: int = 0,
    start: Assignment | Sequence[int] | np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    threads: int = 1,
) -> Assignment:
    """Solve with the paper's bilinear formulation and iterative constraints (reference method).

    Args:
        problem: The problem.
        time_limit_s: Wall-clock budget for all re-solves together.
        seed: HiGHS's random seed.
        start: Ignored except for its selection, which replaces the compatible-set start (the
            paper starts from the eps clique).
        progress: Called with a :class:`SolverProgress` after every solve.
        threads: HiGHS threads.

    Returns:
        The final solution, ``method="paper"``, without a bound (the iterative constraints
        restrict the search to Gamma, so the relaxation's bound is not a bound on the problem).

    Raises:
        ValueError: If ``time_limit_s`` is not positive.
        PaperFormulationTimeout: If the time ran out before a solution satisfying every
            constraint was reached (the message says how far it got).
        ImportError: If highspy is not installed.
    """
    if not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be positive, got {time_limit_s}")
    started = time.perf_counter()
    deadline = started + float(time_limit_s)
    k = problem.n_per_class
    log: list[str] = []

    def note(message: str, objective: float | None) -> None:
        elapsed = time.perf_counter() - started
        log.append(f"{elapsed:7.2f}s {message}")
        _logger.info("paper: %s", message)
        if progress is not None:
            progress(SolverProgress(elapsed_s=elapsed, objective=objective, message=message))

    model = _PaperModel(problem, seed=seed, threads=threads)
    note(f"model: {model.n_columns} columns", None)
    if start is not None:
        selection = checked_selection(problem, start)
    else:
        selection = _start_selection(problem)
    # first start: every class its k best features of the start selection
    edges = _balance_repair(
        problem, np.zeros((problem.n_classes, problem.n_all_features), dtype=bool), selection
    )
    gamma = np.zeros(problem.n_all_features, dtype=bool)
    sparse_classes: set[int] = set()
    dedup: dict[tuple[int, int], np.ndarray] = {}
    phase = 1
    solve_index = 0
    while True:
        left = deadline - time.perf_counter()
        if left <= 0.1:
            raise PaperFormulationTimeout(
                f"paper formulation: time limit {time_limit_s:.0f} s reached after {solve_index} "
                f"solves in phase {phase} with {len(sparse_classes)} balance and {len(dedup)} "
                "deduplication constraints still being added"
            )
        solve_index += 1
        try:
            selection, edges = model.solve(model.start_vector(selection, edges), left)
        except PaperFormulationTimeout as error:
            raise PaperFormulationTimeout(f"{error} (solve {solve_index}, phase {phase})") from None
        gamma[selection] = True
        counts = edges.sum(axis=1)
        deficient = np.flatnonzero(counts < k)
        duplicates = _duplicate_pairs(edges) if phase == 2 else []
        value = _relaxed_value(problem, selection, edges)
        note(
            f"solve {solve_index} (phase {phase}): value {value:.6f}, {deficient.size} classes "
            f"below {k}, {len(duplicates)} duplicate pairs",
            value,
        )
        if deficient.size == 0 and not duplicates:
            if phase == 1:
                phase = 2
                duplicates = _duplicate_pairs(edges)
                if not duplicates:
                    break
            else:
                break
        sparse_classes.update(int(c) for c in deficient)
        # the start for the next solve: balance, then (phase 2) deduplicate
        edges = _balance_repair(problem, edges, selection)
        if phase == 2:
            for pair in duplicates:
                union = np.flatnonzero(edges[pair[0]] | edges[pair[1]])
                previous = dedup.get(pair)
                dedup[pair] = union if previous is None else np.union1d(previous, union)
            edges = _dedup_repair(problem, edges, selection)
        model.set_iterative_constraints(
            sorted(sparse_classes),
            np.flatnonzero(gamma),
            [(c, other, features) for (c, other), features in dedup.items()],
        )

    class_features = [np.flatnonzero(row).tolist() for row in edges]
    objective = problem.objective(selection.tolist(), class_features)
    note(f"done after {solve_index} solves: objective {objective:.6f}", objective)
    return Assignment(
        selected_features=selection.tolist(),
        class_features=class_features,
        objective=objective,
        bound=None,
        gap=None,
        method="paper",
        time_s=time.perf_counter() - started,
        log=log,
    )


def _relaxed_value(problem: AssignmentProblem, selection: np.ndarray, edges: np.ndarray) -> float:
    """The model's objective of a solution (any number of features per class)."""
    rows, columns = np.nonzero(edges)
    value = problem.class_scale * float(problem.A[rows, columns].sum())
    block = problem.R[np.ix_(selection, selection)]
    return value - 0.5 * float(block.sum()) + float(problem.b[selection].sum())
