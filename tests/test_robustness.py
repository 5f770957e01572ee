"""Runs that cannot silently go wrong: the run lock, checksummed artifacts, modes, reruns."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tests._tiny import StartedStages

import openqpm
from openqpm import pipeline
from openqpm.config import RunConfig, apply_overrides, with_overrides
from openqpm.pipeline import (
    LOCK_FILE,
    PipelineError,
    Reporter,
    read_stage_state,
    run_pipeline,
    stage_is_current,
)
from openqpm.stages import stage_hash, stages_for

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openqpm.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("data") / "synthetic"
    return make_synthetic(root, n_classes=4, n_images_per_class=12, image_size_px=32, seed=5)


def _config(root: Path, **changes: Any) -> RunConfig:
    config = with_overrides(
        RunConfig(),
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
        solver={"n_features": 5, "n_per_class": 2, "time_limit_s": 5.0, "method": "search"},
    )
    config = apply_overrides(config, ["device=cpu", "amp=false", "report_max_classes=2"])
    return apply_overrides(config, changes)


@pytest.fixture(scope="module")
def finished_run(
    tiny_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[RunConfig, Path]:
    """A complete tiny run, made under umask 027 (so the modes it gets can be checked)."""
    config = _config(tiny_data)
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    previous = os.umask(0o027)
    try:
        run_pipeline(config, run_dir, device=CPU)
    finally:
        os.umask(previous)
    return config, run_dir


@pytest.fixture
def sleeping_process() -> Iterator[int]:
    """The pid of a live process (another run, as far as a lock can tell)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(run_dir: Path, pid: int) -> Path:
    import socket

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    holder = {"pid": pid, "host": socket.gethostname(), "started_at": "2024-01-01T00:00:00"}
    lock.write_text(json.dumps(holder), encoding="utf-8")
    return lock


def _snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(run_dir)): (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in run_dir.rglob("*")
    }


# ----------------------------------------------------------------------------- 1. the lock


def test_a_held_lock_stops_a_second_run_at_once(
    tiny_data: Path, tmp_path: Path, sleeping_process: int
) -> None:
    run_dir = tmp_path / "run"
    lock = _write_lock(run_dir, sleeping_process)
    before = lock.read_text()
    with pytest.raises(PipelineError, match=rf"pid {sleeping_process}\b"):
        run_pipeline(_config(tiny_data), run_dir, device=CPU, stages=("dense",))
    assert lock.read_text() == before  # the holder's lock is left alone
    assert not (run_dir / "dense.safetensors").exists()
    assert not (run_dir / "stages.json").exists()


def test_a_stale_lock_is_taken_over_and_released(
    finished_run: tuple[RunConfig, Path], caplog: pytest.LogCaptureFixture
) -> None:
    config, run_dir = finished_run
    dead = _dead_pid()
    lock = _write_lock(run_dir, dead)
    with caplog.at_level("WARNING", logger="openqpm.pipeline"):
        summaries = run_pipeline(config, run_dir, device=CPU)
    assert set(summaries) == set(stages_for(config))
    assert str(dead) in caplog.text and "stale" in caplog.text
    assert not lock.exists()


def test_the_lock_is_released_when_a_run_fails(tiny_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(PipelineError, match="needs stage"):
        run_pipeline(_config(tiny_data), run_dir, device=CPU, stages=("evaluate",))
    assert run_dir.is_dir() and not (run_dir / LOCK_FILE).exists()


def test_a_run_holds_the_lock_while_its_stages_run(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one run works, a second on the same directory fails naming the first's pid."""
    run_dir = tmp_path / "run"
    seen: dict[str, Any] = {}

    class _Second(Reporter):
        def stage_started(self, stage: str, description: str) -> None:
            seen["lock"] = json.loads((run_dir / LOCK_FILE).read_text())
            with pytest.raises(PipelineError) as second:
                run_pipeline(_config(tiny_data), run_dir, device=CPU, stages=("dense",))
            seen["error"] = str(second.value)

    run_pipeline(
        _config(tiny_data, **{"dense.epochs": 0}),
        run_dir,
        device=CPU,
        stages=("dense",),
        reporter=_Second(),
    )
    assert seen["lock"]["pid"] == os.getpid()
    assert f"pid {os.getpid()}" in seen["error"]
    assert not (run_dir / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- 2. checksums


def test_a_truncated_or_changed_artifact_is_recomputed(tiny_data: Path, tmp_path: Path) -> None:
    config = _config(tiny_data)
    run_dir = tmp_path / "run"
    stages = ("dense", "features")
    run_pipeline(config, run_dir, device=CPU, stages=stages)
    entry = read_stage_state(run_dir)["dense"]
    dense = run_dir / "dense.safetensors"
    assert entry["outputs"]["dense.safetensors"]["size"] == dense.stat().st_size
    assert set(read_stage_state(run_dir)["features"]["outputs"]) == {"features"}

    # a copy cut short: the record still matches by hash, the file does not
    intact = dense.read_bytes()
    dense.write_bytes(intact[: len(intact) // 2])
    assert not stage_is_current(config, run_dir, "dense")
    reporter = StartedStages()
    run_pipeline(config, run_dir, device=CPU, stages=stages, reporter=reporter)
    assert reporter.started == ["dense", "features"]  # and what was made from it
    assert dense.stat().st_size == len(intact)
    assert openqpm.load(dense).n_classes == 4

    # one changed byte inside a folder output
    statistics = run_dir / "features" / "feature_pass.json"
    text = statistics.read_text()
    statistics.write_text(text.replace('"', " ", 1))
    assert not stage_is_current(config, run_dir, "features")
    assert stage_is_current(config, run_dir, "dense")
    reporter = StartedStages()
    run_pipeline(config, run_dir, device=CPU, stages=stages, reporter=reporter)
    assert reporter.started == ["features"]


def test_records_without_checksums_are_trusted_then_given_them(
    tiny_data: Path, tmp_path: Path
) -> None:
    config = _config(tiny_data, **{"dense.epochs": 0})
    run_dir = tmp_path / "run"
    run_pipeline(config, run_dir, device=CPU, stages=("dense",))
    state = read_stage_state(run_dir)
    recorded = state["dense"].pop("outputs")
    (run_dir / "stages.json").write_text(json.dumps(state))  # as an older openqpm wrote it
    assert stage_is_current(config, run_dir, "dense")
    reporter = StartedStages()
    run_pipeline(config, run_dir, device=CPU, stages=("dense",), reporter=reporter)
    assert reporter.started == []
    assert read_stage_state(run_dir)["dense"]["outputs"] == recorded


# ----------------------------------------------------------------------------- 6. file modes


def test_artifacts_respect_the_umask(finished_run: tuple[RunConfig, Path]) -> None:
    _, run_dir = finished_run
    paths = [run_dir, *run_dir.rglob("*")]
    assert len(paths) > 20
    wrong = []
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = 0o750 if path.is_dir() else 0o640
        if mode != expected:
            wrong.append(f"{path.relative_to(run_dir)}: {oct(mode)}")
    assert not wrong, wrong
    assert (run_dir / "report" / "index.html").is_file()


# ----------------------------------------------------------------------------- 7. reruns


def test_a_finished_run_reruns_without_writing_anything(
    finished_run: tuple[RunConfig, Path],
) -> None:
    config, run_dir = finished_run
    before = _snapshot(run_dir)
    time.sleep(0.01)  # a rewrite would get another mtime
    run_pipeline(config, run_dir, device=CPU)
    assert _snapshot(run_dir) == before  # config.yaml and stages.json included


def test_a_read_only_run_directory_can_be_read_but_not_computed_in(
    finished_run: tuple[RunConfig, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, run_dir = finished_run
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(str(run_dir)) and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(pipeline.os, "open", read_only)
    before = _snapshot(run_dir)
    summaries = run_pipeline(config, run_dir, device=CPU)
    assert "report" in summaries and _snapshot(run_dir) == before
    changed = apply_overrides(config, {"finetune.epochs": 2})
    with pytest.raises(PipelineError, match="cannot be written"):
        run_pipeline(changed, run_dir, device=CPU)


def test_a_finished_stage_deletes_its_checkpoints_of_other_configurations(
    tiny_data: Path, tmp_path: Path
) -> None:
    config = _config(tiny_data)
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    superseded = ["dense-0123456789abcdef.safetensors", "dense-round1-fedcba9876543210.safetensors"]
    kept = ["finetune-0123456789abcdef.safetensors", "notes.txt", "dense-latest.safetensors"]
    for name in superseded + kept:
        (checkpoints / name).write_bytes(b"x")
    run_pipeline(config, run_dir, device=CPU, stages=("dense",))
    current = f"dense-{stage_hash(config, 'dense')}.safetensors"
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted([current, *kept])
