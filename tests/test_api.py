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


# ----------------------------------------------------------------------------- CHiQPM sets


def _images(n: int, seed: int) -> torch.Tensor:
    """Random images that differ in colour and contrast, so that the features differ."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, 32, 32, generator=generator)
    scale = torch.rand(n, 3, 1, 1, generator=generator) * 2
    return noise * scale + torch.randn(n, 3, 1, 1, generator=generator)


def _binary_model(*, relu: bool = True, seed: int = 0) -> Any:
    """An untrained tiny QPM (6 classes, 6 features, 2 per class) on the tiny CNN, its
    normalisation fitted to random images so that images are classified differently."""
    import numpy as np

    from openqpm.models import QPMHead, QPMModel, create_backbone

    torch.manual_seed(seed)
    backbone = create_backbone("tiny_cnn").eval()
    selected = [0, 3, 5, 8, 13, 21]
    with torch.no_grad():
        pooled = backbone(_images(200, seed + 100))[:, selected].mean(dim=(2, 3)).numpy()
    pairs = [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5)]
    matrix = np.zeros((6, 6))
    for row, (a, b) in enumerate(pairs):
        matrix[row, [a, b]] = 1
    head = QPMHead(selected, pooled.mean(axis=0), pooled.std(axis=0) + 1e-6, matrix, relu=relu)
    names = [f"class {c}" for c in range(6)]
    return QPMModel(backbone, head, class_names=names).eval()


def _head_outputs(model: Any, images: torch.Tensor) -> tuple[Any, Any]:
    """(logits, head inputs) of transformed images, computed here, not by the API."""
    with torch.no_grad():
        maps = model.forward_features(images)
        return (
            model.forward_head(maps).float().numpy(),
            model.forward_head(maps, pre_logits=True).float().numpy(),
        )


def _fitted(model: Any, *, seed: int = 1) -> Any:
    """A calibration on 60 random images, labelled by the model with a third flipped."""
    import numpy as np

    from openqpm.conformal import Calibration

    logits, activations = _head_outputs(model, _images(60, seed))
    rng = np.random.default_rng(seed)
    labels = logits.argmax(axis=1)
    flipped = rng.random(len(labels)) < 0.33
    labels[flipped] = rng.integers(0, logits.shape[1], int(flipped.sum()))
    weights = model.class_weights().numpy()
    return Calibration.fit(logits, activations, labels, weights)


def test_explain_prediction_sets_equal_the_calibrations() -> None:
    import numpy as np

    from openqpm.conformal import SCORES, hierarchy_levels

    model = _binary_model()
    calibration = _fitted(model)
    weights = model.class_weights().numpy()
    images = _images(6, 7)
    logits, activations = _head_outputs(model, images)
    for alpha in (0.1, 0.3):
        for index, image in enumerate(images):
            explanation = openqpm.explain_prediction(
                model, image, calibration=calibration, alpha=alpha
            )
            assert explanation.alpha == alpha
            assert set(explanation.prediction_sets) == set(SCORES)
            for score in SCORES:
                (expected,) = calibration.prediction_sets(
                    score, logits[index][None], activations[index][None], alpha
                )
                found = explanation.prediction_sets[score]
                assert found.classes == expected.tolist(), (score, alpha, index)
                assert found.class_names == [model.class_names[c] for c in expected]
                assert found.alpha == alpha
            chosen = explanation.calibrated_set
            assert chosen is not None and chosen.score == "hierarchical"
            assert chosen.level == calibration.threshold("hierarchical", alpha)[1]
            assert explanation.prediction_sets["aps"].level is None
            # the hierarchy, as data: the levels of conformal.hierarchy_levels
            hierarchy = explanation.hierarchy
            predicted = int(np.argmax(logits[index]))
            assert hierarchy is not None and hierarchy.prediction == predicted
            levels = hierarchy_levels(activations[index], weights, predicted)
            assert hierarchy.levels == [level.tolist() for level in levels]
            own = np.flatnonzero(weights[predicted])
            assert hierarchy.path == own[np.argsort(-activations[index][own])].tolist()
            text = explanation.text()
            names = ", ".join(chosen.class_names) or "empty"
            assert f"calibrated set (alpha={alpha:g}, hierarchical): {names}" in text
            path = " > ".join(f"f{feature}" for feature in hierarchy.path)
            assert "path: " in text and all(f"f{d}" in text for d in hierarchy.path), path


def test_explain_prediction_sets_grow_as_alpha_shrinks() -> None:
    model = _binary_model()
    calibration = _fitted(model)
    sizes = []
    for image in _images(8, 11):
        small = openqpm.explain_prediction(model, image, calibration=calibration, alpha=0.4)
        large = openqpm.explain_prediction(model, image, calibration=calibration, alpha=0.02)
        for score in ("aps", "thr"):  # nested in alpha (the hierarchical level may move)
            assert set(small.prediction_sets[score].classes) <= set(
                large.prediction_sets[score].classes
            )
        sizes.append(
            (len(small.prediction_sets["thr"].classes), len(large.prediction_sets["thr"].classes))
        )
    assert any(a < b for a, b in sizes), sizes


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_explain_prediction_refuses_alpha_outside_zero_one(alpha: float) -> None:
    model = _binary_model()
    with pytest.raises(ValueError, match="alpha"):
        openqpm.explain_prediction(model, torch.randn(3, 32, 32), alpha=alpha)


def test_explain_prediction_without_calibration_and_other_heads() -> None:
    from openqpm.models import DenseHead, QPMModel, create_backbone

    image = torch.randn(3, 32, 32)
    model = _binary_model()
    plain = openqpm.explain_prediction(model, image)
    assert plain.hierarchy is not None and plain.prediction_sets == {} and plain.alpha is None
    assert "path: f" in plain.text() and "calibrated set" not in plain.text()
    # a dense head: no hierarchy, no error; a calibration cannot belong to it
    dense = QPMModel(create_backbone("tiny_cnn"), DenseHead(32, 6), class_names=model.class_names)
    explanation = openqpm.explain_prediction(dense.eval(), image)
    assert explanation.hierarchy is None and explanation.prediction_sets == {}
    assert "path:" not in explanation.text()
    with pytest.raises(ValueError, match="binary"):
        openqpm.explain_prediction(dense, image, calibration=_fitted(model))
    # a calibration of another QPM (other class-feature matrix) is refused
    other = _binary_model(seed=3)
    matrix = other.head.class_feature_matrix
    other.head.class_feature_matrix = matrix[[1, 0, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="another model"):
        openqpm.explain_prediction(other, image, calibration=_fitted(model))
