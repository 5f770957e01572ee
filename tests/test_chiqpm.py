"""The `chiqpm` method end to end (tiny data): forced pairs, ReLU head, held-out calibration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests._tiny import StartedStages, tiny_config

import openqpm
from openqpm._runs import _held_out
from openqpm.config import ConfigError
from openqpm.conformal import SCORES, Calibration
from openqpm.constants import closest_class_pairs
from openqpm.solver.problem import Assignment

N_CLASSES, N_PER_CLASS = 6, 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openqpm.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("chiqpm") / "synthetic"
    return make_synthetic(root, n_classes=N_CLASSES, n_images_per_class=14, image_size_px=32)


def _config(root: Path, method: str, fraction: float = 0.25) -> Any:
    return tiny_config(
        root,
        **{
            "sparsify.method": method,
            "data.calibration_fraction": fraction,
            "finetune.epochs": 2,
            "solver.n_features": 6,
            "solver.n_per_class": N_PER_CLASS,
            "sparsify.chiqpm_rho": 0.5,
        },
    )


@pytest.fixture(scope="module")
def runs(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("run")
    results, started = {}, {}
    for method in ("qpm", "chiqpm"):
        reporter = StartedStages()
        results[method] = openqpm.run(
            _config(data_root, method), run_dir, device="cpu", reporter=reporter
        )
        started[method] = reporter.started
    return {"run_dir": run_dir, "results": results, "started": started}


def test_closest_class_pairs_by_hand() -> None:
    # rows 0 and 2 are 0.1 apart, 1 and 3 are 0.2 apart, every other pair is at least 0.9 apart
    weights = np.array([[0.0, 0.0], [5.0, 5.0], [0.1, 0.0], [5.0, 5.2]])
    assert closest_class_pairs(weights, 0.5) == [(0, 2), (1, 3)]
    assert closest_class_pairs(weights, 0.25) == [(0, 2)]
    assert closest_class_pairs(weights, 0.0) == []
    with pytest.raises(ValueError, match="only 6"):
        closest_class_pairs(weights, 2.0)
    with pytest.raises(ValueError, match="rho"):
        closest_class_pairs(weights, -1.0)


def test_held_out_images_are_a_per_class_share_that_trains_nothing() -> None:
    class _Split:
        def __init__(self, labels: list[int]) -> None:
            self.labels = np.asarray(labels)

        def __len__(self) -> int:
            return len(self.labels)

    labels = [0] * 10 + [1] * 10 + [2] * 1
    split = _Split(labels)
    parts = _held_out(split, split, 0.2, seed=3)
    held = set(parts["calibration"].indices)
    kept = set(parts["train"].indices)
    assert kept == set(parts["train_fit"].indices)
    assert held.isdisjoint(kept) and held | kept == set(range(len(labels)))
    counts = np.bincount(np.asarray(labels)[sorted(held)], minlength=3)
    assert counts.tolist() == [2, 2, 0]  # 20 % of each class; a single image always trains
    assert _held_out(split, split, 0.2, seed=3)["calibration"].indices == sorted(held)
    assert set(_held_out(split, split, 0.2, seed=4)["calibration"].indices) != held
    none = _held_out(split, split, 0.0, seed=3)
    assert none["calibration"] is None and none["train"] is split


def test_chiqpm_shares_the_dense_model_and_features_with_qpm(runs: dict[str, Any]) -> None:
    assert runs["started"]["qpm"][0] == "dense"
    assert runs["started"]["chiqpm"] == ["chiqpm-assignment", "chiqpm", "evaluate", "report"]


def test_chiqpm_meets_its_pairs_and_has_a_relu_head(runs: dict[str, Any]) -> None:
    run_dir = runs["run_dir"]
    result = runs["results"]["chiqpm"]
    model = result.load_model()
    assert model.head.relu and not runs["results"]["qpm"].load_model().head.relu
    dense = runs["results"]["qpm"].load_model("dense").class_weights().double().numpy()
    pairs = closest_class_pairs(dense, 0.5)
    assert len(pairs) == N_CLASSES // 2
    assignment = Assignment.load(run_dir / "assignment_chiqpm.json")
    for first, second in pairs:
        shared = set(assignment.class_features[first]) & set(assignment.class_features[second])
        assert len(shared) == N_PER_CLASS - 1
    weights = model.class_weights().numpy()
    overlap = weights @ weights.T
    counted = int(np.triu(overlap == N_PER_CLASS - 1, 1).sum())
    assert result.metrics["chiqpm"]["one_feature_apart_pairs"] == counted >= len(pairs)


def test_calibration_comes_from_held_out_training_images(runs: dict[str, Any]) -> None:
    run_dir = runs["run_dir"]
    stages = json.loads((run_dir / "stages.json").read_text())
    n_fit = stages["features"]["summary"]["n_images"]
    stored = json.loads((run_dir / "calibration_chiqpm.json").read_text())
    assert stored["available"] is True
    calibration = Calibration.from_json_dict(stored["calibration"])
    # 8 training images per class in the generated split (14 images, test share 6)
    assert calibration.n_calibration + n_fit == N_CLASSES * 8
    assert calibration.n_calibration == N_CLASSES * 2
    assert len(stored["active_means"]) == 6 and min(stored["active_means"]) > 0
    conformal = runs["results"]["chiqpm"].metrics["chiqpm"]["conformal"]
    assert conformal["n_calibration"] == calibration.n_calibration
    rows = conformal["results"]
    assert {(row["score"], row["alpha"]) for row in rows} == {
        (score, alpha) for score in SCORES for alpha in (0.05, 0.075, 0.1, 0.12)
    }
    for row in rows:
        assert 0.0 <= row["coverage"] <= 1.0 and 1.0 <= row["mean_set_size"] <= N_CLASSES


def test_chiqpm_report_has_trees_and_the_prediction_sets(runs: dict[str, Any]) -> None:
    index = runs["results"]["chiqpm"].paths("report")[0]
    text = index.read_text()
    assert "CHiQPM report" in text and "Calibrated prediction sets" in text
    assert list((index.parent / "img").glob("tree_c*.png"))


def test_without_held_out_images_there_is_no_calibration(data_root: Path, tmp_path: Path) -> None:
    result = openqpm.run(_config(data_root, "chiqpm", fraction=0.0), tmp_path, device="cpu")
    stored = json.loads((tmp_path / "calibration_chiqpm.json").read_text())
    assert stored["available"] is False and "calibration_fraction" in stored["reason"]
    assert "conformal" not in result.metrics["chiqpm"]
    assert result.metrics["chiqpm"]["one_feature_apart_pairs"] >= N_CLASSES // 2


def test_a_bad_calibration_fraction_is_refused(data_root: Path) -> None:
    with pytest.raises(ConfigError, match="calibration_fraction"):
        _config(data_root, "chiqpm", fraction=1.0)


def test_compare_lists_the_calibrated_sets_of_both_methods(runs: dict[str, Any]) -> None:
    from openqpm.compare import compare, conformal_markdown

    comparison = compare([runs["run_dir"]])
    table = conformal_markdown(comparison)
    assert table is not None
    rows = [line for line in table.splitlines()[2:]]
    assert [row.split("|")[1].strip() for row in rows] == ["qpm"] * 4 + ["chiqpm"] * 4
    pairs = runs["results"]["chiqpm"].metrics["chiqpm"]["one_feature_apart_pairs"]
    assert rows[4].split("|")[2].strip() == f"{pairs:.1f}"
    conformal = runs["results"]["chiqpm"].metrics["chiqpm"]["conformal"]["results"]
    thr = next(r for r in conformal if r["score"] == "thr" and r["alpha"] == 0.05)
    assert rows[4].split("|")[-3].strip() == f"{100 * thr['coverage']:.1f}"


def test_a_solver_that_cannot_force_pairs_is_refused_before_any_work(
    data_root: Path, tmp_path: Path
) -> None:
    from openqpm.config import apply_overrides
    from openqpm.stages import PipelineError

    config = apply_overrides(_config(data_root, "chiqpm"), {"solver.method": "paper"})
    with pytest.raises(PipelineError, match=r"solver.method='paper' cannot force.*auto, search"):
        openqpm.run(config, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run" / "dense.safetensors").exists()
