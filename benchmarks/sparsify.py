"""Sparsification time of QPM and its baselines side by side (the paper's Table 6), on one CPU.

Each method turns the same pooled training features into its compact classifier:

* QPM: the constants (A, R, b, eps) from streamed statistics, then ``solve(method="auto")`` with
  the configuration's time limit (QPM's solver uses its whole budget by design: the search finds
  its solution in seconds and the rest of the time tightens the certified bound);
* glm-saga5: the elastic-net path on all features;
* SLDD-Model: the group-sparse selection, then the path on the selected features;
* Q-SENN: the same selection and path, then ternary quantisation (one round; its further
  rounds repeat the fit on re-extracted features, so multiply the fit time by the rounds).

Fine-tuning is not timed here (it is the same kind of training for QPM, SLDD and Q-SENN; Q-SENN
trains 70 epochs where the others train 40). Two feature matrices: the demo's size (3 000 images,
256 features, 50 classes) and CUB's (5 994 images, 2 048 features, 200 classes), generated with
class structure (a class is a sparse set of active latent parts) so that the paths and the
solver see realistic correlations. Or pass ``--run-dir`` of a finished run to time its dense
model's real features.

Usage::

    python benchmarks/sparsify.py                   # demo size and CUB size
    python benchmarks/sparsify.py --sizes demo      # demo size only (about a minute)
    python benchmarks/sparsify.py --run-dir runs/demo --qpm-time-limit 20
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from openqpm.config import SparsifyConfig
from openqpm.constants import FeatureStatistics, build_problem
from openqpm.solver import solve
from openqpm.sparsify.baselines import fit_sparse_layer, select_columns

SIZES = {"demo": (3000, 256, 50), "cub": (5994, 2048, 200)}


def generated_features(
    n_images: int, n_features: int, n_classes: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative pooled features with class structure: sparse class codes over latent parts."""
    rng = np.random.default_rng(seed)
    n_parts = max(8, n_features // 4)
    class_codes = (rng.random((n_classes, n_parts)) < 0.15).astype(np.float32)  # (n_c, parts)
    loadings = rng.gamma(1.0, 1.0, size=(n_parts, n_features)).astype(np.float32)
    loadings *= rng.random((n_parts, n_features)) < 0.1  # each feature reads a few parts
    labels = rng.integers(0, n_classes, size=n_images)
    parts = class_codes[labels] * rng.lognormal(0.0, 0.4, size=(n_images, n_parts))
    noise = rng.normal(0.0, 0.3, size=(n_images, n_features))
    return np.maximum(parts @ loadings + noise, 0.0).astype(np.float32), labels


def run_features(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The pooled training features of a finished run's dense model."""
    import torch

    from openqpm.config import load_config
    from openqpm.data import build_transforms, create_dataset, resize_squashes
    from openqpm.features import extract_features
    from openqpm.models import load
    from openqpm.training import make_loader

    config = load_config(run_dir / "config.yaml")
    data = config.data
    dataset = create_dataset(data.dataset, data.root, "train", crop=data.crop)
    mean, std = dataset.mean_std
    dataset.transform = build_transforms(
        train=False,
        image_size_px=data.image_size_px,
        mean=mean,
        std=std,
        squash=resize_squashes(data.dataset, data.crop),
    )
    loader = make_loader(dataset, batch_size=64, train=False, seed=0)
    model = load(run_dir / "dense.safetensors")
    result = extract_features(model, loader, device=torch.device("cpu"), keep_pooled=True)
    assert result.pooled is not None and result.labels is not None
    return result.pooled, result.labels


def _timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def time_methods(
    pooled: np.ndarray,
    labels: np.ndarray,
    *,
    n_features: int,
    n_per_class: int,
    qpm_time_limit_s: float,
    config: SparsifyConfig,
) -> dict[str, float]:
    """Seconds each method takes from pooled features to its classifier."""
    n_classes = int(labels.max()) + 1

    def qpm() -> None:
        stats = FeatureStatistics(pooled.shape[1], n_classes)
        stats.update(pooled.astype(np.float64), labels)
        problem, _ = build_problem(
            stats, None, n_features=n_features, n_per_class=n_per_class, bias="none"
        )
        solve(problem, method="auto", time_limit_s=qpm_time_limit_s, seed=0)

    def layer(method: str, selected: np.ndarray | None) -> None:
        fit_sparse_layer(
            method,
            pooled,
            labels,
            selected=selected,
            n_classes=n_classes,
            n_per_class=n_per_class,
            config=config,
        )

    times: dict[str, float] = {"qpm (solver budget)": _timed(qpm)}
    times["glm-saga5"] = _timed(lambda: layer("glm-saga5", None))
    chosen: list[np.ndarray] = []
    select_s = _timed(
        lambda: chosen.append(
            select_columns(
                pooled, labels, n_classes=n_classes, n_features=n_features, config=config
            )
        )
    )
    times["sldd"] = select_s + _timed(lambda: layer("sldd", chosen[0]))
    times["qsenn (one round)"] = select_s + _timed(lambda: layer("qsenn", chosen[0]))
    return times


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="demo,cub", help="demo, cub or both")
    parser.add_argument("--run-dir", type=Path, help="time a finished run's real features")
    parser.add_argument("--n-features", type=int, default=50)
    parser.add_argument("--n-per-class", type=int, default=5)
    parser.add_argument("--qpm-time-limit", type=float, default=20.0, help="seconds (demo: 20)")
    parser.add_argument("--n-lambdas", type=int, default=100)
    args = parser.parse_args()
    config = SparsifyConfig(n_lambdas=args.n_lambdas)
    cases: list[tuple[str, np.ndarray, np.ndarray]] = []
    if args.run_dir is not None:
        cases.append((f"run {args.run_dir}", *run_features(args.run_dir)))
    else:
        for name in args.sizes.split(","):
            n_images, n_features, n_classes = SIZES[name]
            cases.append((name, *generated_features(n_images, n_features, n_classes, seed=0)))
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    for name, pooled, labels in cases:
        times = time_methods(
            pooled,
            labels,
            n_features=args.n_features,
            n_per_class=args.n_per_class,
            qpm_time_limit_s=args.qpm_time_limit,
            config=config,
        )
        n_images, n_all = pooled.shape
        print(f"\n{name}: {n_images} images, {n_all} features, {int(labels.max()) + 1} classes")
        reference = times["qpm (solver budget)"]
        print("| method | time (s) | / QPM |\n|---|---|---|")
        for method, seconds in times.items():
            print(f"| {method} | {seconds:.1f} | {seconds / reference:.2f} |")


if __name__ == "__main__":
    main()
