"""Route: Lagrangian decomposition of the linking x[c, d] <= s[d], with distinctness kept.

With multipliers u >= 0 on x[c, d] <= s[d] the problem splits into

* the class part: max over *distinct* k-sets T_c of sum_c sum_{d in T_c} (scale A[c, d] - u[c, d]),
  solved exactly as an assignment of classes to sets (openqpm.solver.search._distinct_subsets over
  all features, certified by matching duals);
* the selection part: max over |S| = K of sum_d (b[d] + sum_c u[c, d]) s_d - sum_{pairs in S} R,
  bounded here by an LP (y >= s_d + s_e - 1, y <= s, the root's clique cuts) whose value is
  recomputed from its duals (weak duality), or, with --exact-selection, solved as a small MILP by
  HiGHS (its dual bound is used, so a time-limited solve stays valid).

L(u) = class part + selection part >= optimum for every u >= 0. Starting point: u from the MILP's
own root LP (compact_root in dw_root.py), where L equals the root bound except for the gain from
distinctness; then projected subgradient steps u <- max(0, u - step * (s - x)).

Usage: python lagrange.py demo --compact-s 30 --seconds 120 [--exact-selection]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from common import load_problem, load_text
from dw_root import compact_root, incumbent
from scipy import sparse

from openqpm.solver.exact import new_highs
from openqpm.solver.problem import AssignmentProblem
from openqpm.solver.search import _distinct_subsets


def class_part(problem: AssignmentProblem, u: np.ndarray, *, distinct: bool):
    """(value, x) of max over k-sets per class of sum (scale A - u), sets distinct or not."""
    values = problem.class_scale * problem.A - u  # (n_c, n_f)
    k = problem.n_per_class
    x = np.zeros_like(values)
    if not distinct:
        top = np.argsort(-values, axis=1, kind="stable")[:, :k]
        np.put_along_axis(x, top, 1.0, axis=1)
        return float((values * x).sum()), x
    subsets, _, _ = _distinct_subsets(values, np.arange(problem.n_all_features), k)
    for c, subset in enumerate(subsets):
        x[c, list(subset)] = 1.0
    return float((values * x).sum()), x


class SelectionPart:
    """max w.s - R.y over |S| = K on an LP (or MILP) with the root's cliques and links."""

    def __init__(self, problem: AssignmentProblem, cliques, links, *, exact: bool) -> None:
        import highspy

        self.highspy = highspy
        self.problem = problem
        self.exact = exact
        n = problem.n_all_features
        first, second, weight = problem.penalised_pairs()
        pairs = list(zip(first.tolist(), second.tolist()))
        self.pair_index = {p: n + i for i, p in enumerate(pairs)}
        n_cols = n + len(pairs)
        rows, cols, vals, lower, upper = [], [], [], [], []

        def row(entries, lo, up):
            r = len(lower)
            for c, v in entries:
                rows.append(r)
                cols.append(c)
                vals.append(v)
            lower.append(lo)
            upper.append(up)

        row([(d, 1.0) for d in range(n)], problem.n_features, problem.n_features)
        for (d, e), y in self.pair_index.items():
            row([(y, 1.0), (d, -1.0), (e, -1.0)], -1.0, math.inf)
        for d, e in links:
            y = self.pair_index[(d, e)]
            row([(y, 1.0), (d, -1.0)], -math.inf, 0.0)
            row([(y, 1.0), (e, -1.0)], -math.inf, 0.0)
        for clique, t in cliques:
            entries = [(d, float(t)) for d in clique]
            entries += [
                (self.pair_index[(min(d, e), max(d, e))], -1.0)
                for i, d in enumerate(clique)
                for e in clique[i + 1 :]
            ]
            row(entries, -math.inf, t * (t + 1) / 2.0)
        self.matrix = sparse.csc_matrix((vals, (rows, cols)), shape=(len(lower), n_cols))
        self.lower, self.upper = np.array(lower), np.array(upper)
        self.base_cost = np.concatenate([np.zeros(n), -weight])
        self.n = n
        highs = new_highs(threads=1, seed=0)
        highs.changeObjectiveSense(highspy.ObjSense.kMaximize)
        inf = highspy.kHighsInf
        highs.addCols(
            n_cols,
            self.base_cost,
            np.zeros(n_cols),
            np.ones(n_cols),
            0,
            np.zeros(n_cols, np.int32),
            np.zeros(0, np.int32),
            np.zeros(0),
        )
        csr = self.matrix.tocsr()
        highs.addRows(
            len(lower),
            np.where(np.isfinite(self.lower), self.lower, -inf),
            np.where(np.isfinite(self.upper), self.upper, inf),
            csr.nnz,
            csr.indptr[:-1].astype(np.int32),
            csr.indices.astype(np.int32),
            csr.data,
        )
        if exact:
            highs.changeColsIntegrality(
                n, np.arange(n, dtype=np.int32), np.full(n, highspy.HighsVarType.kInteger)
            )
            highs.setOptionValue("mip_rel_gap", 1e-6)
        self.highs = highs

    def solve(self, w: np.ndarray, time_limit: float = 60.0):
        """(valid upper bound, s at the solution)."""
        cost = self.base_cost.copy()
        cost[: self.n] = w
        highs = self.highs
        highs.changeColsCost(self.n, np.arange(self.n, dtype=np.int32), w)
        if self.exact:
            highs.setOptionValue("time_limit", time_limit)
            highs.run()
            info = highs.getInfo()
            s = np.asarray(highs.getSolution().col_value)[: self.n]
            return float(info.mip_dual_bound), s
        highs.setOptionValue("time_limit", float(highs.getRunTime()) + time_limit)
        highs.run()
        solution = highs.getSolution()
        duals = np.array(solution.row_dual)
        duals[~np.isfinite(self.lower) & (duals < 0)] = 0.0
        duals[~np.isfinite(self.upper) & (duals > 0)] = 0.0
        reduced = cost - self.matrix.T @ duals
        row_term = np.where(duals > 0, duals * np.where(np.isfinite(self.upper), self.upper, 0), 0)
        row_term += np.where(duals < 0, duals * np.where(np.isfinite(self.lower), self.lower, 0), 0)
        bound = float(row_term.sum() + np.maximum(reduced, 0.0).sum())  # columns in [0, 1]
        return bound, np.asarray(solution.col_value)[: self.n]


def lagrangian(problem, selection: SelectionPart, u: np.ndarray, *, distinct: bool):
    w = problem.b + u.sum(axis=0)
    select_bound, s = selection.solve(w)
    class_value, x = class_part(problem, u, distinct=distinct)
    return select_bound + class_value, s, x, select_bound, class_value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compact-s", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--exact-selection", action="store_true")
    parser.add_argument("--no-distinct", action="store_true")
    parser.add_argument("--step", type=float, default=0.5)
    args = parser.parse_args()
    problem = load_problem(args.name, args.seed)
    _, objective = incumbent(problem, args.name, args.seed)
    print(problem, f"incumbent {objective:.4f}", load_text(), flush=True)
    started = time.perf_counter()
    root_bound, cliques, links, u = compact_root(problem, args.compact_s, objective)
    print(
        f"root (today's relaxation): bound {root_bound:.4f} gap "
        f"{100 * (root_bound - objective) / abs(objective):.3f}% "
        f"{time.perf_counter() - started:.1f}s",
        flush=True,
    )
    selection = SelectionPart(problem, cliques, links, exact=args.exact_selection)
    distinct = not args.no_distinct
    for flag in (False, True):
        value, *_ = lagrangian(problem, selection, u, distinct=flag)
        print(
            f"L(u_root) with class part distinct={flag}: {value:.4f} gap "
            f"{100 * (value - objective) / abs(objective):.3f}%",
            flush=True,
        )
    best = math.inf
    best_u = u.copy()
    step = args.step
    history = []
    iteration = 0
    subgradient_started = time.perf_counter()
    while time.perf_counter() - subgradient_started < args.seconds:
        iteration += 1
        value, s, x, sel_value, class_value = lagrangian(problem, selection, u, distinct=distinct)
        history.append(value)
        if value < best:
            best, best_u = value, u.copy()
        g = s[None, :] - x  # dL/du[c, d] = s_d - x[c, d]
        norm = float((g * g).sum())
        if norm < 1e-12:
            break
        # Polyak step towards the incumbent
        t = step * (value - objective) / norm
        u = np.maximum(0.0, u - t * g)
        if iteration % 10 == 0:
            if len(history) > 20 and min(history[-10:]) > min(history[:-10]) - 1e-6:
                step /= 2
            print(
                f"iter {iteration:4d} {time.perf_counter() - started:7.1f}s L {value:.4f} "
                f"(selection {sel_value:.3f} + classes {class_value:.3f}) best {best:.4f} gap "
                f"{100 * (best - objective) / abs(objective):.3f}% step {step:.3g}",
                flush=True,
            )
    print(
        f"RESULT lagrange {args.name} exact_selection={args.exact_selection} distinct={distinct} "
        f"incumbent {objective:.4f} root {root_bound:.4f} "
        f"({100 * (root_bound - objective) / abs(objective):.3f}%) lagrangian {best:.4f} "
        f"({100 * (best - objective) / abs(objective):.3f}%) iterations {iteration} "
        f"time {time.perf_counter() - started:.1f}s {load_text()}"
    )
    del best_u


if __name__ == "__main__":
    main()
