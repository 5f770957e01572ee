"""The command line: help, version, data commands, the stand-alone solve, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import openqpm
from openqpm.cli import main
from openqpm.solver import AssignmentProblem
from openqpm.solver.problem import Assignment, validate_assignment


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert openqpm.__version__ in capsys.readouterr().out
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("demo", "train", "solve", "evaluate", "report", "data"):
        assert command in out


def test_console_script_is_installed() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "openqpm.cli", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "openqpm" in result.stdout


def test_make_synthetic_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "syn"
    preview = tmp_path / "grid.png"
    code = main(
        [
            "data",
            "make-synthetic",
            str(out),
            "--classes",
            "4",
            "--images-per-class",
            "6",
            "--size",
            "32",
            "--seed",
            "2",
            "--preview",
            str(preview),
        ]
    )
    assert code == 0
    assert (out / "images.txt").is_file() and preview.stat().st_size > 0
    assert main(["data", "check", str(out)]) == 0
    assert "usable" in capsys.readouterr().out
    # break it: remove one image; the check names that file and fails
    first = (out / "images.txt").read_text().split("\n")[0].split()[1]
    (out / "images" / first).unlink()
    assert main(["data", "check", str(out)]) != 0
    assert Path(first).name in capsys.readouterr().out


def test_solve_command_writes_a_valid_assignment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    n_classes, n_all = 6, 12
    A = rng.normal(size=(n_classes, n_all))
    A /= np.abs(A).max()
    R = np.zeros((n_all, n_all))
    R[0, 1] = R[1, 0] = 0.5
    problem = AssignmentProblem(A, R, rng.normal(scale=0.1, size=n_all), 5, 2)
    problem.save(tmp_path / "problem.npz")
    out = tmp_path / "assignment.json"
    code = main(["solve", str(tmp_path / "problem.npz"), "--time-limit", "5", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert "objective" in printed.out and "gap" in printed.out
    assignment = Assignment.load(out)
    validate_assignment(problem, assignment)
    saved = json.loads(out.read_text())
    for key in ("selected_features", "class_features", "objective", "bound", "gap"):
        assert key in saved


def test_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "train",
            "--run-dir",
            str(tmp_path / "r"),
            "--data-root",
            str(tmp_path / "none"),
            "--dataset",
            "cub",
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    code = main(["train", "--run-dir", str(tmp_path / "r"), "--set", "solver.n_featurez=3"])
    assert code == 2
    assert "n_featurez" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """The README's first command (takes minutes: marked slow)."""
    assert main(["demo", "--run-dir", str(tmp_path / "demo")]) == 0
    assert (tmp_path / "demo" / "report" / "index.html").is_file()
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["qpm"]["accuracy"] > 50.0


def _argv(tmp_path: Path, data_root: str, *extra: str) -> list[str]:
    return [
        "dense",
        "--run-dir",
        str(tmp_path / "run"),
        "--data-root",
        data_root,
        "--dataset",
        "synthetic",
        "--arch",
        "tiny_cnn",
        "--image-size",
        "32",
        "--epochs-dense",
        "0",
        "--n-features",
        "5",
        "--n-per-class",
        "2",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.mark.parametrize("folder", ["no", "2024_01"])
def test_flag_values_reach_config_yaml_unchanged(
    folder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--data-root no` was stored as "False" and `--data-root 2024_01` as "202401"."""
    from openqpm.data.synthetic import make_synthetic

    monkeypatch.chdir(tmp_path)
    make_synthetic(tmp_path / folder, n_classes=4, n_images_per_class=6, image_size_px=32)
    assert main(_argv(tmp_path, folder)) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["root"] == folder
    assert saved["model"]["arch"] == "tiny_cnn" and saved["dense"]["epochs"] == 0


def test_unknown_solver_method_fails_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the data root does not exist either: the method is checked first, in well under a second
    argv = _argv(tmp_path, str(tmp_path / "missing"), "--set", "solver.method=fancy")
    argv[0] = "train"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "solver.method='fancy'" in err
    for method in ("auto", "search", "milp", "paper", "gurobi", "scip"):
        assert method in err
    assert not (tmp_path / "run").exists()
    code = main(["solve", "--run-dir", str(tmp_path / "run"), "--method", "nope"])
    assert code == 2 and "solver.method='nope'" in capsys.readouterr().err


def test_solve_of_a_file_refuses_run_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["solve", str(tmp_path / "p.npz"), "--n-features", "3"]) == 2
    assert "--n-features" in capsys.readouterr().err


def test_configs_command_lists_the_shipped_configs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    for name in ("cub_resnet50", "imagenet_resnet50", "demo", "cars_resnet50"):
        assert name in out


def test_progress_in_a_log_file_is_a_line_per_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    from openqpm.cli import _ConsoleReporter
    from openqpm.training import TrainingProgress

    reporter = _ConsoleReporter(interactive=False)
    for epoch in (1, 2, 3):
        for step in range(1, 201):
            event = TrainingProgress(
                epoch=epoch,
                n_epochs=3,
                step=step,
                n_steps=200,
                loss=1.0,
                accuracy=0.5,
                lr=0.1,
                elapsed_s=1.0,
                eta_s=10.0,
            )
            reporter.training_progress("dense", event)
        reporter.pass_progress("features", epoch, 3)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert sum("epoch" in line for line in lines) == 3
    assert sum(line.startswith("[features]") for line in lines) == 1


def test_non_editable_install_finds_its_configs(tmp_path: Path) -> None:
    """A wheel installed elsewhere ships the configs: found by name, from another folder."""
    import shutil

    # build from a copy, so that the build leaves nothing in the source tree
    source = tmp_path / "source"
    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    target = tmp_path / "site"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    command += ["-q", "--target", str(target), str(source)]
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    listing = subprocess.run(
        [sys.executable, "-m", "openqpm.cli", "configs"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    assert "cub_resnet50" in listing.stdout and "imagenet_resnet50" in listing.stdout
    check = subprocess.run(
        [sys.executable, "-c", "import openqpm; print(openqpm.__file__)"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        check=True,
    )
    assert str(target) in check.stdout  # the installed copy, not the source tree
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "openqpm.cli",
            "train",
            "--config",
            "cub_resnet50",
            "--data-root",
            "MISSING",
            "--run-dir",
            "r",
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        check=False,
    )
    assert train.returncode == 2
    assert "MISSING" in train.stderr and "config" not in train.stderr.lower()
