"""A Lagrangian bound whose selection part is an SDP on the features that matter most.

With class thresholds theta (here: each class's k-th best value among the incumbent's
features) the Lagrangian of the links x <= s is

    L(theta) = k sum_c theta_c + max_{|S| = K} [w(S) - R(S)],  w_d = b_d + sum_c (a_cd - theta_c)^+.

The inner maximum is bounded by the Shor SDP with RLT rows and X >= 0 on the ``n_sdp`` features
of largest w; the others enter linearly without penalties (dropping penalties only raises the
value, so the bound stays valid). Needs cvxpy with Clarabel (not a dependency of openqpm:
``pip install cvxpy``).

Usage: python sdp_selection.py cub 100      (problem, n_sdp[, seed]); reads the incumbent saved
by ``baseline.py cub 600``.
"""

from __future__ import annotations

import json
import sys
import time

import cvxpy as cp
import numpy as np
from common import CACHE, load_problem, load_text


def main() -> None:
    name, n_sdp = sys.argv[1], int(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    problem = load_problem(name, seed)
    incumbent = json.loads((CACHE / f"auto_{name}_{seed}_600_cut.json").read_text())
    chosen = np.array(incumbent["selected_features"])
    k, total = problem.n_per_class, problem.n_features
    values = problem.class_scale * problem.A
    theta = np.sort(values[:, chosen], axis=1)[:, -k]
    weight = problem.b + np.maximum(values - theta[:, None], 0.0).sum(axis=0)
    order = np.argsort(-weight)
    inner, outer = order[:n_sdp], order[n_sdp:]
    lifted = cp.Variable((n_sdp + 1, n_sdp + 1), symmetric=True)
    x, products = lifted[0, 1:], lifted[1:, 1:]
    rest = cp.Variable(outer.size)
    rows = [
        lifted >> 0,
        lifted[0, 0] == 1,
        cp.diag(products) == x,
        products >= 0,
        products <= cp.reshape(x, (n_sdp, 1), order="C") @ np.ones((1, n_sdp)),
        cp.sum(products, axis=1) <= total * x,
        rest >= 0,
        rest <= 1,
        cp.sum(x) + cp.sum(rest) == total,
    ]
    penalty = 0.5 * cp.sum(cp.multiply(problem.R[np.ix_(inner, inner)], products))
    objective = cp.Maximize(weight[inner] @ x - penalty + weight[outer] @ rest)
    started = time.perf_counter()
    inner_bound = cp.Problem(objective, rows).solve(solver="CLARABEL")
    at_incumbent = weight[chosen].sum() - 0.5 * problem.R[np.ix_(chosen, chosen)].sum()
    print(
        f"RESULT {name} seed {seed}: k*sum(theta) {k * theta.sum():.4f}, selection part "
        f"<= {inner_bound:.4f} (incumbent's {at_incumbent:.4f}), bound "
        f"{k * theta.sum() + inner_bound:.4f}, SDP on {n_sdp} features in "
        f"{time.perf_counter() - started:.0f} s; {load_text()}"
    )


if __name__ == "__main__":
    main()
