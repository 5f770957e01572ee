"""Today's method: solve(method="auto") on one problem, with the gap split into its parts.

Usage: python benchmarks/experiments/baseline.py demo 20   (problem, seconds[, seed][, --no-cut])
``--no-cut`` runs the MILP as it was before the cut relaxation (MilpOptions(cut_bound=False)).
Saves the assignment under the cache folder so that later experiments start from the same
incumbent.
"""

from __future__ import annotations

import sys
import time

from common import CACHE, distinct_free_value, load_problem, load_text

from openqpm.solver import exact, solve


def main() -> None:
    flags = [arg for arg in sys.argv[1:] if arg.startswith("--")]
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    name, budget = args[0], float(args[1])
    seed = int(args[2]) if len(args) > 2 else 0
    variant = "today" if "--no-cut" in flags else "cut"
    if variant == "today":
        original = exact.MilpOptions

        def without_cut(**kwargs):
            return original(**{"cut_bound": False, **kwargs})

        exact.MilpOptions = without_cut
    problem = load_problem(name, seed)
    print(problem, load_text(), flush=True)
    started = time.perf_counter()
    result = solve(problem, method="auto", time_limit_s=budget, seed=seed)
    elapsed = time.perf_counter() - started
    result.save(CACHE / f"auto_{name}_{seed}_{int(budget)}_{variant}.json")
    free = distinct_free_value(problem, result.selected_features)
    print("\n".join(line for line in result.log if "root round" not in line or "round 1:" in line))
    root = [line for line in result.log if "root round" in line]
    print(root[-1] if root else "no root round")
    print(
        f"RESULT {variant} {name} seed {seed} budget {budget:.0f}s: incumbent {result.objective:.4f} "
        f"bound {result.bound:.4f} gap {100 * result.gap:.2f}% time {elapsed:.1f}s; "
        f"incumbent selection without distinctness {free:.4f} "
        f"(distinctness costs {100 * (free - result.objective) / result.objective:.2f}%); "
        f"{load_text()}"
    )


if __name__ == "__main__":
    main()
