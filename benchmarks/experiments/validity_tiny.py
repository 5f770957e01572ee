"""Validity of the cut bound on generated problems with a proven optimum (tiny scale).

For seeds of the "tiny" scale (40 features, 12 classes): the optimum proven by today's full-model
MILP, and the cut relaxation's bound, which must not be below it.

Usage: python validity_tiny.py 0,1,2,3
"""

from __future__ import annotations

import sys

from common import load_problem, load_text

from openqpm.solver.bound import cut_relaxation_bound
from openqpm.solver.exact import solve_milp


def main() -> None:
    for seed in [int(s) for s in sys.argv[1].split(",")]:
        problem = load_problem("tiny", seed)
        exact = solve_milp(problem, time_limit_s=60, seed=seed)
        cut = cut_relaxation_bound(problem, time_limit_s=30)
        proven = exact.gap is not None and exact.gap < 1e-6
        print(
            f"RESULT tiny seed {seed}: optimum {exact.objective:.6f} (proven {proven}) "
            f"cut bound {cut.bound:.6f} valid {cut.bound >= exact.objective - 1e-7} "
            f"{load_text()}",
            flush=True,
        )


if __name__ == "__main__":
    main()
