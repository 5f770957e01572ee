"""Route: the root relaxation without x columns (class values as Benders-style cuts).

For a class c with values a_d = scale * A[c, d], the LP's class part is

    max { sum_d a_d x_d : sum_d x_d = k, 0 <= x <= s } = min_theta k theta + sum_d (a_d - theta)^+ s_d

(LP duality; the minimum is at a breakpoint theta = a_j). So one variable v_c per class with the
cuts ``v_c <= k theta + sum_{a_d > theta} (a_d - theta) s_d`` gives the same bound as the MILP's
x[c, d] <= s[d] rows once the right thetas are in, with n_c variables and a few rows per class
instead of n_c * depth columns and rows (the p-median Benders idea). Any subset of the cuts (and of
the penalised pairs) is a relaxation, so the bound, recomputed from the duals (weak duality, every
column bounded: s, y in [0, 1], v_c in [k min a, sum of its top k]), is valid at every round.
Penalty: y >= s_d + s_e - 1 for pairs the LP violates, y <= s, the MILP's clique cuts.

Usage: python benders_root.py cub 450 [--cut-rounds-per-class 1]
Prints the bound per round; compare with today's root loop (profile_root.py / baseline.py).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from common import load_problem, load_text
from dw_root import incumbent
from scipy import sparse

from openqpm.solver.exact import _separate_cliques, new_highs
from openqpm.solver.problem import AssignmentProblem


class BendersRoot:
    def __init__(self, problem: AssignmentProblem) -> None:
        import highspy

        self.highspy = highspy
        self.problem = problem
        self.n, self.n_classes, self.k = (
            problem.n_all_features,
            problem.n_classes,
            problem.n_per_class,
        )
        self.a = problem.class_scale * problem.A  # (n_c, n)
        self.order = np.argsort(-self.a, axis=1, kind="stable")
        self.sorted_a = np.take_along_axis(self.a, self.order, axis=1)
        self.highs = new_highs(threads=1, seed=0)
        self.highs.changeObjectiveSense(highspy.ObjSense.kMaximize)
        self.inf = float(highspy.kHighsInf)
        self.cost: list[float] = []
        self.col_lower: list[float] = []
        self.col_upper: list[float] = []
        self.row_lower: list[float] = []
        self.row_upper: list[float] = []
        self.r: list[np.ndarray] = []
        self.c: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.n_rows = 0
        self.penalised = problem.R > 0
        self.s_col = self._cols(problem.b, np.zeros(self.n), np.ones(self.n))
        top = self.sorted_a[:, : self.k].sum(axis=1)
        low = self.k * np.minimum(self.sorted_a[:, -1], 0.0) - 1.0
        self.v_col = self._cols(np.ones(self.n_classes), low, top)
        self._rows(
            [float(problem.n_features)],
            [float(problem.n_features)],
            [(self.s_col, np.ones(self.n))],
        )
        self.pair_column: dict[tuple[int, int], int] = {}
        self.upper_links: set[tuple[int, int]] = set()
        self.class_cuts: set[tuple[int, int]] = set()
        self.n_class_cuts = 0

    def _cols(self, cost, lower, upper) -> np.ndarray:
        count = len(cost)
        first = len(self.cost)
        self.highs.addCols(
            count,
            np.asarray(cost, float),
            np.asarray(lower, float),
            np.asarray(upper, float),
            0,
            np.zeros(count, np.int32),
            np.zeros(0, np.int32),
            np.zeros(0),
        )
        self.cost += list(np.asarray(cost, float))
        self.col_lower += list(np.asarray(lower, float))
        self.col_upper += list(np.asarray(upper, float))
        return np.arange(first, first + count)

    def _rows(self, lower, upper, entries) -> None:
        count = len(lower)
        starts, idx, val = [], [], []
        for i, (cols, vals) in enumerate(entries):
            starts.append(len(idx))
            idx += list(np.asarray(cols).tolist())
            val += list(np.asarray(vals, float).tolist())
            self.r.append(np.full(len(cols), self.n_rows + i))
            self.c.append(np.asarray(cols, np.int64))
            self.v.append(np.asarray(vals, float))
        lo = np.where(np.isfinite(lower), lower, -self.inf).astype(float)
        up = np.where(np.isfinite(upper), upper, self.inf).astype(float)
        self.highs.addRows(
            count,
            lo,
            up,
            len(idx),
            np.array(starts, np.int32),
            np.array(idx, np.int32),
            np.array(val, float),
        )
        self.row_lower += list(lower)
        self.row_upper += list(upper)
        self.n_rows += count

    def add_class_cut(self, c: int, j: int) -> bool:
        """v_c - sum_{rank < j} (a - a_j) s <= k a_j (theta = the value at rank j)."""
        if (c, j) in self.class_cuts:
            return False
        self.class_cuts.add((c, j))
        theta = self.sorted_a[c, j]
        above = self.order[c, :j]
        coef = self.a[c, above] - theta
        keep = coef > 0
        self._rows(
            [-math.inf],
            [self.k * theta],
            [
                (
                    np.concatenate([[self.v_col[c]], self.s_col[above[keep]]]),
                    np.concatenate([[1.0], -coef[keep]]),
                )
            ],
        )
        self.n_class_cuts += 1
        return True

    def add_pairs(self, pairs) -> int:
        pairs = [p for p in pairs if p not in self.pair_column]
        if not pairs:
            return 0
        first = np.array([d for d, _ in pairs])
        second = np.array([e for _, e in pairs])
        cols = self._cols(-self.problem.R[first, second], np.zeros(len(pairs)), np.ones(len(pairs)))
        for p, col in zip(pairs, cols):
            self.pair_column[p] = int(col)
        self._rows(
            [-1.0] * len(pairs),
            [math.inf] * len(pairs),
            [
                ([col, self.s_col[d], self.s_col[e]], [1.0, -1.0, -1.0])
                for (d, e), col in zip(pairs, cols)
            ],
        )
        return len(pairs)

    def add_upper_link(self, pair) -> None:
        if pair in self.upper_links:
            return
        self.upper_links.add(pair)
        y = self.pair_column[pair]
        self._rows(
            [-math.inf, -math.inf],
            [0.0, 0.0],
            [([y, self.s_col[pair[0]]], [1.0, -1.0]), ([y, self.s_col[pair[1]]], [1.0, -1.0])],
        )

    def add_clique(self, clique, t) -> None:
        self.add_pairs(
            [(min(d, e), max(d, e)) for i, d in enumerate(clique) for e in clique[i + 1 :]]
        )
        cols = [self.s_col[d] for d in clique]
        vals = [float(t)] * len(cols)
        for i, d in enumerate(clique):
            for e in clique[i + 1 :]:
                cols.append(self.pair_column[(min(d, e), max(d, e))])
                vals.append(-1.0)
        self._rows([-math.inf], [t * (t + 1) / 2.0], [(cols, vals)])

    def solve(self, time_limit: float):
        self.highs.setOptionValue("time_limit", float(self.highs.getRunTime()) + time_limit)
        self.highs.run()
        if self.highs.getModelStatus() != self.highspy.HighsModelStatus.kOptimal:
            return None
        solution = self.highs.getSolution()
        return np.asarray(solution.col_value), np.asarray(solution.row_dual)

    def bound(self, duals: np.ndarray) -> float:
        duals = np.array(duals, float)
        lower, upper = np.array(self.row_lower), np.array(self.row_upper)
        duals[~np.isfinite(lower) & (duals < 0)] = 0.0
        duals[~np.isfinite(upper) & (duals > 0)] = 0.0
        matrix = sparse.csc_matrix(
            (np.concatenate(self.v), (np.concatenate(self.r), np.concatenate(self.c))),
            shape=(self.n_rows, len(self.cost)),
        )
        reduced = np.asarray(self.cost) - matrix.T @ duals
        row_term = np.where(duals > 0, duals * np.where(np.isfinite(upper), upper, 0), 0)
        row_term += np.where(duals < 0, duals * np.where(np.isfinite(lower), lower, 0), 0)
        lo, up = np.array(self.col_lower), np.array(self.col_upper)
        return float(row_term.sum() + np.maximum(reduced * lo, reduced * up).sum())

    def separate_classes(self, s: np.ndarray, v: np.ndarray) -> int:
        """For every class the tightest cut at s (theta where the cumulative s reaches k)."""
        sorted_s = s[self.order]  # (n_c, n)
        cumulative = np.cumsum(sorted_s, axis=1)
        j = np.minimum(
            (cumulative < self.k - 1e-9).sum(axis=1), self.n - 1
        )  # first rank reaching k
        theta = self.sorted_a[np.arange(self.n_classes), j]
        value = self.k * theta + (np.maximum(self.sorted_a - theta[:, None], 0) * sorted_s).sum(1)
        added = 0
        for c in np.flatnonzero(v > value + 1e-7).tolist():
            added += int(self.add_class_cut(c, int(j[c])))
        return added


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("seconds", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-cuts", type=int, default=300)
    args = parser.parse_args()
    problem = load_problem(args.name, args.seed)
    _, objective = incumbent(problem, args.name, args.seed)
    print(problem, f"incumbent {objective:.4f}", load_text(), flush=True)
    started = time.perf_counter()
    model = BendersRoot(problem)
    for c in range(problem.n_classes):
        model.add_class_cut(c, problem.n_per_class - 1)
    best = math.inf
    features = np.arange(problem.n_all_features)
    round_index = 0
    last_print = 0.0
    while time.perf_counter() - started < args.seconds:
        round_index += 1
        solved = model.solve(args.seconds - (time.perf_counter() - started))
        if solved is None:
            break
        values, duals = solved
        bound = model.bound(duals)
        best = min(best, bound)
        s, v = values[model.s_col], values[model.v_col]
        n_cuts = model.separate_classes(s, v)
        support = np.flatnonzero(s > 1e-6)
        over = np.triu(
            model.penalised[np.ix_(support, support)]
            & (s[support][:, None] + s[support][None, :] > 1 + 1e-6),
            1,
        )
        first, second = np.nonzero(over)
        n_pairs = model.add_pairs(
            [(int(support[i]), int(support[j])) for i, j in zip(first, second)]
        )
        pair_value = {
            p: float(values[col]) for p, col in model.pair_column.items() if col < values.size
        }
        links = [p for p, val in pair_value.items() if val > min(s[p[0]], s[p[1]]) + 1e-6]
        for p in links:
            model.add_upper_link(p)
        cliques = _separate_cliques(
            s, features, pair_value, model.penalised, max_cuts=args.max_cuts
        )
        for clique, t, _ in cliques:
            model.add_clique(clique, t)
        now = time.perf_counter() - started
        if now - last_print > 5 or not (n_cuts or n_pairs or links or cliques):
            last_print = now
            print(
                f"round {round_index:4d} {now:7.1f}s bound {bound:.4f} best {best:.4f} gap "
                f"{100 * (best - objective) / abs(objective):.2f}% rows {model.n_rows} "
                f"+{n_cuts} class cuts +{n_pairs} pairs +{len(links)} links "
                f"+{len(cliques)} cliques",
                flush=True,
            )
        if not (n_cuts or n_pairs or links or cliques):
            break
    print(
        f"RESULT benders_root {args.name} incumbent {objective:.4f} bound {best:.4f} gap "
        f"{100 * (best - objective) / abs(objective):.2f}% rounds {round_index} "
        f"time {time.perf_counter() - started:.1f}s {load_text()}"
    )


if __name__ == "__main__":
    main()
