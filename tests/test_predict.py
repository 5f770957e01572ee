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
