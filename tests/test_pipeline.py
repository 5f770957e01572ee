"""End to end: a tiny run over the embedded data set, stage reuse, and early input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import openqpm
from openqpm.config import RunConfig, apply_overrides, with_overrides
from openqpm.pipeline import (
    PipelineError,
    check_inputs,
    read_stage_state,
    run_pipeline,
    stage_is_current,
)
from openqpm.solver import AssignmentProblem
from openqpm.solver.problem import Assignment, validate_assignment
from openqpm.stages import stage_hash, stages_for


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openqpm.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("data") / "synthetic"
    return make_synthetic(root, n_classes=4, n_images_per_class=14, image_size_px=32, seed=3)


def _tiny_config(root: Path, **solver: object) -> RunConfig:
    config = RunConfig()
    config = with_overrides(
        config,
        data={
            "dataset": "synthetic",
            "root": str(root),
            "image_size_px": 32,
            "batch_size": 8,
            "num_workers": 0,
        },
        model={"arch": "tiny_cnn"},
        dense={"epochs": 1, "step_size_epochs": 1},
        finetune={"epochs": 1, "step_size_epochs": 1},
        solver={
            "n_features": 5,
            "n_per_class": 2,
            "time_limit_s": 5.0,
            "method": "search",
            **solver,
        },
    )
    return apply_overrides(config, ["device=cpu", "amp=false", "report_max_classes=2"])


@pytest.fixture(scope="module")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Path]:
    config = _tiny_config(tiny_data)
    run_dir = tmp_path_factory.mktemp("run")
    run_pipeline(config, run_dir, device=torch.device("cpu"))
    return config, run_dir


def test_run_directory_has_every_artifact(tiny_run: tuple[RunConfig, Path]) -> None:
    config, run_dir = tiny_run
    for name in (
        "config.yaml",
        "dense.safetensors",
        "features",
        "problem.npz",
        "assignment.json",
        "qpm.safetensors",
        "metrics.json",
        "report/index.html",
    ):
        assert (run_dir / name).exists(), name
    state = read_stage_state(run_dir)
    assert set(state) == set(stages_for(config))
    for stage in stages_for(config):
        assert state[stage]["hash"] == stage_hash(config, stage)
    # no pickle anywhere in the run directory
    suffixes = {p.suffix for p in run_dir.rglob("*") if p.is_file()}
    assert not suffixes & {".pt", ".pth", ".pkl", ".pickle"}


def test_artifacts_are_consistent(tiny_run: tuple[RunConfig, Path]) -> None:
    config, run_dir = tiny_run
    problem = AssignmentProblem.load(run_dir / "problem.npz")
    assignment = Assignment.load(run_dir / "assignment.json")
    validate_assignment(problem, assignment)
    assert len(assignment.selected_features) == config.solver.n_features
    model = openqpm.load(run_dir / "qpm.safetensors")
    assert model.is_qpm and not model.training
    weights = model.class_weights().numpy()
    # the saved QPM head is exactly the solver's assignment
    np.testing.assert_array_equal(weights, assignment.class_feature_matrix())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in ("dense", "qpm"):
        assert 0.0 <= metrics[name]["accuracy"] <= 100.0
    assert metrics["qpm"]["n_features_used"] <= config.solver.n_features
    assert 0.0 <= metrics["baseline_top_weights"]["accuracy"] <= 100.0


def test_rerun_reuses_and_n_features_change_recomputes(
    tiny_data: Path, tiny_run: tuple[RunConfig, Path]
) -> None:
    config, run_dir = tiny_run
    dense_mtime = (run_dir / "dense.safetensors").stat().st_mtime_ns
    problem_mtime = (run_dir / "problem.npz").stat().st_mtime_ns
    # The same configuration: nothing recomputed.
    run_pipeline(config, run_dir, device=torch.device("cpu"), stages=("dense", "problem"))
    assert (run_dir / "problem.npz").stat().st_mtime_ns == problem_mtime
    # More features: the problem and the assignment are recomputed, the dense model is not, and
    # the old solution is never reused (the reference code's silent cache bug).
    changed = _tiny_config(tiny_data, n_features=6)
    assert not stage_is_current(changed, run_dir, "problem")
    run_pipeline(changed, run_dir, device=torch.device("cpu"), stages=("problem", "assignment"))
    assert (run_dir / "dense.safetensors").stat().st_mtime_ns == dense_mtime
    assert (run_dir / "problem.npz").stat().st_mtime_ns != problem_mtime
    assignment = Assignment.load(run_dir / "assignment.json")
    assert len(assignment.selected_features) == 6
    assert AssignmentProblem.load(run_dir / "problem.npz").n_features == 6
    # the downstream stages made from the old assignment are no longer current
    assert not stage_is_current(changed, run_dir, "finetune")
    with pytest.raises(PipelineError, match="finetune"):
        run_pipeline(changed, run_dir, device=torch.device("cpu"), stages=("evaluate",))


def test_check_inputs_errors_name_the_problem(tiny_data: Path, tmp_path: Path) -> None:
    good = _tiny_config(tiny_data)
    check_inputs(good)
    with pytest.raises(PipelineError, match="unknown backbone 'resnet99'"):
        check_inputs(apply_overrides(good, ["model.arch=resnet99"]))
    with pytest.raises(PipelineError, match="larger than the"):
        check_inputs(apply_overrides(good, ["solver.n_features=4000", "solver.n_per_class=2"]))
    with pytest.raises(PipelineError, match="image_size_px"):
        check_inputs(apply_overrides(good, ["model.arch=inception_v3", "data.image_size_px=32"]))
    with pytest.raises(PipelineError, match="does not exist"):
        check_inputs(apply_overrides(good, [f"data.root={tmp_path / 'nothing'}"]))
    with pytest.raises(PipelineError, match="weights"):
        check_inputs(apply_overrides(good, [f"model.weights={tmp_path / 'w.pth'}"]))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "images.txt").write_text("1 a/missing.png\n")
    with pytest.raises(PipelineError, match="not usable"):
        check_inputs(apply_overrides(good, [f"data.root={broken}", "data.dataset=cub"]))


def test_the_seed_fixes_the_dense_model(tiny_data: Path, tmp_path: Path) -> None:
    """Two runs with one seed start from the same weights and end with the same dense model."""
    from safetensors.numpy import load_file

    config = _tiny_config(tiny_data)
    for name in ("a", "b"):
        run_pipeline(config, tmp_path / name, device=torch.device("cpu"), stages=("dense",))
    first = load_file(str(tmp_path / "a" / "dense.safetensors"))
    second = load_file(str(tmp_path / "b" / "dense.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    other = apply_overrides(config, ["seed=1"])
    run_pipeline(other, tmp_path / "c", device=torch.device("cpu"), stages=("dense",))
    third = load_file(str(tmp_path / "c" / "dense.safetensors"))
    assert any(not np.array_equal(first[key], third[key]) for key in first)
