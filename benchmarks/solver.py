"""Side-by-side benchmark of the QPM solvers on realistic generated instances.

For every scale (``openqpm.instances``): the structured search, the MILP warm-started
from it (together they get the scale's budget, as ``openqpm.solve(method="auto")`` does), the
paper's own formulation on the same open solver given ``--paper-factor`` times that budget, and
on ``tiny`` an exhaustive enumeration that proves the optimum independently of any solver.

Usage::

    python benchmarks/solver.py                      # every scale, full budgets (about an hour)
    python benchmarks/solver.py --quick              # tiny and small, short budgets, no
                                                     # enumeration
    python benchmarks/solver.py --scales medium,cub --seed 1
    python benchmarks/solver.py --scales small --scip-s 3600   # + SCIP's proof (needs pyscipopt)

The machine's load is printed with the table: timings taken on a shared machine are upper bounds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from openqpm.instances import SCALES, make_instance
from openqpm.solver.exact import solve_milp
from openqpm.solver.paper import PaperFormulationTimeout, solve_paper_formulation
from openqpm.solver.problem import AssignmentProblem, validate_assignment
from openqpm.solver.search import assign_classes, solve_search

# seconds for search + MILP per scale (the targets: CUB 60 s, ImageNet 300 s), and the
# search's share of it
BUDGET_S = {"tiny": 30.0, "small": 60.0, "medium": 60.0, "cub": 60.0, "imagenet": 300.0}
QUICK_BUDGET_S = {"tiny": 10.0, "small": 20.0, "medium": 20.0, "cub": 30.0, "imagenet": 60.0}
SEARCH_SHARE = 0.25
# the SCIP backend holds every x column: only for problems this small (tiny, small)
SCIP_MAX_COLUMNS = 20_000


@dataclass
class Row:
    """One solver's result on one scale."""

    method: str
    objective: float | None
    bound: float | None
    gap: float | None
    time_s: float
    note: str = ""


def brute_force_optimum(problem: AssignmentProblem, incumbent: float) -> tuple[float, int]:
    """The optimum by enumerating every selection (feasible for ``tiny`` only).

    Every selection's relaxed value (each class its top k, duplicates allowed) is computed in
    vectorised chunks; the relaxed value is an upper bound on the exact one, so only selections
    whose relaxed value reaches ``incumbent`` are evaluated exactly (optimal distinct assignment).

    Args:
        problem: The problem.
        incumbent: Any feasible objective value (a lower bound on the optimum).

    Returns:
        ``(optimum, n_selections_evaluated_exactly)``.
    """
    n_all, n_selected, k = problem.n_all_features, problem.n_features, problem.n_per_class
    prefix_length = min(3, n_selected)
    suffix_length = n_selected - prefix_length
    scale = problem.class_scale
    tolerance = 1e-9 * max(1.0, abs(incumbent))
    combinations_of: dict[int, np.ndarray] = {}
    best = incumbent
    n_exact = 0
    pair_first, pair_second = np.triu_indices(n_selected, k=1)
    for prefix in itertools.combinations(range(n_all), prefix_length):
        rest = np.arange(prefix[-1] + 1, n_all)
        if rest.size < suffix_length:
            continue
        # optimistic: every class its top k of prefix + rest, the best biases, no penalties
        reachable = np.concatenate([np.array(prefix), rest])
        top = -np.sort(-problem.A[:, reachable], axis=1)[:, :k]  # (n_c, k)
        bias = float(problem.b[list(prefix)].sum()) + float(
            np.sort(problem.b[rest])[::-1][:suffix_length].sum()
        )
        penalty = 0.5 * float(problem.R[np.ix_(prefix, prefix)].sum())
        if scale * float(top.sum()) + bias - penalty < best - tolerance:
            continue
        if rest.size not in combinations_of:
            combinations_of[rest.size] = np.array(
                list(itertools.combinations(range(rest.size), suffix_length)), dtype=np.int64
            ).reshape(-1, suffix_length)
        suffixes = rest[combinations_of[rest.size]]  # (n_suffix, suffix_length)
        for first in range(0, suffixes.shape[0], 20_000):
            chunk = suffixes[first : first + 20_000]
            selections = np.concatenate(
                [np.broadcast_to(np.array(prefix), (chunk.shape[0], prefix_length)), chunk],
                axis=1,
            )  # (n_chunk, n_selected)
            values = problem.A[:, selections]  # (n_c, n_chunk, n_selected)
            top_k = np.partition(values, n_selected - k, axis=2)[:, :, n_selected - k :]
            relaxed = scale * top_k.sum(axis=(0, 2))  # (n_chunk,)
            relaxed -= problem.R[selections[:, pair_first], selections[:, pair_second]].sum(axis=1)
            relaxed += problem.b[selections].sum(axis=1)
            for row in np.flatnonzero(relaxed >= best - tolerance):
                _, value = assign_classes(problem, selections[row].tolist())
                n_exact += 1
                best = max(best, value)
    return best, n_exact


def _paper_child(problem_path: str, seed: int, time_limit_s: float, out_path: str) -> None:
    """Child process: the paper formulation; its result (or failure) written as JSON."""
    problem = AssignmentProblem.load(problem_path)
    try:
        result = solve_paper_formulation(problem, time_limit_s=time_limit_s, seed=seed)
        validate_assignment(problem, result)
        outcome = {"status": "ok", "objective": result.objective, "time_s": result.time_s}
    except (PaperFormulationTimeout, MemoryError) as error:
        outcome = {"status": type(error).__name__}
    with open(out_path, "w", encoding="utf-8") as file:
        json.dump(outcome, file)


def _run_paper_isolated(
    problem: AssignmentProblem, *, seed: int, time_limit_s: float, label: str
) -> Row:
    """The paper formulation in a child process, killed if it overruns its limit by a minute.

    HiGHS's MIP setup on models of CUB size (about a million binaries) neither checks the time
    limit nor calls back, so only a separate process can enforce the budget.
    """
    method = f"paper formulation ({label})"
    grace_s = 60.0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        problem_path = os.path.join(folder, "problem.npz")
        out_path = os.path.join(folder, "result.json")
        problem.save(problem_path)
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--paper-child",
            problem_path,
            out_path,
            "--seed",
            str(seed),
            "--paper-time",
            str(time_limit_s),
        ]
        try:
            subprocess.run(command, timeout=time_limit_s + grace_s, check=False)
        except subprocess.TimeoutExpired:
            elapsed = time.perf_counter() - started
            return Row(method, None, None, None, elapsed, "no solution: killed in HiGHS setup")
        elapsed = time.perf_counter() - started
        if not os.path.exists(out_path):
            return Row(method, None, None, None, elapsed, "no solution: the child crashed")
        with open(out_path, encoding="utf-8") as file:
            outcome = json.load(file)
    if outcome["status"] != "ok":
        return Row(method, None, None, None, elapsed, f"no solution: {outcome['status']}")
    return Row(method, float(outcome["objective"]), None, None, float(outcome["time_s"]))


def _format(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_scale(
    scale: str,
    *,
    seed: int,
    budget_s: float,
    paper_factor: float,
    brute_force: bool,
    paper_max_s: float | None = None,
    scip_s: float = 0.0,
) -> list[Row]:
    """Build one instance and run every method on it."""
    started = time.perf_counter()
    problem = make_instance(scale, seed=seed)
    build_s = time.perf_counter() - started
    print(
        f"\n== {scale}: n_f={problem.n_all_features} n_c={problem.n_classes} "
        f"select {problem.n_features}, {problem.n_per_class} per class, "
        f"{problem.n_penalised_pairs} penalised pairs (built in {build_s:.1f} s)",
        flush=True,
    )
    rows: list[Row] = []
    print(f"{'method':<28} {'objective':>12} {'bound':>12} {'gap %':>8} {'time s':>8}  note")

    def show(row: Row) -> None:
        rows.append(row)
        gap = None if row.gap is None else 100 * row.gap
        print(
            f"{row.method:<28} {_format(row.objective):>12} {_format(row.bound):>12} "
            f"{_format(gap, 2):>8} {row.time_s:>8.1f}  {row.note}",
            flush=True,
        )

    search_s = SEARCH_SHARE * budget_s
    found = solve_search(problem, time_limit_s=search_s, seed=seed)
    validate_assignment(problem, found)
    show(Row("search", found.objective, None, None, found.time_s))
    exact = solve_milp(problem, time_limit_s=budget_s - found.time_s, seed=seed, start=found)
    validate_assignment(problem, exact)
    show(
        Row(
            "search + MILP",
            exact.objective,
            exact.bound,
            exact.gap,
            found.time_s + exact.time_s,
            "optimal" if exact.gap is not None and exact.gap <= 1e-9 else "",
        )
    )
    paper_s = paper_factor * budget_s
    if paper_max_s is not None and paper_s > paper_max_s:
        paper_s = paper_max_s
    show(
        _run_paper_isolated(
            problem, seed=seed, time_limit_s=paper_s, label=f"{paper_s / budget_s:g}x"
        )
    )
    if scip_s > 0 and problem.n_all_features * problem.n_classes <= SCIP_MAX_COLUMNS:
        from openqpm.solver.scip import solve_scip

        proof = solve_scip(problem, time_limit_s=scip_s, seed=seed, start=found)
        validate_assignment(problem, proof)
        show(
            Row(
                "search + SCIP (lazy cuts)",
                proof.objective,
                proof.bound,
                proof.gap,
                found.time_s + proof.time_s,
                ("optimal; " if proof.gap is not None and proof.gap <= 1e-9 else "")
                + proof.log[-1],
            )
        )
    if brute_force:
        brute_started = time.perf_counter()
        optimum, n_exact = brute_force_optimum(problem, exact.objective)
        show(
            Row(
                "brute force",
                optimum,
                optimum,
                0.0,
                time.perf_counter() - brute_started,
                f"{n_exact} selections evaluated exactly",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default=None, help=f"comma-separated, from {', '.join(SCALES)}")
    parser.add_argument("--quick", action="store_true", help="short budgets; tiny and small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--paper-factor",
        type=float,
        default=10.0,
        help="the paper formulation's budget as a multiple of ours",
    )
    parser.add_argument(
        "--paper-max-s",
        type=float,
        default=None,
        help="cap on the paper formulation's budget (ImageNet at 10x is 50 minutes)",
    )
    parser.add_argument("--no-brute-force", action="store_true")
    parser.add_argument(
        "--scip-s",
        type=float,
        default=0.0,
        help="also prove tiny/small with the SCIP backend, warm-started, in this many seconds",
    )
    # internal: run the paper formulation alone (see _run_paper_isolated)
    parser.add_argument(
        "--paper-child", nargs=2, metavar=("PROBLEM", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--paper-time", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.paper_child:
        _paper_child(args.paper_child[0], args.seed, args.paper_time, args.paper_child[1])
        return 0
    default_scales = "tiny,small" if args.quick else ",".join(SCALES)
    scales = (args.scales or default_scales).split(",")
    unknown = [scale for scale in scales if scale not in SCALES]
    if unknown:
        parser.error(f"unknown scale(s) {', '.join(unknown)}; valid: {', '.join(SCALES)}")
    budgets = QUICK_BUDGET_S if args.quick else BUDGET_S
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(
        f"solver benchmark, seed {args.seed}, {os.cpu_count()} CPUs, load average "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at start"
    )
    for scale in scales:
        run_scale(
            scale,
            seed=args.seed,
            budget_s=budgets[scale],
            paper_factor=2.0 if args.quick else args.paper_factor,
            # the enumeration takes minutes even on tiny: not in a quick run
            brute_force=scale == "tiny" and not (args.no_brute_force or args.quick),
            paper_max_s=args.paper_max_s,
            scip_s=args.scip_s,
        )
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\nload average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
