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

``--gap-table`` (issue 17) instead runs two methods side by side on each row's problem, each with
the row's full budget: ``today`` (the search, then the MILP warm-started from it without the cut
bound, as the solver was when the issue was filed) and ``auto`` (the shipped
``openqpm.solve(method="auto")``), and reports when each first certified a gap at or below each
of :data:`GAP_THRESHOLDS`::

    python benchmarks/solver.py --gap-table --rows small:10,small-strong:10
    python benchmarks/solver.py --gap-table --demo-problem runs/demo/problem.npz \
        --cache-dir /tmp/qpm-problems --json-out gap_table.json     # the issue's table
    python benchmarks/solver.py --gap-table --rows cub-strong:600 --methods auto

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from openqpm.instances import SCALES, instance_penalties, make_instance
from openqpm.solver import solve
from openqpm.solver.exact import MilpOptions, solve_milp
from openqpm.solver.paper import PaperFormulationTimeout, solve_paper_formulation
from openqpm.solver.problem import (
    Assignment,
    AssignmentProblem,
    SolverProgress,
    validate_assignment,
)
from openqpm.solver.search import assign_classes, solve_search

# seconds for search + MILP per scale (the targets: CUB 60 s, ImageNet 300 s), and the
# search's share of it
BUDGET_S = {"tiny": 30.0, "small": 60.0, "medium": 60.0, "cub": 60.0, "imagenet": 300.0}
QUICK_BUDGET_S = {"tiny": 10.0, "small": 20.0, "medium": 20.0, "cub": 30.0, "imagenet": 60.0}
SEARCH_SHARE = 0.25
# the SCIP backend holds every x column: only for problems this small (tiny, small)
SCIP_MAX_COLUMNS = 20_000

# --gap-table: the certified relative gaps whose first attainment is timed, the methods compared,
# the rows (scale[-strong]:budget seconds), and today's search share and cap
GAP_THRESHOLDS = (0.20, 0.10, 0.05, 0.037, 0.03, 0.01, 0.005)
GAP_METHODS = ("today", "auto")
DEFAULT_GAP_ROWS = "cub:600,cub:3600,imagenet:600,demo:20"
TODAY_SEARCH_SHARE = 0.25
TODAY_SEARCH_MAX_S = 120.0


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


# ----------------------------------------------------------------------------------------------
# --gap-table (issue 17): today's solver against the shipped "auto", time to each certified gap

# one progress sample: (seconds since the method started, objective, bound), None when unknown
Sample = tuple[float, float | None, float | None]


def certified_gap(objective: float, bound: float) -> float:
    """Relative gap ``(bound - objective) / |objective|`` (|objective| floored at 1e-9)."""
    return (bound - objective) / max(abs(objective), 1e-9)


def time_to_gaps(
    samples: Sequence[Sample], thresholds: Sequence[float] = GAP_THRESHOLDS
) -> list[float | None]:
    """The first time the certified gap was at or below each threshold (None: never).

    The gap at a sample is that of the best (highest) objective and the best (lowest) bound seen
    up to and including it; it needs both.

    Args:
        samples: ``(time_s, objective, bound)`` in time order.
        thresholds: Relative gaps (0.01 = 1 %).

    Returns:
        One time (or None) per threshold, in the order given.

    Example:
        >>> samples = [(1.0, 90.0, None), (2.0, None, 105.0), (3.0, 100.0, 102.0)]
        >>> time_to_gaps(samples, (0.2, 0.05, 0.01))
        [2.0, 3.0, None]
    """
    reached: list[float | None] = [None] * len(thresholds)
    best, lowest = -float("inf"), float("inf")
    for time_s, objective, bound in samples:
        if objective is not None:
            best = max(best, objective)
        if bound is not None:
            lowest = min(lowest, bound)
        if best == -float("inf") or lowest == float("inf"):
            continue
        gap = certified_gap(best, lowest)
        for index, threshold in enumerate(thresholds):
            if reached[index] is None and gap <= threshold:
                reached[index] = time_s
    return reached


@dataclass
class Recorder:
    """A ``progress`` callback that records the reports on its own clock (from its creation)."""

    started: float = field(default_factory=time.perf_counter)
    samples: list[Sample] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def elapsed(self) -> float:
        """Seconds since the recorder was created."""
        return time.perf_counter() - self.started

    def __call__(self, report: SolverProgress) -> None:
        objective = None if report.objective is None else float(report.objective)
        bound = None if report.bound is None else float(report.bound)
        if self.samples and self.samples[-1][1:] == (objective, bound):
            return  # nothing new: the time to a gap only moves when one of them does
        self.samples.append((self.elapsed(), objective, bound))
        self.messages.append(report.message)


@dataclass
class MethodRun:
    """One method's result on one row, with its trajectory and times to each gap."""

    method: str
    objective: float
    bound: float | None
    gap: float | None
    time_s: float
    samples: list[Sample]
    messages: list[str]
    time_to_gap: list[float | None]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (thresholds as keys of ``time_to_gap``)."""
        return {
            "method": self.method,
            "objective": self.objective,
            "bound": self.bound,
            "gap": self.gap,
            "time_s": self.time_s,
            "time_to_gap": {
                f"{threshold:g}": t
                for threshold, t in zip(GAP_THRESHOLDS, self.time_to_gap, strict=True)
            },
            "trajectory": [
                [t, objective, bound, message]
                for (t, objective, bound), message in zip(self.samples, self.messages, strict=True)
            ],
        }


def _finish(
    method: str, problem: AssignmentProblem, result: Assignment, recorder: Recorder
) -> MethodRun:
    """Validate ``result`` and summarise it with the recorded trajectory."""
    time_s = recorder.elapsed()
    validate_assignment(problem, result)
    # the final answer is known when the method returns, whether or not it was reported
    samples = [*recorder.samples, (time_s, float(result.objective), result.bound)]
    bounds = [bound for _, _, bound in samples if bound is not None]
    bound = min(bounds) if bounds else None
    objective = float(result.objective)
    return MethodRun(
        method,
        objective,
        bound,
        None if bound is None else certified_gap(objective, bound),
        time_s,
        samples,
        [*recorder.messages, "result"],
        time_to_gaps(samples),
    )


def run_today(problem: AssignmentProblem, *, budget_s: float, seed: int) -> MethodRun:
    """The solver as issue 17 was filed: search, then the warm-started MILP without cut bound."""
    recorder = Recorder()
    search_s = min(TODAY_SEARCH_SHARE * budget_s, TODAY_SEARCH_MAX_S)
    found = solve_search(problem, time_limit_s=search_s, seed=seed, progress=recorder)
    validate_assignment(problem, found)
    result = solve_milp(
        problem,
        time_limit_s=max(budget_s - recorder.elapsed(), 1.0),
        seed=seed,
        start=found,
        progress=recorder,
        options=MilpOptions(cut_bound=False),
    )
    return _finish("today", problem, result, recorder)


def run_auto(problem: AssignmentProblem, *, budget_s: float, seed: int) -> MethodRun:
    """The shipped default, ``openqpm.solve(method="auto")``."""
    recorder = Recorder()
    result = solve(problem, method="auto", time_limit_s=budget_s, seed=seed, progress=recorder)
    return _finish("auto", problem, result, recorder)


@dataclass(frozen=True)
class GapRow:
    """One requested row: a scale (or ``demo``), its penalty family and the budget."""

    scale: str
    penalty: str
    budget_s: float


def parse_gap_rows(text: str) -> list[GapRow]:
    """Rows from ``scale[-strong]:seconds,...``; ``demo`` is the problem file of --demo-problem.

    Args:
        text: Comma-separated rows, e.g. ``cub:600,cub-strong:600,demo:20``.

    Returns:
        The rows in the order given; a scale without ``-penalty`` has the default penalty.

    Raises:
        ValueError: On a malformed row, an unknown scale or penalty, or a non-positive budget.
    """
    rows = []
    for item in text.split(","):
        name, colon, budget = item.strip().partition(":")
        scale, dash, penalty = name.partition("-")
        penalty = penalty if dash else "default"
        try:
            budget_s = float(budget) if colon else float("nan")
        except ValueError:
            budget_s = float("nan")
        if not 0 < budget_s < float("inf"):
            raise ValueError(f"row {item!r}: expected scale[-penalty]:seconds, seconds > 0")
        if scale not in (*SCALES, "demo"):
            raise ValueError(f"row {item!r}: unknown scale; valid: {', '.join(SCALES)}, demo")
        if penalty not in instance_penalties() or (scale == "demo" and dash):
            raise ValueError(
                f"row {item!r}: unknown penalty {penalty!r}; valid: "
                f"{', '.join(instance_penalties())} (none for demo)"
            )
        rows.append(GapRow(scale, penalty, budget_s))
    return rows


def load_gap_problem(
    row: GapRow, *, seed: int, demo_problem: str | None, cache_dir: str | None
) -> AssignmentProblem:
    """The row's problem: the demo file, the cached instance, or a freshly generated one."""
    if row.scale == "demo":
        if demo_problem is None:
            raise ValueError("the demo row needs --demo-problem")
        return AssignmentProblem.load(demo_problem)
    cached = None
    if cache_dir is not None:
        cached = os.path.join(cache_dir, f"{row.scale}_{row.penalty}_{seed}.npz")
        if os.path.exists(cached):
            return AssignmentProblem.load(cached)
    problem = make_instance(row.scale, seed=seed, penalty=row.penalty)
    if cached is not None:
        problem.save(cached)
    return problem


def _threshold_label(threshold: float) -> str:
    """Column title of a threshold, e.g. ``t<=3.7%``."""
    return f"t<={100 * threshold:g}%"


def print_gap_runs(runs: Sequence[MethodRun]) -> None:
    """The table of one row: the result of each method and its times to each gap."""
    labels = [_threshold_label(threshold) for threshold in GAP_THRESHOLDS]
    print(
        f"{'method':<8} {'incumbent':>12} {'bound':>12} {'gap %':>8} {'time s':>8} "
        + " ".join(f"{label:>9}" for label in labels)
    )
    for run in runs:
        gap = None if run.gap is None else 100 * run.gap
        times = " ".join(f"{_format(t, 1):>9}" for t in run.time_to_gap)
        print(
            f"{run.method:<8} {_format(run.objective):>12} {_format(run.bound):>12} "
            f"{_format(gap, 2):>8} {run.time_s:>8.1f} {times}",
            flush=True,
        )
    by_method = {run.method: run for run in runs}
    if "today" in by_method and "auto" in by_method:
        today, auto = by_method["today"].objective, by_method["auto"].objective
        difference = 100 * (auto - today) / max(abs(today), 1e-9)
        print(f"incumbent auto vs today: {difference:+.3f} %", flush=True)


def run_gap_row(
    row: GapRow,
    *,
    seed: int,
    methods: Sequence[str],
    demo_problem: str | None,
    cache_dir: str | None,
) -> dict[str, Any]:
    """Load one row's problem, run the methods one after the other, print and return them."""
    started = time.perf_counter()
    problem = load_gap_problem(row, seed=seed, demo_problem=demo_problem, cache_dir=cache_dir)
    load_s = time.perf_counter() - started
    penalty = "file" if row.scale == "demo" else row.penalty
    print(
        f"\n== {row.scale}, {penalty} penalty, seed {seed}: n_f={problem.n_all_features} "
        f"n_c={problem.n_classes} select {problem.n_features}, {problem.n_per_class} per class, "
        f"{problem.n_penalised_pairs} penalised pairs; budget {row.budget_s:g} s per method "
        f"(problem ready in {load_s:.1f} s)",
        flush=True,
    )
    runners = {"today": run_today, "auto": run_auto}
    runs = [runners[method](problem, budget_s=row.budget_s, seed=seed) for method in methods]
    print_gap_runs(runs)
    return {
        "scale": row.scale,
        "penalty": penalty,
        "seed": seed,
        "budget_s": row.budget_s,
        "n_all_features": problem.n_all_features,
        "n_classes": problem.n_classes,
        "n_features": problem.n_features,
        "n_per_class": problem.n_per_class,
        "n_penalised_pairs": problem.n_penalised_pairs,
        "gap_thresholds": list(GAP_THRESHOLDS),
        "methods": {run.method: run.to_dict() for run in runs},
    }


def _write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` via a temporary file beside it and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".gap-table-", suffix=".json")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(payload, file, indent=1)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _load_average() -> str:
    """The 1/5/15-minute load averages, ``nan`` where the platform has none."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"


def gap_table_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The --gap-table mode: every row, each requested method, and the JSON record."""
    try:
        rows = parse_gap_rows(args.rows)
    except ValueError as error:
        parser.error(str(error))
    if any(row.scale == "demo" for row in rows) and args.demo_problem is None:
        parser.error("a demo row needs --demo-problem PATH (the problem.npz to load)")
    methods = [method.strip() for method in args.methods.split(",")]
    unknown = [method for method in methods if method not in GAP_METHODS]
    if unknown or not methods:
        parser.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(GAP_METHODS)}")
    if args.cache_dir is not None:
        os.makedirs(args.cache_dir, exist_ok=True)
    print(
        f"gap table, seed {args.seed}, methods {', '.join(methods)}, {os.cpu_count()} CPUs, "
        f"load average {_load_average()} at start"
    )
    payload: dict[str, Any] = {"seed": args.seed, "methods": methods, "rows": []}
    for row in rows:
        payload["rows"].append(
            run_gap_row(
                row,
                seed=args.seed,
                methods=methods,
                demo_problem=args.demo_problem,
                cache_dir=args.cache_dir,
            )
        )
        if args.json_out:  # after every row: a long run keeps what it has measured
            _write_json(args.json_out, payload)
    print(f"\nload average {_load_average()} at the end")
    return 0


def _parser() -> argparse.ArgumentParser:
    """The command line of both modes."""
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
    _add_gap_table_arguments(parser)
    # internal: run the paper formulation alone (see _run_paper_isolated)
    parser.add_argument(
        "--paper-child", nargs=2, metavar=("PROBLEM", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--paper-time", type=float, default=60.0, help=argparse.SUPPRESS)
    return parser


def _add_gap_table_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the --gap-table mode."""
    group = parser.add_argument_group("gap table (issue 17)")
    group.add_argument(
        "--gap-table", action="store_true", help="today's solver vs auto: times to each gap"
    )
    group.add_argument(
        "--rows",
        default=DEFAULT_GAP_ROWS,
        help="comma-separated scale[-strong]:seconds; the scale demo loads --demo-problem",
    )
    group.add_argument("--methods", default=",".join(GAP_METHODS), help="today, auto or both")
    group.add_argument("--demo-problem", default=None, help="problem.npz of the demo row")
    group.add_argument("--json-out", default=None, help="write every row's numbers here")
    group.add_argument(
        "--cache-dir", default=None, help="save/load generated problems here to skip building"
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.paper_child:
        _paper_child(args.paper_child[0], args.seed, args.paper_time, args.paper_child[1])
        return 0
    if args.gap_table:
        return gap_table_main(args, parser)
    default_scales = "tiny,small" if args.quick else ",".join(SCALES)
    scales = (args.scales or default_scales).split(",")
    unknown = [scale for scale in scales if scale not in SCALES]
    if unknown:
        parser.error(f"unknown scale(s) {', '.join(unknown)}; valid: {', '.join(SCALES)}")
    budgets = QUICK_BUDGET_S if args.quick else BUDGET_S
    print(
        f"solver benchmark, seed {args.seed}, {os.cpu_count()} CPUs, load average "
        f"{_load_average()} at start"
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
    print(f"\nload average {_load_average()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
