"""The paper's comparisons: four methods from one dense model, compare, sweep (tiny data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests._tiny import StartedStages, tiny_config

import openqpm
from openqpm.cli import main
from openqpm.config import RunConfig, apply_overrides, load_config
from openqpm.stages import METHODS, stage_hash

N_FEATURES, N_PER_CLASS, N_CLASSES = 6, 2, 4


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openqpm.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("methods") / "synthetic"
    return make_synthetic(root, n_classes=N_CLASSES, n_images_per_class=14, image_size_px=32)


def _config(root: Path, method: str) -> RunConfig:
    return tiny_config(
        root,
        **{
            "dense.epochs": 2,
            "solver.n_features": N_FEATURES,
            "solver.n_per_class": N_PER_CLASS,
            "solver.time_limit_s": 2.0,
            "sparsify.method": method,
            "sparsify.n_lambdas": 20,
            "sparsify.qsenn_rounds": 2,
            "sparsify.qsenn_round_epochs": 1,
        },
    )


@pytest.fixture(scope="module")
def four_methods(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("run")
    results, started = {}, {}
    for method in METHODS:
        reporter = StartedStages()
        results[method] = openqpm.run(
            _config(tiny_data, method), run_dir, device="cpu", reporter=reporter
        )
        started[method] = reporter.started
    return {"run_dir": run_dir, "results": results, "started": started}


def test_methods_share_the_dense_model_and_run_only_their_own_stages(
    four_methods: dict[str, Any],
) -> None:
    started = four_methods["started"]
    assert started["qpm"][0] == "dense"
    for method in ("glm-saga5", "sldd", "qsenn"):
        assert started[method] == [method, "evaluate", "report"]
    # every method's evaluation and report stay current beside the others
    run_dir = four_methods["run_dir"]
    state = json.loads((run_dir / "stages.json").read_text())
    for method in METHODS:
        suffix = "" if method == "qpm" else f"@{method}"
        config = four_methods["results"][method].config
        assert state[f"evaluate{suffix}"]["hash"] == stage_hash(config, "evaluate")
        assert (four_methods["results"][method].paths("report")[0]).is_file()
    sldd_index = four_methods["results"]["sldd"].paths("report")[0].read_text()
    assert "SLDD-Model report" in sldd_index and "QPM report" not in sldd_index


def test_each_model_has_the_structure_its_method_promises(four_methods: dict[str, Any]) -> None:
    weights = {}
    for method, result in four_methods["results"].items():
        model = result.load_model()
        assert not model.training
        weights[method] = model.class_weights().detach().double().numpy()
    qpm = weights["qpm"]
    assert set(np.unique(qpm)) <= {0.0, 1.0}
    assert np.all((qpm != 0).sum(axis=1) == N_PER_CLASS)
    assert len({tuple(row) for row in (qpm != 0)}) == N_CLASSES  # no two classes alike
    sldd = weights["sldd"]
    assert int(np.sum((sldd != 0).any(axis=0))) <= N_FEATURES
    assert int(np.sum(sldd != 0)) <= N_PER_CLASS * N_CLASSES
    qsenn = weights["qsenn"]
    magnitudes = np.abs(qsenn[qsenn != 0])
    assert magnitudes.size > 0 and np.allclose(magnitudes, magnitudes[0])  # {-a, 0, +a}
    assert int(np.sum((qsenn != 0).any(axis=0))) <= N_FEATURES
    glm = weights["glm-saga5"]
    assert glm.shape[1] > N_FEATURES  # no feature selection: every backbone channel
    assert 0 < int(np.sum(glm != 0)) <= N_PER_CLASS * N_CLASSES


def test_compare_writes_the_table_for_every_method(
    four_methods: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "comparison.json"
    assert main(["compare", str(four_methods["run_dir"]), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    comparison = json.loads(out.read_text())
    assert list(comparison) == ["dense", *METHODS]
    for method in METHODS:
        entry = comparison[method]
        for key in ("accuracy", "n_features_used", "features_per_class_mean"):
            assert entry[key]["mean"] is not None, (method, key)
        assert set(entry["metrics"]) >= {"sid_at_5", "class_independence", "correlation"}
        assert entry["seeds"] == [0]
        assert f"| {method} |" in table
    assert "<td>sldd</td>" in out.with_suffix(".html").read_text()
    assert out.with_suffix(".md").read_text().strip() == table.strip()
    assert comparison["qsenn"]["weights_ternary"] is True
    assert comparison["qpm"]["weights_ternary"] is True  # binary: all nonzero weights equal
    assert comparison["sldd"]["features_per_class_max"]["mean"] >= 1
    metrics = json.loads((four_methods["run_dir"] / "metrics_sldd.json").read_text())
    assert comparison["sldd"]["accuracy"]["mean"] == pytest.approx(metrics["sldd"]["accuracy"])


def test_sweep_reuses_the_dense_model_and_plots(
    four_methods: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = four_methods["run_dir"]
    dense_mtime = (run_dir / "dense.safetensors").stat().st_mtime_ns
    assert main(["sweep", str(run_dir), "--n-features", "4,5", "--methods", "qpm"]) == 0
    assert (run_dir / "sweep" / "n_features.png").stat().st_size > 0
    rows = json.loads((run_dir / "sweep" / "n_features.json").read_text())
    assert [(r["method"], r["n_features"]) for r in rows] == [("qpm", 4.0), ("qpm", 5.0)]
    assert rows[0]["n_features_used"] <= 4
    point = run_dir / "sweep" / "n_features=4"
    assert (point / "dense.safetensors").stat().st_mtime_ns == dense_mtime  # linked, not trained
    assert "[dense] up to date" in capsys.readouterr().err


def test_an_unknown_method_is_refused_with_the_choices(tiny_data: Path, tmp_path: Path) -> None:
    config = apply_overrides(_config(tiny_data, "qpm"), {"sparsify.method": "lasso"})
    with pytest.raises(openqpm.PipelineError, match="glm-saga5, sldd, qsenn"):
        openqpm.run(config, tmp_path / "r", device="cpu")
    assert not (tmp_path / "r").exists()


def test_ablation_switches_reach_the_problem(tiny_data: Path, tmp_path: Path) -> None:
    from openqpm.solver import AssignmentProblem

    base = _config(tiny_data, "qpm")
    stages = ["dense", "features", "problem"]
    plain = openqpm.run(base, tmp_path / "plain", stages=stages, device="cpu")
    no_r = apply_overrides(base, {"solver.use_similarity": False, "solver.bias": "none"})
    openqpm.run(no_r, tmp_path / "plain", stages=stages, device="cpu")
    problem = AssignmentProblem.load(tmp_path / "plain" / "problem.npz")
    assert not np.any(problem.R) and not np.any(problem.b)
    auroc = apply_overrides(base, {"solver.class_measure": "auroc"})
    openqpm.run(auroc, tmp_path / "plain", stages=stages, device="cpu")
    report = json.loads((tmp_path / "plain" / "problem_report.json").read_text())
    assert report["class_measure"] == "auroc"
    assert plain.stage_hashes["dense"] == stage_hash(auroc, "dense")  # one dense model for all
    with pytest.raises(openqpm.PipelineError, match="solver.class_measure"):
        openqpm.run(apply_overrides(base, {"solver.class_measure": "gini"}), tmp_path / "x")


def test_train_runs_several_seeds_and_methods(tiny_data: Path, tmp_path: Path) -> None:
    from openqpm.compare import compare
    from openqpm.config import save_config

    save_config(_config(tiny_data, "qpm"), tmp_path / "tiny.yaml")
    run_dir = tmp_path / "runs"
    argv = ["train", "--config", str(tmp_path / "tiny.yaml"), "--run-dir", str(run_dir)]
    assert main([*argv, "--seeds", "0,1", "--method", "qpm,glm-saga5"]) == 0
    for seed in (0, 1):
        saved = load_config(run_dir / f"seed{seed}" / "config.yaml")
        assert saved.seed == seed
        assert (run_dir / f"seed{seed}" / "metrics_glm-saga5.json").is_file()
        assert (run_dir / f"seed{seed}" / "metrics.json").is_file()
    comparison = compare([run_dir])
    assert comparison["qpm"]["seeds"] == [0, 1] and comparison["glm-saga5"]["seeds"] == [0, 1]
    assert comparison["qpm"]["accuracy"]["std"] is not None
