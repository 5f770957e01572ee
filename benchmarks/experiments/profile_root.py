"""Where the root phase's time goes (LP solves vs Python-side separation and bounds).

Usage: python profile_root.py cub 150   (problem, seconds): the MILP from the saved incumbent with
the whole time in its root loop, under cProfile; prints the root log and the top functions.
"""

from __future__ import annotations

import cProfile
import pstats
import sys

from common import load_problem, load_text
from dw_root import incumbent

from openqpm.solver.exact import MilpOptions, solve_milp


def main() -> None:
    name, seconds = sys.argv[1], float(sys.argv[2])
    problem = load_problem(name)
    selection, objective = incumbent(problem, name, 0)
    print(problem, f"incumbent {objective:.4f}", load_text(), flush=True)
    profiler = cProfile.Profile()
    profiler.enable()
    result = solve_milp(
        problem,
        time_limit_s=seconds,
        start=selection,
        options=MilpOptions(root_share_priced=1.0, root_share=1.0),
    )
    profiler.disable()
    print("\n".join(line for line in result.log if "root" in line))
    print(f"RESULT bound {result.bound:.4f} gap {100 * result.gap:.2f}% {load_text()}")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
