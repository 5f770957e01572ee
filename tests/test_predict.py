"""``openqpm predict`` / ``openqpm explain`` and :func:`openqpm.predict` on a tiny finished run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests._tiny import tiny_run_dir

import openqpm
from openqpm.app._loaded import load_run
from openqpm.cli import main
from openqpm.config import load_config
from openqpm.data._base import DatasetError
from openqpm.stages import PipelineError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run_dir(tmp_path_factory.mktemp("predict"))


@pytest.fixture(scope="module")
def images(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A normal test image and the awkward files: corrupt, grey, RGBA, 16-bit, a folder."""
    out = tmp_path_factory.mktemp("images")
    data_root = Path(load_config(tiny_run / "config.yaml").data.root)
    source = min((data_root / "images").rglob("*.png"))
    normal = out / "normal.png"
    shutil.copy(source, normal)
    rgb = Image.open(source).convert("RGB")
    corrupt = out / "corrupt.png"
    corrupt.write_bytes(normal.read_bytes()[:60])  # a truncated PNG
    grey = out / "grey.png"
    rgb.convert("L").save(grey)
    rgba = out / "rgba.png"
    rgb.convert("RGBA").save(rgba)
    deep = out / "deep16.png"
    values = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(values).save(deep)  # uint16: mode I;16
    assert Image.open(deep).mode in ("I;16", "I")
    folder = out / "folder"
    folder.mkdir()
    shutil.copy(source, folder / "b.png")
    shutil.copy(grey, folder / "a.png")
    (folder / "notes.txt").write_text("not an image\n")
    return {
        "normal": normal,
        "corrupt": corrupt,
        "grey": grey,
        "rgba": rgba,
        "deep": deep,
        "folder": folder,
    }


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["normal", "grey", "rgba", "deep"])
def test_predict_cli_json_matches_python(
    tiny_run: Path, images: dict[str, Path], name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(tiny_run), str(images[name]), "--json", "--top-k", "3"]) == 0
    (record,) = _json_lines(capsys.readouterr().out)
    loaded = load_run(tiny_run)
    (expected,) = openqpm.predict(loaded.model, [images[name]], top_k=3)
    assert record["path"] == str(images[name])
    got = record["top_classes"]
    assert isinstance(got, list) and len(got) == 3
    assert [c["class_name"] for c in got] == [c.class_name for c in expected.top_classes]
    for item, want in zip(got, expected.top_classes):
        assert abs(item["score"] - want.score) < 1e-5
    # a QPM: the top class's score is the sum of its features' contributions
    features = record["features"]
    assert isinstance(features, list) and features
    total = sum(f["contribution"] for f in features)
    assert abs(total - got[0]["score"]) < 1e-3 * max(1.0, abs(total))


def test_predict_batched_equals_one_by_one(tiny_run: Path, images: dict[str, Path]) -> None:
    model = load_run(tiny_run).model
    paths = [images[n] for n in ("normal", "grey", "rgba", "deep")]
    together = openqpm.predict(model, paths, top_k=2, batch_size=3)
    for path, batched in zip(paths, together):
        (alone,) = openqpm.predict(model, [path], top_k=2)
        assert [c.class_index for c in batched.top_classes] == [
            c.class_index for c in alone.top_classes
        ]
        assert np.allclose(
            [c.score for c in batched.top_classes], [c.score for c in alone.top_classes], atol=1e-4
        )


def test_sixteen_bit_is_scaled_not_clipped(tiny_run: Path, images: dict[str, Path]) -> None:
    model = load_run(tiny_run).model
    (grey,) = openqpm.predict(model, [images["grey"]], top_k=4)
    (deep,) = openqpm.predict(model, [images["deep"]], top_k=4)
    # the 16-bit copy of the grey image reads as the same picture
    assert [c.class_index for c in grey.top_classes] == [c.class_index for c in deep.top_classes]
    assert np.allclose(
        [c.score for c in grey.top_classes], [c.score for c in deep.top_classes], rtol=1e-3
    )


def test_predict_corrupt_file(
    tiny_run: Path, images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["predict", str(tiny_run), str(images["corrupt"]), str(images["normal"])])
    captured = capsys.readouterr()
    assert code == 1
    assert str(images["corrupt"]) in captured.err
    assert str(images["normal"]) in captured.out  # the rest is still classified
    assert "score = sum" in captured.out
    with pytest.raises(DatasetError, match="corrupt.png"):
        openqpm.predict(load_run(tiny_run).model, [images["corrupt"]])


def test_predict_folder_with_text_file(
    tiny_run: Path, images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["predict", str(tiny_run), str(images["folder"]), "--json", "--top-k", "2"])
    captured = capsys.readouterr()
    assert code == 1
    assert "notes.txt" in captured.err
    records = _json_lines(captured.out)
    assert [Path(str(r["path"])).name for r in records] == ["a.png", "b.png"]  # sorted


def test_predict_dense_model(
    tiny_run: Path, images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["predict", str(tiny_run), str(images["normal"]), "--model", "dense", "--json"]
    assert main(args) == 0
    (record,) = _json_lines(capsys.readouterr().out)
    dense = load_run(tiny_run, which="dense").model
    (expected,) = openqpm.predict(dense, [images["normal"]], top_k=5)
    assert [c["class_index"] for c in record["top_classes"]] == [  # type: ignore[union-attr]
        c.class_index for c in expected.top_classes
    ]


def test_predict_all_good_exit_zero_text(
    tiny_run: Path, images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(tiny_run), str(images["normal"]), str(images["rgba"])]) == 0
    out = capsys.readouterr().out
    assert out.count("score = sum") == 2


def test_predict_not_a_run(tmp_path: Path, images: dict[str, Path]) -> None:
    assert main(["predict", str(tmp_path), str(images["normal"])]) == 2


@pytest.mark.parametrize("name", ["normal", "grey", "rgba", "deep"])
def test_explain_cli_writes_figure(
    tiny_run: Path,
    images: dict[str, Path],
    name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "fig.png"
    assert main(["explain", str(tiny_run), str(images[name]), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    model = load_run(tiny_run).model
    expected = openqpm.explain_prediction(model, images[name]).text()
    assert text.strip() == expected.strip()
    assert out.is_file() and out.stat().st_size > 1000
    assert Image.open(out).size[0] > 100


def test_explain_versus_and_default_out(
    tiny_run: Path,
    images: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    model = load_run(tiny_run).model
    name = model.class_names[-1]
    assert main(["explain", str(tiny_run), str(images["normal"]), "--versus", name]) == 0
    text = capsys.readouterr().out
    assert f"not {name}" in text or text.startswith(name)
    assert (tmp_path / "explanation.png").stat().st_size > 0
    assert main(["explain", str(tiny_run), str(images["normal"]), "--versus", "0"]) == 0
    capsys.readouterr()
    assert main(["explain", str(tiny_run), str(images["normal"]), "--versus", "no such"]) == 2
    assert "no such" in capsys.readouterr().err


def test_explain_corrupt_image(
    tiny_run: Path, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fig.png"
    assert main(["explain", str(tiny_run), str(images["corrupt"]), "--out", str(out)]) == 2
    assert "corrupt.png" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- CHiQPM


def write_calibration(
    run_dir: Path, method: str | None = None, *, agreement: float | None = None
) -> Path:
    """Calibrate the run's ``method`` model on its training images and write the calibration file
    the evaluate stage writes (``calibration.json`` for QPM, ``calibration_<method>.json``).

    ``agreement``: label the images with the model's own predictions, that share of them kept
    and the rest drawn at random (seeded), instead of the true labels: a model as accurate as
    that, so that the sets differ between coverages (the tiny model learns next to nothing).
    """
    import torch

    from openqpm._io import eval_mode
    from openqpm.app._loaded import calibration_path
    from openqpm.conformal import Calibration
    from openqpm.data import create_dataset
    from openqpm.explain.heatmaps import active_means

    loaded = load_run(run_dir, method=method)
    data = loaded.config.data
    dataset = create_dataset(data.dataset, data.root, "train", transform=loaded.transform())
    batch = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad(), eval_mode(loaded.model):
        maps = loaded.model.forward_features(batch)
        logits = loaded.model.forward_head(maps).numpy()
        activations = loaded.model.forward_head(maps, pre_logits=True).numpy()
    weights = loaded.model.class_weights().numpy()
    labels = np.asarray(dataset.labels)
    if agreement is not None:
        rng = np.random.default_rng(0)
        labels = logits.argmax(axis=1)
        drawn = rng.random(len(labels)) >= agreement
        labels[drawn] = rng.integers(0, logits.shape[1], int(drawn.sum()))
    calibration = Calibration.fit(logits, activations, labels, weights)
    path = calibration_path(run_dir, loaded.config)
    document = {
        "available": True,
        "calibration": calibration.to_json_dict(),
        "active_means": active_means(activations).tolist(),
        "n_calibration": calibration.n_calibration,
        "fraction": 0.1,
    }
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def calibrated_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run with a calibration of its QPM, and a second model, ``chiqpm``:
    the QPM with a ReLU head and renamed classes (calibrated too)."""
    run_dir = tmp_path_factory.mktemp("calibrated") / "run"
    shutil.copytree(tiny_run, run_dir)
    write_calibration(run_dir)
    model = load_run(run_dir).model
    model.head.relu = True
    model.class_names = [f"relu {name}" for name in model.class_names]
    model.save(run_dir / "chiqpm.safetensors")
    write_calibration(run_dir, "chiqpm")
    return run_dir


def _expected_set(run_dir: Path, image: Path, alpha: float, method: str | None = None) -> list[str]:
    """The hierarchical set of one image, from the calibration file and a forward pass."""
    from openqpm.app._loaded import calibration_path
    from openqpm.conformal import Calibration

    loaded = load_run(run_dir, method=method)
    document = json.loads(calibration_path(run_dir, loaded.config).read_text())
    calibration = Calibration.from_json_dict(document["calibration"])
    local = loaded.local(Image.open(image).convert("RGB"))
    (classes,) = calibration.prediction_sets(
        "hierarchical", local.logits[None], local.features[None], alpha
    )
    return [loaded.class_names[c] for c in classes]


def test_load_run_reads_the_calibration_of_each_method(calibrated_run: Path) -> None:
    from openqpm.app._loaded import calibration_path

    qpm = load_run(calibrated_run)
    assert qpm.method == "qpm" and qpm.calibration is not None and qpm.calibration_note is None
    assert qpm.certainty_scale is None  # the QPM head has no ReLU: no certainty heatmaps
    assert np.array_equal(qpm.calibration.weights, qpm.model.class_weights().numpy())
    chiqpm = load_run(calibrated_run, method="chiqpm")
    assert chiqpm.method == "chiqpm" and chiqpm.model.head.relu
    assert chiqpm.class_names[0].startswith("relu ")
    path = calibration_path(calibrated_run, chiqpm.config)
    assert path.name == "calibration_chiqpm.json"
    means = json.loads(path.read_text())["active_means"]
    assert chiqpm.certainty_scale is not None and np.allclose(chiqpm.certainty_scale, means)
    dense = load_run(calibrated_run, which="dense")
    assert dense.calibration is None and dense.calibration_note


def test_load_run_names_a_broken_calibration_file(
    calibrated_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(calibrated_run, run_dir)
    path = run_dir / "calibration.json"
    good = json.loads(path.read_text())
    other = json.loads((run_dir / "calibration_chiqpm.json").read_text())
    image = min((Path(load_config(run_dir / "config.yaml").data.root) / "images").rglob("*.png"))
    broken = {
        "not json": "{not json",
        "no available": json.dumps({"calibration": good["calibration"]}),
        "not a calibration": json.dumps({"available": True, "calibration": {"format": "x"}}),
        "no calibration": json.dumps({"available": True}),
        "short active_means": json.dumps({**good, "active_means": [1.0]}),
        "zero active_means": json.dumps({**good, "active_means": [0.0] * 5}),
    }
    weights = np.asarray(other["calibration"]["weights"])
    other["calibration"]["weights"] = weights[::-1].tolist()  # another model's matrix
    broken["another model"] = json.dumps(other)
    for what, text in broken.items():
        path.write_text(text, encoding="utf-8")
        with pytest.raises(PipelineError, match="calibration.json") as caught:
            load_run(run_dir)
        assert str(path) in str(caught.value), what
        assert "openqpm evaluate" in str(caught.value), what
        # the CLI: one line naming the file, exit 2
        assert main(["explain", str(run_dir), str(image), "--out", str(tmp_path / "f.png")]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and len(err.strip().splitlines()) == 1, what
    path.write_text(json.dumps({"available": False, "reason": "held out nothing"}))
    loaded = load_run(run_dir)
    assert loaded.calibration is None and loaded.calibration_note == "held out nothing"


def test_explain_cli_prints_the_calibrated_set_and_writes_the_tree(
    calibrated_run: Path,
    images: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "figs" / "fig.png"
    image = images["normal"]
    assert main(["explain", str(calibrated_run), str(image), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    names = ", ".join(_expected_set(calibrated_run, image, 0.1)) or "empty"
    assert f"calibrated set (alpha=0.1, hierarchical): {names}" in captured.out
    assert "path: f" in captured.out
    tree = tmp_path / "figs" / "fig_tree.png"  # default: beside --out
    assert tree.is_file() and Image.open(tree).size[0] > 100
    assert str(tree) in captured.err
    # the text is the Python API's, with the run's calibration
    loaded = load_run(calibrated_run)
    expected = openqpm.explain_prediction(
        loaded.model, image, calibration=loaded.calibration, alpha=0.1
    )
    assert captured.out.strip() == expected.text().strip()
    # another alpha and tree path; the sets come from the calibration at that alpha
    tree_out = tmp_path / "elsewhere" / "tree.png"
    argv = ["explain", str(calibrated_run), str(image), "--out", str(out), "--alpha", "0.5"]
    assert main([*argv, "--tree-out", str(tree_out)]) == 0
    names = ", ".join(_expected_set(calibrated_run, image, 0.5)) or "empty"
    assert f"calibrated set (alpha=0.5, hierarchical): {names}" in capsys.readouterr().out
    assert tree_out.is_file() and tree_out.stat().st_size > 1000
    for bad in ("0", "1", "1.5", "nan"):
        assert main([*argv[:-1], bad]) == 2
        assert "--alpha must be in (0, 1)" in capsys.readouterr().err


def test_explain_alpha_without_calibration_is_one_line(
    tiny_run: Path, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fig.png"
    argv = ["explain", str(tiny_run), str(images["normal"]), "--out", str(out)]
    assert main([*argv, "--alpha", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--set data.calibration_fraction=0.1" in err and "--alpha" in err
    assert not out.exists()
    # without --alpha: the path and the tree, no set
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "path: f" in text and "calibrated set" not in text
    assert (tmp_path / "fig_tree.png").is_file()


def test_method_picks_the_model_file(
    calibrated_run: Path,
    tiny_run: Path,
    images: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image = str(images["normal"])
    out = str(tmp_path / "fig.png")
    argv = ["explain", str(calibrated_run), image, "--out", out]
    assert main([*argv, "--method", "chiqpm"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("relu ")  # the chiqpm model's class names
    names = ", ".join(_expected_set(calibrated_run, images["normal"], 0.1, "chiqpm")) or "empty"
    assert f"calibrated set (alpha=0.1, hierarchical): {names}" in text
    assert main(argv) == 0
    assert not capsys.readouterr().out.startswith("relu ")  # default: the config's method, qpm
    predict = ["predict", str(calibrated_run), image, "--json", "--top-k", "2"]
    assert main([*predict, "--method", "chiqpm"]) == 0
    (record,) = _json_lines(capsys.readouterr().out)
    (expected,) = openqpm.predict(load_run(calibrated_run, method="chiqpm").model, [image], top_k=2)
    assert [c["class_name"] for c in record["top_classes"]] == [  # type: ignore[union-attr]
        c.class_name for c in expected.top_classes
    ]
    assert all(c["class_name"].startswith("relu ") for c in record["top_classes"])  # type: ignore[union-attr]
    # a method the run has not trained: the file and the command to make it
    assert main(["explain", str(tiny_run), image, "--out", out, "--method", "chiqpm"]) == 2
    err = capsys.readouterr().err
    assert "chiqpm.safetensors" in err and "--method chiqpm" in err
    with pytest.raises(PipelineError, match="chiqpm.safetensors"):
        load_run(tiny_run, method="chiqpm")
    assert main([*predict, "--method", "no-such"]) == 2
    assert "no-such" in capsys.readouterr().err
