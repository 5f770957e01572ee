"""The cut relaxation of openqpm.solver.bound on one problem, with or without dropping slack cuts.

Usage: python cut_bound.py cub 150 [--drop-after 3|0] [--max-cuts 300]
"""

from __future__ import annotations

import argparse
import time

from common import load_problem, load_text
from dw_root import incumbent

from openqpm.solver.bound import cut_relaxation_bound


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("seconds", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drop-after", type=int, default=3)
    parser.add_argument("--max-cuts", type=int, default=300)
    parser.add_argument("--min-improvement", type=float, default=2e-4)
    args = parser.parse_args()
    problem = load_problem(args.name, args.seed)
    _, objective = incumbent(problem, args.name, args.seed)
    print(problem, f"incumbent {objective:.4f}", load_text(), flush=True)
    started = time.perf_counter()
    result = cut_relaxation_bound(
        problem,
        time_limit_s=args.seconds,
        drop_slack_after=args.drop_after or None,
        max_cuts_per_round=args.max_cuts,
        min_relative_improvement=args.min_improvement,
    )
    for line in result.log[:: max(1, len(result.log) // 25)] + result.log[-1:]:
        print(line)
    print(
        f"RESULT cut_bound {args.name} drop_after={args.drop_after} incumbent {objective:.4f} "
        f"bound {result.bound:.4f} gap {100 * (result.bound - objective) / abs(objective):.2f}% "
        f"rounds {result.rounds} time {time.perf_counter() - started:.1f}s {load_text()}"
    )


if __name__ == "__main__":
    main()
