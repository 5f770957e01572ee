"""Why root rounds grow from 1 s to 20+ s at CUB scale: simplex iterations, rows, and variants.

Usage: python lp_speed.py cub 120 [variant]   variants: today, no_toggle (do not switch
solve_relaxation on and off around each LP: the root model has no integers), primal (primal
simplex for the re-solves; untried in the report).
Measured (today): about 3 000 dual simplex iterations per re-solve throughout, while the time per
iteration grows with the rows (7.5k -> 30k in 12 rounds, mostly x <= s rows of priced features).
Prints per round: seconds, simplex iterations, rows, columns, bound.
"""

from __future__ import annotations

import sys
import time

from common import load_problem, load_text
from dw_root import incumbent

from openqpm.solver import exact


def main() -> None:
    name, seconds = sys.argv[1], float(sys.argv[2])
    variant = sys.argv[3] if len(sys.argv) > 3 else "today"
    problem = load_problem(name)
    selection, objective = incumbent(problem, name, 0)
    print(problem, f"incumbent {objective:.4f} variant {variant}", load_text(), flush=True)
    original = exact._Relaxation.solve_lp

    def solve_lp(self, time_limit_s):
        highs = self.highs
        if variant == "primal":
            highs.setOptionValue("simplex_strategy", 4)
        before = highs.getInfo().simplex_iteration_count if highs.getNumRow() else 0
        started = time.perf_counter()
        if variant == "no_toggle":
            self.highs.setOptionValue("solve_relaxation", False)
        result = original(self, time_limit_s)
        info = highs.getInfo()
        print(
            f"  LP {time.perf_counter() - started:6.2f}s iterations "
            f"{info.simplex_iteration_count} rows {highs.getNumRow()} cols {highs.getNumCol()} "
            f"bound {result.bound if result else None}",
            flush=True,
        )
        del before
        return result

    exact._Relaxation.solve_lp = solve_lp
    if variant == "no_toggle":
        original_set = exact._Relaxation.__init__

        def init(self, *args, **kwargs):
            original_set(self, *args, **kwargs)
            real = self.highs.setOptionValue

            def guarded(option, value):
                if option == "solve_relaxation":
                    return None
                return real(option, value)

            self.highs.setOptionValue = guarded

        exact._Relaxation.__init__ = init
    result = exact.solve_milp(
        problem,
        time_limit_s=seconds,
        start=selection,
        options=exact.MilpOptions(root_share_priced=1.0, root_share=1.0),
    )
    print(
        f"RESULT {variant} bound {result.bound:.4f} gap {100 * result.gap:.2f}% "
        f"rounds {sum('root round' in line for line in result.log)} {load_text()}"
    )


if __name__ == "__main__":
    main()
