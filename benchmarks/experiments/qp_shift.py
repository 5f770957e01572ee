"""A convex-QP root bound: the penalty made concave by a diagonal shift, no y columns.

For a 0/1 selection s, sum_{d<e} R[d,e] s_d s_e = 1/2 s'(R + delta I)s - delta/2 sum_d s_d for
any delta; with delta = -lambda_min(R) the first term is convex, so

    max  sum_c f_c(s) + b's - 1/2 s'(R + delta I)s + delta/2 sum_d s_d
    s.t. sum_d s_d = K, 0 <= s <= 1

(f_c the concave closure of class c's top-k value, as in the LP) is a concave maximisation
whose value bounds the optimum. Solved by projected supergradient ascent; every iterate gives a
certified bound by linearisation: phi(s*) <= phi(s) + max_{s' feasible} g'(s' - s).

Usage: python qp_shift.py cub 120      (problem, seconds[, seed])
"""

from __future__ import annotations

import sys
import time

import numpy as np
from common import load_problem, load_text


def project(y: np.ndarray, total: float) -> np.ndarray:
    """Euclidean projection onto {0 <= s <= 1, sum s = total} (bisection on the shift)."""
    low, high = float(y.min()) - 1.0, float(y.max())
    for _ in range(60):
        tau = 0.5 * (low + high)
        if np.clip(y - tau, 0.0, 1.0).sum() > total:
            low = tau
        else:
            high = tau
    return np.clip(y - 0.5 * (low + high), 0.0, 1.0)


def class_part(values: np.ndarray, s: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """sum_c f_c(s) and a supergradient (greedy fill of each class up to k)."""
    order = np.argsort(-values, axis=1)
    s_sorted = s[order]
    cumulative = np.cumsum(s_sorted, axis=1)
    take = np.clip(k - (cumulative - s_sorted), 0.0, s_sorted)
    sorted_values = np.take_along_axis(values, order, axis=1)
    rank = np.minimum((cumulative < k - 1e-12).sum(axis=1), values.shape[1] - 1)
    theta = sorted_values[np.arange(values.shape[0]), rank]
    gradient = np.maximum(values - theta[:, None], 0.0).sum(axis=0)
    return float((take * sorted_values).sum()), gradient


def main() -> None:
    name, seconds = sys.argv[1], float(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    problem = load_problem(name, seed)
    k, total = problem.n_per_class, float(problem.n_features)
    values = problem.class_scale * problem.A
    delta = max(0.0, -float(np.linalg.eigvalsh(problem.R)[0])) * (1 + 1e-6)
    shifted = problem.R + delta * np.eye(problem.n_all_features)
    s = np.full(problem.n_all_features, total / problem.n_all_features)
    best = np.inf
    started = time.perf_counter()
    step = 0
    while time.perf_counter() - started < seconds:
        step += 1
        value, gradient = class_part(values, s, k)
        product = shifted @ s
        value += float(problem.b @ s - 0.5 * s @ product + 0.5 * delta * s.sum())
        gradient = gradient + problem.b - product + 0.5 * delta
        top = np.argpartition(-gradient, problem.n_features)[: problem.n_features]
        best = min(best, value + float(gradient[top].sum() - gradient @ s))
        s = project(s + 0.05 / np.sqrt(step) * gradient / max(1e-9, np.abs(gradient).max()), total)
    print(
        f"RESULT {name} seed {seed}: delta {delta:.4f}, {step} steps in {seconds:.0f} s, "
        f"certified bound {best:.4f}; {load_text()}"
    )


if __name__ == "__main__":
    main()
