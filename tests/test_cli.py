"""The command line: help, version, data commands, the stand-alone solve, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
