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


# ---------------------------------------------------------------------------------------------
# expected errors: one line on stderr, a non-zero exit, the traceback only with -v


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line on stderr, checked to be the only one (progress lines "[stage] ..." aside)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("openqpm: "), err
    return lines[0]


def _problem_files(folder: Path) -> dict[str, Path]:
    """Problem files that cannot be solved, each broken in another way."""
    rng = np.random.default_rng(0)
    A = rng.uniform(-1, 1, size=(4, 8))
    R = np.zeros((8, 8))
    sizes = {"n_features": 4, "n_per_class": 2}
    files = {name: folder / f"{name}.npz" for name in ("nan", "asymmetric", "shapes", "no_keys")}
    np.savez(files["nan"], A=np.where(np.eye(4, 8) > 0, np.nan, A), R=R, b=np.zeros(8), **sizes)
    asymmetric = R.copy()
    asymmetric[0, 1] = 0.5
    np.savez(files["asymmetric"], A=A, R=asymmetric, b=np.zeros(8), **sizes)
    np.savez(files["shapes"], A=A, R=np.zeros((7, 7)), b=np.zeros(8), **sizes)
    np.savez(files["no_keys"])
    files["empty"] = folder / "empty.npz"
    files["empty"].write_bytes(b"")
    return files


@pytest.mark.parametrize(
    ("broken", "said"),
    [
        ("nan", "finite"),
        ("asymmetric", "symmetric"),
        ("shapes", "shape"),
        ("no_keys", "missing key"),
        ("empty", "not a readable npz"),
    ],
)
def test_a_broken_problem_file_is_one_line(
    broken: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _problem_files(tmp_path)[broken]
    assert main(["solve", str(path)]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and said in line
    assert not (tmp_path / "assignment.json").exists()


def test_verbose_adds_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _problem_files(tmp_path)["nan"]
    assert main(["-v", "solve", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("openqpm: error:")


def test_a_bad_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from openqpm.config import apply_overrides, load_config
    from openqpm.data.synthetic import make_synthetic
    from openqpm.stages import stage_hash

    data = make_synthetic(tmp_path / "data", n_classes=4, n_images_per_class=6, image_size_px=32)
    assert main(_argv(tmp_path, str(data))) == 0
    config = load_config(tmp_path / "run" / "config.yaml")
    digest = stage_hash(apply_overrides(config, {"dense.epochs": 1}), "dense")
    checkpoint = tmp_path / "run" / "checkpoints" / f"dense-{digest}.safetensors"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(_argv(tmp_path, str(data), "--epochs-dense", "1", "--resume")) == 2
    assert str(checkpoint) in _one_error_line(capsys)


def test_a_permission_error_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from openqpm.data import synthetic

    denied = tmp_path / "locked" / "images.txt"

    def refuse(*args: object, **kwargs: object) -> Path:
        raise PermissionError(13, "Permission denied", str(denied))

    monkeypatch.setattr(synthetic, "make_synthetic", refuse)
    assert main(["data", "make-synthetic", str(tmp_path / "locked")]) == 2
    line = _one_error_line(capsys)
    assert str(denied) in line and "Permission denied" in line


def test_a_config_file_that_is_not_utf8_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "latin1.yaml"
    config.write_bytes("data:\n  root: Donnée\n".encode("latin-1"))
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    line = _one_error_line(capsys)
    assert str(config) in line and "UTF-8" in line


def test_an_unknown_device_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dense", "--run-dir", str(tmp_path / "r"), "--device", "gpu"]) == 2
    line = _one_error_line(capsys)
    assert "'gpu'" in line and "cuda" in line


def test_make_synthetic_into_a_folder_in_use_suggests_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "syn"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    argv = ["data", "make-synthetic", str(out), "--classes", "4", "--images-per-class", "4"]
    assert main([*argv, "--size", "32"]) == 2
    line = _one_error_line(capsys)
    assert str(out) in line and "--overwrite" in line and "overwrite=True" not in line
    assert (out / "mine.txt").is_file()
    assert main([*argv, "--size", "32", "--overwrite"]) == 0
    assert not (out / "mine.txt").exists() and (out / "images.txt").is_file()


# ---------------------------------------------------------------------------------------------
# Ctrl-C: --resume is suggested only to the commands that take it


@pytest.mark.parametrize(
    ("argv", "patched", "hint"),
    [
        (["train", "--run-dir", "r"], "_run_stages", "with --resume"),
        (["dense", "r", "--resume"], "_run_stages", "again"),
        (["demo"], "_cmd_demo", "again"),
        (["compare", "r"], "_cmd_compare", None),
        (["data", "make-synthetic", "d"], "_cmd_data_make_synthetic", None),
        (["solve", "p.npz"], "_cmd_solve", None),
    ],
)
def test_the_interrupt_message_fits_the_command(
    argv: list[str],
    patched: str,
    hint: str | None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from openqpm import cli

    def interrupted(*args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, patched, interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err
    if hint is None:
        assert "--resume" not in err and "continue" not in err
    else:
        assert hint in err
        assert ("--resume" in err) == (hint == "with --resume")


# ---------------------------------------------------------------------------------------------
# openqpm solve: every flag is applied, or refused in one line


def test_solve_of_a_run_applies_every_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from openqpm.cli import _SOLVE_FLAGS

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    values = {
        "--dataset": "cub",
        "--data-root": str(tmp_path / "birds"),
        "--arch": "tiny_cnn",
        "--weights": str(weights),
        "--image-size": "48",
        "--n-features": "7",
        "--n-per-class": "3",
        "--epochs-dense": "2",
        "--epochs-finetune": "3",
        "--batch-size": "4",
        "--calibration-fraction": "0.2",
        "--method": "search",
        "--time-limit": "1.5",
        "--seed": "9",
        "--device": "cpu",
    }
    assert {flag.flag for flag in _SOLVE_FLAGS} == set(values)  # a new flag gets a value here
    run_dir = tmp_path / "run"
    argv = ["solve", "--run-dir", str(run_dir)]
    for flag, value in values.items():
        argv += [flag, value]
    # no features pass in the run: the stage refuses, after writing the configuration
    assert main(argv) == 2
    assert "needs stage features" in _one_error_line(capsys)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for flag in _SOLVE_FLAGS:
        section, _, name = flag.field.rpartition(".")
        stored = saved[section][name] if section else saved[name]
        assert stored == flag.type(values[flag.flag]), flag.flag


@pytest.mark.parametrize("limit", ["0", "inf", "-3", "nan"])
@pytest.mark.parametrize("target", ["run", "file"])
def test_solve_refuses_a_time_limit_that_is_not_positive_and_finite(
    limit: str, target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(1)
    problem = AssignmentProblem(rng.uniform(-1, 1, (4, 8)), np.zeros((8, 8)), np.zeros(8), 4, 2)
    problem.save(tmp_path / "problem.npz")
    where = (
        ["--run-dir", str(tmp_path / "r")] if target == "run" else [str(tmp_path / "problem.npz")]
    )
    assert main(["solve", *where, "--time-limit", limit]) == 2
    assert "solver.time_limit_s" in _one_error_line(capsys)
    assert not (tmp_path / "assignment.json").exists()


@pytest.mark.parametrize("target", ["run", "file"])
def test_solve_names_the_valid_methods(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(1)
    problem = AssignmentProblem(rng.uniform(-1, 1, (4, 8)), np.zeros((8, 8)), np.zeros(8), 4, 2)
    problem.save(tmp_path / "problem.npz")
    where = (
        ["--run-dir", str(tmp_path / "r")] if target == "run" else [str(tmp_path / "problem.npz")]
    )
    assert main(["solve", *where, "--method", "foo", "--time-limit", "1"]) == 2
    line = _one_error_line(capsys)
    assert "'foo'" in line
    for method in ("auto", "search", "milp", "paper", "gurobi", "scip"):
        assert method in line


def test_ctrl_c_during_solve_writes_the_best_assignment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from openqpm import solver
    from openqpm.solver import SolveInterrupted, solve

    rng = np.random.default_rng(1)
    problem = AssignmentProblem(rng.normal(size=(5, 10)), np.zeros((10, 10)), np.zeros(10), 4, 2)
    problem.save(tmp_path / "problem.npz")
    best = solve(problem, method="search", time_limit_s=1, seed=0, max_iterations=2)

    def interrupted(*args: object, **kwargs: object) -> object:
        raise SolveInterrupted(best)

    monkeypatch.setattr(solver, "solve", interrupted)
    out = tmp_path / "assignment.json"
    assert main(["solve", str(tmp_path / "problem.npz"), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "best assignment so far" in err and str(out) in err
    assert Assignment.load(out).objective == pytest.approx(best.objective)


def test_explain_predict_and_app_take_method_alpha_and_tree_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command, flags in (
        ("explain", ("--method", "--alpha", "--tree-out")),
        ("predict", ("--method",)),
        ("app", ("--method",)),
    ):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert all(flag in out for flag in flags), (command, out)
    # --alpha out of (0, 1): one line, before any run is read
    image = tmp_path / "image.png"
    for bad in ("0", "1", "-0.5", "nan"):
        assert main(["explain", str(tmp_path), str(image), "--alpha", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert "--alpha must be in (0, 1)" in err and len(err.splitlines()) == 1
    # an unknown method: named, with the valid ones
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert main(["explain", str(tmp_path), str(image), "--method", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "chiqpm" in err


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_every_torch_command_takes_the_thread_count(command, tmp_path, capsys) -> None:
    import torch

    before = torch.get_num_threads()
    extra = {"predict": ["run", "image.png"], "explain": ["run", "image.png"]}
    try:
        # an invalid count is refused before the command looks at its arguments' files
        assert main(["--threads", "0", command, *extra[command]]) != 0
        assert "--threads must be at least 1" in capsys.readouterr().err
        # a valid one is applied even though the command then fails on the missing run
        main(["--threads", "1", command, *extra[command]])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
