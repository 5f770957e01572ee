"""Route: problem reduction by probing the root LP (fix a feature in or out, re-solve, compare).

After the MILP's own root loop (full model, clique cuts), for every feature d the LP is re-solved
with s[d] = 1 and with s[d] = 0 (dual simplex, warm); the Lagrangian bound of each re-solve is
valid for that half of the problem, so

* bound(s[d] = 1) < incumbent: no solution with d beats the incumbent -> d fixed out;
* bound(s[d] = 0) < incumbent: every better solution holds d -> d fixed in;
* the root bound itself tightens to max over d of ... no: to min(bound, max(bound1, bound0)).

Today's reduced-cost fixing (bound + min(rc, 0) < incumbent) is printed beside it. Then the
reduced problem goes to HiGHS's branch and bound (the MILP's own, via solve_milp on the same
problem with the fixed features' columns fixed) for --bb-s seconds.

Usage: python probing.py demo --compact-s 25 [--bb-s 60]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from common import load_problem, load_text
from dw_root import incumbent

from openqpm.solver.exact import _Relaxation, _separate_cliques


def root_model(problem, seconds: float):
    started = time.perf_counter()
    model = _Relaxation(
        problem, depth=np.full(problem.n_classes, problem.n_all_features), seed=0, threads=1
    )
    model.add_features(range(problem.n_all_features))
    features = np.arange(problem.n_all_features)
    best, last = math.inf, None
    while time.perf_counter() - started < seconds:
        result = model.solve_lp(seconds)
        if result is None:
            break
        best, last = min(best, result.bound), result
        s_values = result.columns[model.feature_column[features]]
        pair_value = {p: float(result.columns[col]) for p, col in model.pair_column.items()}
        links = [p for p, v in pair_value.items() if v > min(s_values[p[0]], s_values[p[1]]) + 1e-6]
        cuts = _separate_cliques(s_values, features, pair_value, model.penalised, max_cuts=300)
        model.add_pair_upper_links(links)
        for clique, t, _ in cuts:
            model.add_clique_cut(clique, t)
        if not (cuts or links):
            break
    final = model.solve_lp(600)
    if final is not None:
        best, last = min(best, final.bound), final
    return model, best, last


def probe(model: _Relaxation, d: int, value: float) -> float:
    column = int(model.feature_column[d])
    model.col_lower[column] = model.col_upper[column] = value
    model.highs.changeColBounds(column, value, value)
    result = model.solve_lp(60)
    model.col_lower[column], model.col_upper[column] = 0.0, 1.0
    model.highs.changeColBounds(column, 0.0, 1.0)
    return math.inf if result is None else result.bound


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compact-s", type=float, default=25.0)
    args = parser.parse_args()
    problem = load_problem(args.name, args.seed)
    _selection, objective = incumbent(problem, args.name, args.seed)
    print(problem, f"incumbent {objective:.4f}", load_text(), flush=True)
    started = time.perf_counter()
    model, bound, last = root_model(problem, args.compact_s)
    root_s = time.perf_counter() - started
    print(
        f"root bound {bound:.4f} gap {100 * (bound - objective) / abs(objective):.3f}% "
        f"in {root_s:.1f}s",
        flush=True,
    )
    reduced = model.reduced_costs(last.row_duals)
    rc = reduced[model.feature_column[np.arange(problem.n_all_features)]]
    rc_out = np.flatnonzero(last.bound + np.minimum(rc, 0.0) < objective)
    rc_in = np.flatnonzero(last.bound - np.maximum(rc, 0.0) < objective)
    print(f"today's reduced-cost fixing: {rc_out.size} out, {rc_in.size} in (rc of s[d])")
    out, into, bound_one, bound_zero = [], [], {}, {}
    probe_started = time.perf_counter()
    for d in range(problem.n_all_features):
        bound_one[d] = probe(model, d, 1.0)
        if bound_one[d] < objective:
            out.append(d)
        bound_zero[d] = probe(model, d, 0.0)
        if bound_zero[d] < objective:
            into.append(d)
    probe_s = time.perf_counter() - probe_started
    # every solution has d or not: the bound is at most max of the two halves, for every d
    probed = min(max(bound_one[d], bound_zero[d]) for d in range(problem.n_all_features))
    ones = np.array([bound_one[d] for d in range(problem.n_all_features)])
    print(
        f"probing ({probe_s:.1f}s, {2 * problem.n_all_features} LPs): {len(out)} fixed out, "
        f"{len(into)} fixed in; probed bound {min(bound, probed):.4f} gap "
        f"{100 * (min(bound, probed) - objective) / abs(objective):.3f}%; "
        f"bound(s=1) quantiles 10/50/90% "
        f"{np.percentile(ones, 10):.2f}/{np.percentile(ones, 50):.2f}/"
        f"{np.percentile(ones, 90):.2f}",
        flush=True,
    )
    print(
        f"RESULT probing {args.name} incumbent {objective:.4f} root {bound:.4f} "
        f"rc-fixing {rc_out.size} out/{rc_in.size} in, probing {len(out)} out/{len(into)} in, "
        f"probed bound {min(bound, probed):.4f} time {time.perf_counter() - started:.1f}s "
        f"{load_text()}"
    )
    np.save(f"/tmp/openqpm_experiments/probe_out_{args.name}.npy", np.array(out, dtype=np.int64))
    np.save(f"/tmp/openqpm_experiments/probe_in_{args.name}.npy", np.array(into, dtype=np.int64))


if __name__ == "__main__":
    main()
