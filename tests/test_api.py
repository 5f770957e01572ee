"""The Python API: the README's "From Python" block, typed results, progress, CLI parity."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from tests._tiny import tiny_config
from tests._tiny import tiny_data as make_tiny_data

import openqpm
from openqpm.cli import main
from openqpm.config import apply_overrides, load_config, save_config
from openqpm.stages import Reporter, stage_hash, stages_for

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## From Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert match is not None, "README: no python block under 'From Python'"
    return match.group(1)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("api") / "synthetic")


def test_readme_from_python_block_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_block(), "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "tiny"
    state = json.loads((run_dir / "stages.json").read_text())
    assert set(state) == set(stages_for(load_config(run_dir / "config.yaml")))
    # the printed explanation names the predicted class and the contrast
    assert ", not " in out and "margin" in out


class _Recorder(Reporter):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def stage_started(self, stage: str, description: str) -> None:
        self.events.append(("started", stage))

    def stage_skipped(self, stage: str, reason: str) -> None:
        self.events.append(("skipped", stage))

    def training_progress(self, stage: str, event: Any) -> None:
        self.events.append(("training", event))

    def solver_progress(self, event: Any) -> None:
        self.events.append(("solver", event))


def test_run_returns_typed_results_and_reports_progress(tiny_data: Path, tmp_path: Path) -> None:
    from openqpm.solver.problem import SolverProgress
    from openqpm.training import TrainingProgress

    config = tiny_config(tiny_data)
    recorder = _Recorder()
    result = openqpm.run(config, tmp_path / "run", device="cpu", reporter=recorder)
    assert list(result.summaries) == list(stages_for(config))
    assert result.stage_hashes == {name: stage_hash(config, name) for name in stages_for(config)}
    assert result.paths("finetune") == [tmp_path / "run" / "qpm.safetensors"]
    assert result.metrics is not None and 0 <= result.metrics["qpm"]["accuracy"] <= 100
    assignment = result.assignment
    assert assignment is not None and len(assignment.selected_features) == 5
    kinds = {kind for kind, _ in recorder.events}
    assert {"started", "training", "solver"} <= kinds
    assert all(
        isinstance(event, TrainingProgress) for kind, event in recorder.events if kind == "training"
    )
    assert all(
        isinstance(event, SolverProgress) for kind, event in recorder.events if kind == "solver"
    )
    # one stage on a finished run: skipped, nothing recomputed
    again = _Recorder()
    openqpm.run(config, tmp_path / "run", stages=["assignment"], device="cpu", reporter=again)
    assert again.events == [("skipped", "assignment")]

    # predict and explain one test image with the run's own transform
    model = result.load_model()
    image = min((tiny_data / "images").glob("*/*.png"))
    prediction = openqpm.predict(model, [image], top_k=3)[0]
    assert len(prediction.top_classes) == 3
    scores = [c.score for c in prediction.top_classes]
    assert scores == sorted(scores, reverse=True)
    # a QPM class's score is exactly the sum of its features' contributions
    assert len(prediction.features) == 2
    total = sum(f.contribution for f in prediction.features)
    assert total == pytest.approx(prediction.top_classes[0].score, abs=1e-4)
    selected = set(assignment.selected_features)
    assert {f.channel for f in prediction.features} <= selected
    explanation = openqpm.explain_prediction(
        model, image, versus=prediction.top_classes[2].class_name
    )
    assert explanation.predicted == prediction.top_classes[0]
    assert explanation.versus == prediction.top_classes[2]
    pred_set = {f.feature for f in explanation.predicted_features}
    versus_set = {f.feature for f in explanation.versus_features}
    assert set(explanation.shared) == pred_set & versus_set
    assert set(explanation.predicted_only) == pred_set - versus_set
    assert explanation.predicted.class_name in explanation.text()
    with pytest.raises(ValueError, match="not a class"):
        openqpm.explain_prediction(model, image, versus="No such bird")


def test_cli_and_api_make_the_same_stages(tiny_data: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_data)
    save_config(config, tmp_path / "tiny.yaml")
    cli_run = tmp_path / "cli"
    argv = ["train", "--config", str(tmp_path / "tiny.yaml"), "--run-dir", str(cli_run)]
    assert main(argv) == 0
    api_result = openqpm.run(str(tmp_path / "tiny.yaml"), tmp_path / "api")
    cli_state = json.loads((cli_run / "stages.json").read_text())
    api_state = json.loads((tmp_path / "api" / "stages.json").read_text())
    assert {k: v["hash"] for k, v in cli_state.items()} == api_result.stage_hashes
    assert {k: v["hash"] for k, v in api_state.items()} == api_result.stage_hashes

    def artifacts(run_dir: Path) -> list[Path]:
        # the report's figures depend on the trained weights; everything else is named by stage
        files = (p.relative_to(run_dir) for p in run_dir.rglob("*") if p.is_file())
        return sorted(p for p in files if p.parts[0] != "report")

    assert artifacts(cli_run) == artifacts(api_result.run_dir)
    assert (cli_run / "report" / "index.html").is_file()
    checkpoints = {p.name for p in (cli_run / "checkpoints").iterdir()}
    assert f"dense-{api_result.stage_hashes['dense']}.safetensors" in checkpoints


def test_resolve_device_names_bad_values() -> None:
    assert openqpm.resolve_device("cpu") == torch.device("cpu")
    assert openqpm.resolve_device("auto").type in {"cpu", "cuda"}
    with pytest.raises(openqpm.ConfigError, match="gpu"):
        openqpm.resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(openqpm.ConfigError, match="CUDA is not available"):
            openqpm.resolve_device("cuda")


def test_overrides_apply_to_named_and_path_configs(tmp_path: Path) -> None:
    config = apply_overrides(load_config("demo"), {"solver.n_features": 12})
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").solver.n_features == 12
