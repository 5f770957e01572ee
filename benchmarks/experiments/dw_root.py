"""Route: distinctness inside the root relaxation (Dantzig-Wolfe over class sets).

The MILP's classes choose fractional x[c, d] <= s[d]; distinctness reaches its LP only through
weak z-rows. Here each class chooses among k-sets: lambda[c, T] >= 0, sum_T lambda[c, T] = 1,
sum_{T contains d} lambda[c, T] <= s[d], and every set is used at most once in total:
sum_c lambda[c, T] <= 1 (exact for integer solutions). Sets are priced in (best-first k-subset
enumeration per class with the row duals), and the bound is the Lagrangian value at the LP's duals
computed here from the duals with an exact per-class maximisation over *all* k-sets, so it is valid
at every round, whatever columns the LP holds. Penalty: y >= s_d + s_e - 1 on every penalised pair,
y <= s where violated, the MILP's clique cuts (same separation).

Outcome (demo): the column generation stalls (the restricted master sits at the incumbent's value
for many rounds, each re-solve slower than the last); best bound 528 after 150 s against 495 for
the MILP's root in 5 s. Not pursued; lagrange.py measures the same distinctness effect directly.

Usage: python dw_root.py demo 60 [--compact-s 30] [--no-distinct] [--seed S]
Prints the root bound per round beside the incumbent (from the baseline's saved assignment when
there is one, else a 10 s search).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from common import CACHE, load_problem, load_text

from openqpm.solver.exact import _separate_cliques, new_highs
from openqpm.solver.problem import Assignment, AssignmentProblem
from openqpm.solver.search import _SubsetEnumerator, assign_classes, solve_search


class DWModel:
    """The set-based root LP on HiGHS with its own copy of the matrix for exact bounds."""

    def __init__(self, problem: AssignmentProblem, *, use_distinct: bool = True) -> None:
        import highspy

        self.highspy = highspy
        self.problem = problem
        self.n_classes, self.n = problem.n_classes, problem.n_all_features
        self.k, self.scale = problem.n_per_class, problem.class_scale
        self.use_distinct = use_distinct
        self.highs = new_highs(threads=1, seed=0)
        self.highs.changeObjectiveSense(highspy.ObjSense.kMaximize)
        self.inf = float(highspy.kHighsInf)
        self.cost: list[float] = []
        self.col_lower: list[float] = []
        self.col_upper: list[float] = []
        self.row_lower: list[float] = []
        self.row_upper: list[float] = []
        self.trip_r: list[int] = []
        self.trip_c: list[int] = []
        self.trip_v: list[float] = []
        self.n_rows = 0
        # rows: cardinality, class convexity, links (c, d)
        self._add_rows([problem.n_features], [problem.n_features], [([], [])])
        self.class_row = self._add_rows(
            [1.0] * self.n_classes, [1.0] * self.n_classes, [([], [])] * self.n_classes
        )
        n_links = self.n_classes * self.n
        self.link_first = self._add_rows(
            [-math.inf] * n_links, [0.0] * n_links, [([], [])] * n_links
        )
        # s_d: 1 in the cardinality row, -1 in every link row (c, d)
        self.s_col = self._add_cols(
            problem.b.tolist(),
            [0.0] * self.n,
            [1.0] * self.n,
            [
                (
                    [0] + [self.link_first + c * self.n + d for c in range(self.n_classes)],
                    [1.0] + [-1.0] * self.n_classes,
                )
                for d in range(self.n)
            ],
        )
        first, second, weight = problem.penalised_pairs()
        self.pairs = list(zip(first.tolist(), second.tolist()))
        self.y_col = self._add_cols(
            (-weight).tolist(), [0.0] * len(weight), [1.0] * len(weight), [([], [])] * len(weight)
        )
        self.pair_column = {p: int(col) for p, col in zip(self.pairs, self.y_col)}
        self._add_rows(
            [-1.0] * len(weight),
            [math.inf] * len(weight),
            [
                ([int(y), int(self.s_col[d]), int(self.s_col[e])], [1.0, -1.0, -1.0])
                for (d, e), y in zip(self.pairs, self.y_col)
            ],
        )
        self.lambda_cols: dict[tuple[int, tuple[int, ...]], int] = {}
        self.columns_of_set: dict[tuple[int, ...], list[int]] = {}
        self.distinct_row: dict[tuple[int, ...], int] = {}
        self.is_lambda: list[bool] = [False] * len(self.cost)
        self.upper_links: set[tuple[int, int]] = set()
        self.penalised = problem.R > 0

    # -- growth ---------------------------------------------------------------------------
    def _add_entries(self, rows, cols, vals) -> None:
        self.trip_r += list(rows)
        self.trip_c += list(cols)
        self.trip_v += list(vals)

    def _add_cols(self, costs, lower, upper, entries) -> np.ndarray:
        first = len(self.cost)
        starts, idx, vals = [], [], []
        for rows, values in entries:
            starts.append(len(idx))
            idx += list(rows)
            vals += list(values)
        count = len(costs)
        self.highs.addCols(
            count,
            np.array(costs, float),
            np.array(lower, float),
            np.where(np.isinf(upper), self.inf, upper).astype(float),
            len(idx),
            np.array(starts, np.int32),
            np.array(idx, np.int32),
            np.array(vals, float),
        )
        columns = np.arange(first, first + count)
        for column, (rows, values) in zip(columns, entries):
            self._add_entries(rows, [int(column)] * len(rows), values)
        self.cost += list(costs)
        self.col_lower += list(lower)
        self.col_upper += list(upper)
        if hasattr(self, "is_lambda"):
            self.is_lambda += [False] * count
        return columns

    def _add_rows(self, lower, upper, entries) -> int:
        first = self.n_rows
        starts, idx, vals = [], [], []
        for cols, values in entries:
            starts.append(len(idx))
            idx += list(cols)
            vals += list(values)
        count = len(lower)
        lo = np.where(np.isinf(lower), -self.inf, lower).astype(float)
        up = np.where(np.isinf(upper), self.inf, upper).astype(float)
        self.highs.addRows(
            count,
            lo,
            up,
            len(idx),
            np.array(starts, np.int32),
            np.array(idx, np.int32),
            np.array(vals, float),
        )
        for i, (cols, values) in enumerate(entries):
            self._add_entries([first + i] * len(cols), cols, values)
        self.row_lower += list(lower)
        self.row_upper += list(upper)
        self.n_rows += count
        return first

    def add_set(self, c: int, subset: tuple[int, ...]) -> bool:
        key = (c, subset)
        if key in self.lambda_cols:
            return False
        rows = [self.class_row + c] + [self.link_first + c * self.n + d for d in subset]
        if subset in self.distinct_row:
            rows.append(self.distinct_row[subset])
        cost = self.scale * float(self.problem.A[c, list(subset)].sum())
        column = int(self._add_cols([cost], [0.0], [math.inf], [(rows, [1.0] * len(rows))])[0])
        self.is_lambda[column] = True
        self.lambda_cols[key] = column
        self.columns_of_set.setdefault(subset, []).append(column)
        return True

    def add_distinct(self, subset: tuple[int, ...]) -> None:
        if subset in self.distinct_row:
            return
        cols = self.columns_of_set.get(subset, [])
        self.distinct_row[subset] = self._add_rows([-math.inf], [1.0], [(cols, [1.0] * len(cols))])

    def add_clique(self, clique, t) -> None:
        cols = [int(self.s_col[d]) for d in clique]
        vals = [float(t)] * len(cols)
        for i, d in enumerate(clique):
            for e in clique[i + 1 :]:
                cols.append(self.pair_column[(min(d, e), max(d, e))])
                vals.append(-1.0)
        self._add_rows([-math.inf], [t * (t + 1) / 2.0], [(cols, vals)])

    def add_upper_link(self, pair) -> None:
        if pair in self.upper_links:
            return
        self.upper_links.add(pair)
        y = self.pair_column[pair]
        self._add_rows(
            [-math.inf, -math.inf],
            [0.0, 0.0],
            [
                ([y, int(self.s_col[pair[0]])], [1.0, -1.0]),
                ([y, int(self.s_col[pair[1]])], [1.0, -1.0]),
            ],
        )

    # -- solving and bounding ---------------------------------------------------------------
    def solve(self, time_limit: float):
        self.highs.setOptionValue("time_limit", float(self.highs.getRunTime()) + time_limit)
        self.highs.run()
        if self.highs.getModelStatus() != self.highspy.HighsModelStatus.kOptimal:
            return None
        solution = self.highs.getSolution()
        return (
            np.asarray(solution.col_value),
            np.asarray(solution.row_dual),
            float(self.highs.getInfo().objective_function_value),
        )

    def corrected_duals(self, duals: np.ndarray) -> np.ndarray:
        duals = np.array(duals, dtype=float)
        lower, upper = np.array(self.row_lower), np.array(self.row_upper)
        duals[~np.isfinite(lower) & (duals < 0)] = 0.0
        duals[~np.isfinite(upper) & (duals > 0)] = 0.0
        return duals

    def price_class(self, c: int, duals: np.ndarray, *, want: int = 3):
        """max_T (scale A_c(T) - u_c(T) - mu_T) over every k-set, and up to ``want`` best sets."""
        u = duals[self.link_first + c * self.n : self.link_first + (c + 1) * self.n]
        values = self.scale * self.problem.A[c] - u
        enumerator = _SubsetEnumerator(values, np.arange(self.n), self.k)
        best = -math.inf
        found: list[tuple[float, tuple[int, ...]]] = []
        count = 0
        while True:
            count += 1
            enumerator.extend_to(count)
            if len(enumerator.subsets) < count:
                break
            value = enumerator.values[-1]
            if value <= best + 1e-12 and len(found) >= want:
                break
            if value <= best + 1e-12 and count > 50 * want:
                break
            subset = enumerator.subsets[-1]
            row = self.distinct_row.get(subset)
            adjusted = value - (duals[row] if row is not None else 0.0)
            found.append((adjusted, subset))
            best = max(best, adjusted)
        # exact: every set not enumerated is worth at most the last enumerated raw value <= best
        found.sort(key=lambda item: -item[0])
        return best, found[:want]

    def lagrangian(self, duals: np.ndarray, *, want: int = 3):
        duals = self.corrected_duals(duals)
        n_columns = len(self.cost)
        matrix = np.zeros(n_columns)
        from scipy import sparse

        a = sparse.csc_matrix(
            (self.trip_v, (self.trip_r, self.trip_c)), shape=(self.n_rows, n_columns)
        )
        reduced = np.asarray(self.cost) - a.T @ duals
        lower, upper = np.array(self.row_lower), np.array(self.row_upper)
        keep = np.ones(self.n_rows, bool)
        keep[self.class_row : self.class_row + self.n_classes] = False  # kept in the subproblem
        row_term = np.where(duals > 0, duals * np.where(np.isfinite(upper), upper, 0), 0)
        row_term += np.where(duals < 0, duals * np.where(np.isfinite(lower), lower, 0), 0)
        bound = float(row_term[keep].sum())
        plain = ~np.array(self.is_lambda)
        col_lower, col_upper = np.array(self.col_lower), np.array(self.col_upper)
        bound += float(
            np.maximum(reduced[plain] * col_lower[plain], reduced[plain] * col_upper[plain]).sum()
        )
        new_columns = []
        for c in range(self.n_classes):
            best, found = self.price_class(c, duals, want=want)
            bound += best
            theta = duals[self.class_row + c]
            new_columns += [(c, s) for value, s in found if value - theta > 1e-7]
        del matrix
        return bound, new_columns


def incumbent(problem: AssignmentProblem, name: str, seed: int) -> tuple[list[int], float]:
    saved = sorted(CACHE.glob(f"auto_{name}_{seed}_*_today.json"))
    if saved:
        found = Assignment.load(saved[-1])
        return sorted(found.selected_features), found.objective
    found = solve_search(problem, time_limit_s=10, seed=seed)
    return sorted(found.selected_features), found.objective


def compact_root(problem: AssignmentProblem, seconds: float, objective: float):
    """The MILP's own root loop (full model, clique cuts, y <= s links) for ``seconds``.

    Returns the best bound, the cliques and links it added, and the class-feature duals
    u[c, d] of the rows x[c, d] <= s[d] at the last LP (from the x columns' reduced costs).
    """
    from openqpm.solver.exact import _Relaxation

    started = time.perf_counter()
    model = _Relaxation(
        problem, depth=np.full(problem.n_classes, problem.n_all_features), seed=0, threads=1
    )
    model.add_features(range(problem.n_all_features))
    cliques, links, best, duals = [], [], math.inf, None
    features = np.arange(problem.n_all_features)
    while time.perf_counter() - started < seconds:
        result = model.solve_lp(seconds - (time.perf_counter() - started))
        if result is None:
            break
        best = min(best, result.bound)
        duals = result.row_duals
        s_values = result.columns[model.feature_column[features]]
        pair_value = {p: float(result.columns[col]) for p, col in model.pair_column.items()}
        new_links = [
            p for p, v in pair_value.items() if v > min(s_values[p[0]], s_values[p[1]]) + 1e-6
        ]
        cuts = _separate_cliques(s_values, features, pair_value, model.penalised, max_cuts=300)
        model.add_pair_upper_links(new_links)
        for clique, t, _ in cuts:
            model.add_clique_cut(clique, t)
        cliques += [(clique, t) for clique, t, _ in cuts]
        links += new_links
        print(
            f"compact {time.perf_counter() - started:6.1f}s bound {result.bound:.4f} gap "
            f"{100 * (best - objective) / abs(objective):.2f}% +{len(cuts)} cliques",
            flush=True,
        )
        if not (cuts or new_links):
            break
    reduced = model.reduced_costs(duals)
    theta = model._padded_duals(duals)[1 : 1 + problem.n_classes]
    u = np.zeros((problem.n_classes, problem.n_all_features))
    for (c, d), column in model.x_column.items():
        u[c, d] = problem.class_scale * problem.A[c, d] - theta[c] - reduced[column]
    return best, cliques, links, np.maximum(u, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("seconds", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compact-s", type=float, default=0.0)
    parser.add_argument("--seed-sets", type=int, default=30)
    parser.add_argument("--want", type=int, default=5)
    parser.add_argument("--no-distinct", action="store_true")
    args = parser.parse_args()
    problem = load_problem(args.name, args.seed)
    selection, objective = incumbent(problem, args.name, args.seed)
    print(problem, f"incumbent {objective:.4f}", load_text(), flush=True)
    started = time.perf_counter()
    model = DWModel(problem, use_distinct=not args.no_distinct)
    class_features, _ = assign_classes(problem, selection)
    for c in range(problem.n_classes):
        model.add_set(c, tuple(sorted(class_features[c])))
        top = tuple(sorted(np.argsort(-problem.A[c])[: problem.n_per_class].tolist()))
        model.add_set(c, top)
    if args.compact_s > 0:
        compact_bound, cliques, links, u = compact_root(problem, args.compact_s, objective)
        print(
            f"compact root: bound {compact_bound:.4f} gap "
            f"{100 * (compact_bound - objective) / abs(objective):.2f}% "
            f"{time.perf_counter() - started:.1f}s",
            flush=True,
        )
        for clique, t in cliques:
            model.add_clique(clique, t)
        for p in links:
            model.add_upper_link(p)
        for c in range(problem.n_classes):
            values = problem.class_scale * problem.A[c] - u[c]
            enumerator = _SubsetEnumerator(
                values, np.arange(problem.n_all_features), problem.n_per_class
            )
            enumerator.extend_to(args.seed_sets)
            for subset in enumerator.subsets:
                model.add_set(c, subset)
        print(f"seeded {len(model.lambda_cols)} sets", flush=True)
    best_bound = math.inf
    for round_index in range(1, 10_000):
        left = args.seconds - (time.perf_counter() - started)
        if left <= 0:
            break
        solved = model.solve(left)
        if solved is None:
            break
        values, duals, lp_value = solved
        bound, new_columns = model.lagrangian(duals, want=args.want)
        best_bound = min(best_bound, bound)
        n_distinct = 0
        if model.use_distinct:
            for subset, columns in list(model.columns_of_set.items()):
                if subset not in model.distinct_row and values[columns].sum() > 1 + 1e-6:
                    model.add_distinct(subset)
                    n_distinct += 1
        for c, subset in new_columns:
            model.add_set(c, subset)
        s_values = values[model.s_col]
        pair_value = {p: float(values[col]) for p, col in model.pair_column.items()}
        links = [p for p, v in pair_value.items() if v > min(s_values[p[0]], s_values[p[1]]) + 1e-6]
        for p in links:
            model.add_upper_link(p)
        cuts = []
        if not new_columns:
            cuts = _separate_cliques(
                s_values,
                np.arange(problem.n_all_features),
                pair_value,
                model.penalised,
                max_cuts=300,
            )
            for clique, t, _ in cuts:
                model.add_clique(clique, t)
        print(
            f"round {round_index:3d} {time.perf_counter() - started:7.1f}s LP {lp_value:.4f} "
            f"bound {bound:.4f} best {best_bound:.4f} gap "
            f"{100 * (best_bound - objective) / abs(objective):.2f}% +{len(new_columns)} sets "
            f"+{n_distinct} distinct +{len(cuts)} cliques +{len(links)} links",
            flush=True,
        )
        if not (new_columns or n_distinct or cuts or links):
            break
    print(
        f"RESULT dw_root {args.name} distinct={not args.no_distinct} incumbent {objective:.4f} "
        f"bound {best_bound:.4f} gap {100 * (best_bound - objective) / abs(objective):.2f}% "
        f"time {time.perf_counter() - started:.1f}s {load_text()}"
    )


if __name__ == "__main__":
    main()
