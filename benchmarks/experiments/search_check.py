"""Is the gap the incumbent's? The structured search for longer and with other seeds.

Usage: python search_check.py demo 60 0,1,2
"""

from __future__ import annotations

import sys

from common import load_problem, load_text

from openqpm.solver.search import solve_search


def main() -> None:
    name, seconds = sys.argv[1], float(sys.argv[2])
    seeds = [int(s) for s in sys.argv[3].split(",")]
    problem = load_problem(name)
    for seed in seeds:
        found = solve_search(problem, time_limit_s=seconds, seed=seed)
        print(
            f"RESULT search {name} seed {seed} {seconds:.0f}s objective {found.objective:.4f} "
            f"{load_text()}",
            flush=True,
        )


if __name__ == "__main__":
    main()
