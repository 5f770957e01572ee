"""Shared helpers of the bound experiments (issue #17): problems, cached instances, load."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from openqpm.instances import make_instance
from openqpm.solver.problem import AssignmentProblem

DEMO_PROBLEM = Path("/work/demo_run/runs/demo/problem.npz")
CACHE = Path(os.environ.get("OPENQPM_EXPERIMENT_CACHE", "/tmp/openqpm_experiments"))


def load_problem(name: str, seed: int = 0) -> AssignmentProblem:
    """``demo`` (the demo run's real problem) or a generated scale, cached on disk; a scale
    with ``-strong`` (``cub-strong``) is its strong penalty family."""
    if name == "demo":
        return AssignmentProblem.load(DEMO_PROBLEM)
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}_{seed}.npz"
    if path.exists():
        return AssignmentProblem.load(path)
    started = time.perf_counter()
    scale, _, family = name.partition("-")
    problem = make_instance(scale, seed=seed, penalty=family or "default")
    problem.save(path)
    print(f"generated {name} seed {seed} in {time.perf_counter() - started:.1f} s", flush=True)
    return problem


def load_text() -> str:
    """The 1/5/15-minute load averages and the core count, for every printed number."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f}/{five:.2f}/{fifteen:.2f} on {os.cpu_count()} cores"


def distinct_free_value(problem: AssignmentProblem, selection: list[int]) -> float:
    """The objective of a selection when classes may share sets (each takes its top k)."""
    chosen = np.asarray(sorted(selection))
    top = np.sort(problem.A[:, chosen], axis=1)[:, -problem.n_per_class :].sum()
    return float(
        problem.class_scale * top
        + problem.b[chosen].sum()
        - 0.5 * problem.R[np.ix_(chosen, chosen)].sum()
    )
