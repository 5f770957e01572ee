"""The HTML report: files, links and escaping; and a real headless Chromium opening it offline."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw

from openqpm.explain.heatmaps import (
    active_means,
    assign_feature_colors,
    display_image,
    heatmap_overlay,
    to_head_units,
)
from openqpm.explain.report import write_report
from openqpm.models import DenseHead, QPMHead, QPMModel, create_backbone

CLASS_NAMES = ["Shiny Cowbird", 'Gull <b>"Western"</b> & Co', "Bronzed Cowbird", "Red Finch"]
# three features per class; pairs sharing two: (0, 1), (0, 2), (1, 3)
MATRIX = [[1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1], [0, 1, 0, 1, 1]]
SELECTED = [3, 8, 14, 21, 30]
IMAGE_PX = 32


class _PictureDataset(torch.utils.data.Dataset):
    """A test split in the openqpm data set contract, built from given pictures."""

    def __init__(self, pictures: list[Image.Image], labels: list[int]) -> None:
        self.pictures = pictures
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(CLASS_NAMES)
        self.n_classes = len(CLASS_NAMES)
        rng = np.random.default_rng(0)
        self.class_attributes = rng.uniform(size=(self.n_classes, 6))
        self.attribute_names = [f"has_part::colour_{i}" for i in range(6)]
        self.image_attributes = None
        self.part_locations = None
        self.mean_std = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.transform = T.Compose(
            [T.Resize((IMAGE_PX, IMAGE_PX)), T.ToTensor(), T.Normalize(*self.mean_std)]
        )
        self.name = "pictures"

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, index: int) -> Image.Image:
        return self.pictures[index].copy()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.pictures[index]), int(self.labels[index])


def _pictures(n_pictures: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(n_pictures):
        picture = Image.new("RGB", (48, 40), tuple(int(v) for v in rng.integers(40, 140, 3)))
        draw = ImageDraw.Draw(picture)
        for _ in range(3):
            x, y = rng.uniform(0, 48), rng.uniform(0, 40)
            radius = rng.uniform(4, 10)
            color = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
        pictures.append(picture)
    return pictures


@pytest.fixture(scope="module")
def model_and_test_set() -> tuple[QPMModel, _PictureDataset]:
    """An untrained QPM and a test set labelled from its own predictions: each class gets two
    correctly classified images and one mistake, except the last class (mistakes only)."""
    torch.manual_seed(0)
    backbone = create_backbone("tiny_cnn").eval()
    candidates = _pictures(160, seed=1)
    transform = _PictureDataset([], []).transform
    images = torch.stack([transform(picture) for picture in candidates])
    with torch.no_grad():
        pooled = backbone(images).mean(dim=(2, 3))[:, SELECTED]  # (N, 5)
    head = QPMHead(SELECTED, pooled.mean(dim=0), pooled.std(dim=0), MATRIX)
    model = QPMModel(backbone, head, class_names=CLASS_NAMES).eval()
    with torch.no_grad():
        predictions = model(images).argmax(dim=1).numpy()
    chosen, labels = [], []
    for class_index in range(len(CLASS_NAMES)):
        n_correct = 0 if class_index == len(CLASS_NAMES) - 1 else 2
        correct = np.flatnonzero(predictions == class_index)[:n_correct]
        wrong = [i for i in np.flatnonzero(predictions != class_index) if i not in chosen][:1]
        assert len(correct) == n_correct, "the fixture needs every class predicted twice"
        chosen += [*correct.tolist(), *wrong]
        labels += [class_index] * (len(correct) + len(wrong))
    return model, _PictureDataset([candidates[i] for i in chosen], labels)


@pytest.fixture(scope="module")
def report(tmp_path_factory, model_and_test_set) -> Path:
    model, dataset = model_and_test_set
    out = tmp_path_factory.mktemp("run") / "report"
    qpm_metrics = {"accuracy": 62.5, "n_features_used": 5, "features_per_class": 3.0}
    qpm_metrics |= {"sid_at_5": None, "class_independence": 0.7, "structural_grounding": None}
    dense_metrics = {"accuracy": 70.0, "n_features_used": 32, "features_per_class": 32.0}
    stages: set[str] = set()
    index = write_report(
        out,
        model=model,
        dataset=dataset,
        metrics=qpm_metrics,
        dense_metrics=dense_metrics,
        batch_size=4,
        progress=lambda stage, done, total: stages.add(stage),
    )
    assert index == out / "index.html"
    assert {"scan", "maps", "images", "pairs", "pages"} <= stages
    return out


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.links.append(value)
            if name == "id" and value:
                self.ids.add(value)


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _check_links(folder: Path) -> int:
    """Every link of every page is relative and points to an existing file (and anchor)."""
    pages = sorted(folder.rglob("*.html"))
    n_checked = 0
    for page in pages:
        for link in _parse(page).links:
            if link.startswith("data:"):
                continue
            assert not re.match(r"^[a-z]+:|^//", link), f"{page.name} links outside: {link}"
            target, _, anchor = link.partition("#")
            resolved = (page.parent / target).resolve() if target else page
            assert resolved.is_file(), f"{page.relative_to(folder)} links to missing {link}"
            if anchor:
                assert anchor in _parse(resolved).ids, f"{link} has no anchor {anchor}"
            n_checked += 1
    return n_checked


def test_report_writes_every_page_with_working_relative_links(report) -> None:
    assert (report / "index.html").is_file() and (report / "style.css").is_file()
    class_pages = sorted(p.name for p in (report / "classes").iterdir())
    assert class_pages == [f"c{c:04d}.html" for c in range(len(CLASS_NAMES))]
    assert len(list((report / "features").iterdir())) == len(SELECTED)
    assert _check_links(report) > 50
    explanation = json.loads((report / "explanation.json").read_text())
    assert explanation["classes"][0]["channels"] == [3, 8, 14]
    assert len(explanation["contrastive_pairs"]) == 3
    assert json.loads((report / "metrics.json").read_text())["dense"]["accuracy"] == 70.0
    assert not list(report.rglob("*.tmp")), "temporary files left behind"


def test_report_pages_say_what_they_should(report) -> None:
    index = (report / "index.html").read_text()
    assert "Class-Ind." in index and "62.5" in index and "70.0" in index  # the metrics table
    assert "SID@5" not in index  # a metric neither model has gets no row
    assert 'id="class-search"' in index and "<script>" in index
    assert index.count('class="class-card"') == len(CLASS_NAMES)
    # the last class has no correctly classified image: no example, and no pair figure with it
    last = (report / "classes" / "c0003.html").read_text()
    assert "no example is shown" in last and "A mistake" in last
    shiny = (report / "classes" / "c0000.html").read_text()
    assert "Why Shiny Cowbird and not" in shiny and "Contrasted with" in shiny
    pair_figures = sorted(p.name for p in (report / "img").glob("pair_*.png"))
    assert pair_figures == ["pair_0000_0001.png", "pair_0000_0002.png"]


def test_report_escapes_class_names(report) -> None:
    raw = CLASS_NAMES[1]
    for page in report.rglob("*.html"):
        assert raw not in page.read_text(), f"{page.name} holds an unescaped class name"
    assert (
        "Gull &lt;b&gt;&quot;Western&quot;&lt;/b&gt; &amp; Co"
        in (report / "classes" / "c0001.html").read_text()
    )


def test_report_with_max_classes_links_only_existing_pages(tmp_path, model_and_test_set) -> None:
    model, dataset = model_and_test_set
    write_report(tmp_path / "small", model=model, dataset=dataset, max_classes=2, max_pairs=1)
    assert sorted(p.name for p in (tmp_path / "small" / "classes").iterdir()) == [
        "c0000.html",
        "c0001.html",
    ]
    _check_links(tmp_path / "small")
    assert len(list((tmp_path / "small" / "img").glob("pair_*.png"))) == 1


def test_report_handles_a_class_without_test_images(tmp_path, model_and_test_set) -> None:
    model, dataset = model_and_test_set
    keep = [i for i in range(len(dataset)) if dataset.labels[i] != 2]
    smaller = _PictureDataset([dataset.pictures[i] for i in keep], dataset.labels[keep].tolist())
    out = write_report(tmp_path / "r", model=model, dataset=smaller, max_pairs=0).parent
    _check_links(out)
    for page in out.rglob("*.html"):
        assert not re.search(r"\bnan\b", page.read_text().lower()), page.name
    assert "n/a" in (out / "classes" / "c0002.html").read_text()  # no test accuracy


def test_a_rewritten_report_replaces_the_old_folder_as_a_whole(
    tmp_path, model_and_test_set, monkeypatch
) -> None:
    """Stale pages of an earlier report and temporary files of a killed one do not survive."""
    from openqpm.explain import report as report_module

    model, dataset = model_and_test_set
    out = tmp_path / "report"
    write_report(out, model=model, dataset=dataset, max_pairs=0)
    (out / "features" / "f0099.html").write_text("a feature of a larger, earlier model")
    (out / "classes" / ".c0000.html.k3j2.tmp").write_text("half a page")
    abandoned = tmp_path / ".report.new-999999999-x1"  # a pid that cannot be alive
    (abandoned / "img").mkdir(parents=True)
    previous = os.umask(0o027)
    try:
        index = write_report(out, model=model, dataset=dataset, max_classes=2, max_pairs=0)
    finally:
        os.umask(previous)
    assert index == out / "index.html" and index.is_file()
    assert not (out / "features" / "f0099.html").exists()
    assert sorted(p.name for p in (out / "classes").iterdir()) == ["c0000.html", "c0001.html"]
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name or ".report." in p.name]
    assert leftovers == []
    assert os.stat(out).st_mode & 0o777 == 0o750  # the umask's mode, not mkdtemp's 0700
    _check_links(out)

    # a write that fails leaves the previous report as it was, and nothing beside it
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args, **kwargs) -> str:
        raise RuntimeError("killed while writing the index")

    monkeypatch.setattr(report_module, "_index_page", broken)
    with pytest.raises(RuntimeError, match="killed"):
        write_report(out, model=model, dataset=dataset, max_pairs=0)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_report_refuses_a_dense_model(tmp_path, model_and_test_set) -> None:
    _, dataset = model_and_test_set
    dense = QPMModel(create_backbone("tiny_cnn"), DenseHead(32, 4), class_names=CLASS_NAMES)
    with pytest.raises(ValueError, match="dense"):
        write_report(tmp_path / "r", model=dense, dataset=dataset)


# ---------------------------------------------------------------------------------------------
# CHiQPM: certainty-carrying heatmaps, calibrated prediction sets, hierarchy figures

CERTAINTY_NOTE = (
    "heatmap brightness = strength relative to the feature's mean activation on training images "
    "where it is active"
)
ALPHAS = [0.05, 0.075, 0.1, 0.12]
# (coverage, mean set size, set coherence) per score and alpha, all different
CONFORMAL_NUMBERS = {
    "hierarchical": [(0.951, 3.25, 0.9), (0.93, 2.5, 0.875), (0.912, 2.0, 0.8), (0.88, 1.75, 0.5)],
    "aps": [(0.96, 3.5, None), (0.925, 3.0, None), (0.9, 2.25, None), (0.875, 2.0, None)],
    "thr": [(0.955, 2.75, 0.25), (0.94, 2.25, 0.2), (0.905, 1.5, 0.125), (0.87, 1.25, 0.0)],
}
CONFORMAL = {
    "n_calibration": 120,
    "alphas": ALPHAS,
    "results": [
        {
            "score": score,
            "alpha": alpha,
            "coverage": coverage,
            "mean_set_size": size,
            "set_coherence": coherence,
            "threshold": 1.5 if score == "hierarchical" else 0.42,
            "level": 2 if score == "hierarchical" else None,
        }
        for score, rows in CONFORMAL_NUMBERS.items()
        for alpha, (coverage, size, coherence) in zip(ALPHAS, rows)
    ],
}


def _head_inputs(model: QPMModel, dataset: _PictureDataset) -> np.ndarray:
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        return model.forward_head(model.forward_features(images), pre_logits=True).numpy()


@pytest.fixture(scope="module")
def chiqpm_report(tmp_path_factory, model_and_test_set) -> tuple[Path, list, np.ndarray]:
    """A report with every CHiQPM option; returns its folder, the calls of the set function and
    the certainty scale (from the test images standing in for the training images)."""
    model, dataset = model_and_test_set
    scale = active_means(_head_inputs(model, dataset))
    calls: list[tuple[np.ndarray, np.ndarray]] = []

    def top_two(logits: np.ndarray, activations: np.ndarray) -> np.ndarray:
        calls.append((logits, activations))
        return np.argsort(-logits, kind="stable")[:2]

    metrics = {"accuracy": 62.5, "one_feature_apart_pairs": 7, "conformal": CONFORMAL}
    out = tmp_path_factory.mktemp("chiqpm") / "report"
    write_report(
        out,
        model=model,
        dataset=dataset,
        metrics=metrics,
        batch_size=4,
        max_pairs=1,
        certainty_scale=scale,
        hierarchy=True,
        prediction_set_fn=top_two,
    )
    return out, calls, scale


class _Table(HTMLParser):
    """The text of every cell of the first table with a given class, row by row."""

    def __init__(self, table_class: str) -> None:
        super().__init__()
        self.table_class = table_class
        self.rows: list[list[str]] = []
        self._inside = False
        self._done = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if tag == "table" and self.table_class in classes and not self._done:
            self._inside = True
        elif self._inside and tag == "tr":
            self.rows.append([])
        elif self._inside and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self._inside:
            self._inside, self._done = False, True
        elif self._inside and tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _table(path: Path, table_class: str) -> list[list[str]]:
    parser = _Table(table_class)
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.rows


def _text(path: Path) -> str:
    """A page's visible text, whitespace collapsed (links are inline: no space around them)."""
    without_links = re.sub(r"</?a\b[^>]*>", "", path.read_text(encoding="utf-8"))
    without_tags = re.sub(r"<[^>]+>", " ", without_links)
    return " ".join(html.unescape(without_tags).split())


def test_report_shows_the_calibrated_prediction_sets(chiqpm_report) -> None:
    out = chiqpm_report[0]
    index = out / "index.html"
    rows = _table(index, "conformal")
    assert rows[0] == ["alpha", "target", "Hierarchical (CHiQPM)", "APS", "THR"]
    assert rows[1] == ["coverage", "mean size", "coherence"] * 3
    body = rows[2:]
    assert [row[0] for row in body] == ["0.05", "0.075", "0.1", "0.12"]
    assert [row[1] for row in body] == ["95.0%", "92.5%", "90.0%", "88.0%"]
    for i, row in enumerate(body):
        expected = []
        for score in ("hierarchical", "aps", "thr"):
            coverage, size, coherence = CONFORMAL_NUMBERS[score][i]
            coherence_text = "–" if coherence is None else f"{100 * coherence:.1f}%"
            expected += [f"{100 * coverage:.1f}%", f"{size:.2f}", coherence_text]
        assert row[2:] == expected
    assert body[2][2:5] == ["91.2%", "2.00", "80.0%"]  # alpha 0.1, hierarchical, by hand
    text = _text(index)
    assert "Calibrated prediction sets" in text
    assert "Calibration used 120 held-out training images" in text
    assert "measured on the test split" in text
    metrics_rows = {row[0]: row[1:] for row in _table(index, "metrics") if row}
    assert metrics_rows["1-apart pairs"][0] == "7"
    assert json.loads((out / "metrics.json").read_text())["qpm"]["conformal"] == CONFORMAL


def test_report_without_conformal_results_has_no_such_section(report) -> None:
    index = (report / "index.html").read_text()
    assert "Calibrated prediction sets" not in index and "1-apart pairs" not in index
    assert not list((report / "img").glob("tree_*.png"))
    assert "hierarchy" not in (report / "classes" / "c0000.html").read_text()
    for page in report.rglob("*.html"):
        assert CERTAINTY_NOTE not in _text(page).lower(), page.name


def test_report_with_hierarchy_draws_a_tree_per_class_page(chiqpm_report, model_and_test_set):
    out, calls, _ = chiqpm_report
    model, _ = model_and_test_set
    trees = sorted(p.name for p in (out / "img").glob("tree_*.png"))
    assert trees == [f"tree_c{c:04d}.png" for c in range(len(CLASS_NAMES))]
    for name in trees:
        with Image.open(out / "img" / name) as picture:
            assert picture.format == "PNG" and picture.width > 200
    _check_links(out)
    weights = model.class_weights().double().numpy()
    assert len(calls) == len(CLASS_NAMES)
    for c in range(len(CLASS_NAMES)):
        page = out / "classes" / f"c{c:04d}.html"
        assert f"../img/tree_c{c:04d}.png" in _parse(page).links
        logits, activations = calls[c]
        assert logits.shape == (len(CLASS_NAMES),) and activations.shape == (len(SELECTED),)
        np.testing.assert_allclose(logits, weights @ activations)
        top_two = sorted(np.argsort(-logits, kind="stable")[:2].tolist())
        listed = ", ".join(CLASS_NAMES[i] for i in top_two)
        assert f"calibrated set at alpha = 0.1: {listed}" in _text(page)
    # the last class has no correctly classified test image: its tree shows its mistake
    assert "which the model gets wrong" in _text(out / "classes" / "c0003.html")
    assert "the example test image" in _text(out / "classes" / "c0000.html")


def test_report_with_certainty_scale_draws_tiles_relative_to_it(
    chiqpm_report, model_and_test_set
) -> None:
    out, _, scale = chiqpm_report
    model, dataset = model_and_test_set
    for page in (
        out / "index.html",
        out / "classes" / "c0000.html",
        out / "features" / "f0000.html",
    ):
        assert CERTAINTY_NOTE in _text(page).lower(), page.name
    # a tile of the example of class 0, redrawn by hand: head units over the certainty scale
    tiles = [link for link in _parse(out / "classes" / "c0000.html").links if "_f" in link]
    match = re.search(r"i(\d{6})_f(\d{4})\.png$", tiles[0])
    assert match is not None
    index, feature = int(match.group(1)), int(match.group(2))
    with torch.no_grad():
        maps = model.head_feature_maps(model.forward_features(dataset[index][0][None]))[0]
    units = to_head_units(maps, model.head.mean, model.head.std)[feature]
    colors = assign_feature_colors([[0, 1, 2], [0, 1, 3], [0, 2, 4], [1, 3, 4]], len(SELECTED))
    expected = heatmap_overlay(
        display_image(dataset, index, size_px=176),
        units,
        colors[feature],
        strength_scale=float(scale[feature]),
    )
    with Image.open(out / "img" / tiles[0].removeprefix("../img/")) as picture:
        drawn = np.asarray(picture.convert("RGB")).astype(int)
    assert np.abs(drawn - expected.astype(int)).max() <= 1


def test_report_with_a_huge_certainty_scale_draws_no_heatmap(tmp_path, model_and_test_set):
    model, dataset = model_and_test_set
    out = tmp_path / "r"
    huge = np.full(len(SELECTED), 1e9)
    write_report(
        out, model=model, dataset=dataset, max_classes=1, max_pairs=0, certainty_scale=huge
    )
    tiles = sorted((out / "img").glob("i*_f*.png"))
    assert tiles
    for tile in tiles:  # nothing reaches a billionth of its typical strength: grey only
        with Image.open(tile) as picture:
            pixels = np.asarray(picture.convert("RGB")).astype(int)
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    with pytest.raises(ValueError, match="certainty_scale"):
        write_report(tmp_path / "bad", model=model, dataset=dataset, certainty_scale=huge[:3])


def test_report_refuses_a_set_function_without_hierarchy(tmp_path, model_and_test_set) -> None:
    model, dataset = model_and_test_set
    with pytest.raises(ValueError, match="hierarchy=True"):
        write_report(
            tmp_path / "r", model=model, dataset=dataset, prediction_set_fn=lambda logits, z: [0]
        )
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# the browser


def _chromium() -> tuple[str, str]:
    pytest.importorskip("selenium", reason="selenium is not installed (dev dependency)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        )
    return browser, driver


@pytest.fixture
def browser(tmp_path):
    browser_path, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,1400",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _all_images_loaded(driver) -> bool:
    driver.execute_script("window.scrollTo(0, document.body.scrollHeight);")
    return bool(
        driver.execute_script(
            "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0);"
        )
    )


def _screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a real picture, not a blank page
    copy_to = os.environ.get("OPENQPM_SCREENSHOT_DIR")  # to look at them by hand
    if copy_to:
        shutil.copy(path, Path(copy_to) / name)
    return path


def test_report_in_headless_chromium(report, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    copied = tmp_path / "copied-report"  # a copied folder works: every link is relative
    shutil.copytree(report, copied)
    browser.get((copied / "index.html").as_uri())
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("QPM report")
    assert _console_errors(browser) == []
    WebDriverWait(browser, 10).until(_all_images_loaded)
    browser.execute_script("window.scrollTo(0, 0);")
    _screenshot(browser, tmp_path, "report-index.png")

    search = browser.find_element(By.ID, "class-search")
    search.send_keys("cowbird")
    shown = [c for c in browser.find_elements(By.CLASS_NAME, "class-card") if c.is_displayed()]
    assert [card.text.split("\n")[0] for card in shown] == ["Shiny Cowbird", "Bronzed Cowbird"]
    assert browser.find_element(By.ID, "class-count").text == "2 of 4 classes"

    shown[0].click()
    WebDriverWait(browser, 10).until(lambda driver: driver.current_url.endswith("c0000.html"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Shiny Cowbird"
    assert _console_errors(browser) == []
    WebDriverWait(browser, 10).until(_all_images_loaded)
    browser.execute_script("window.scrollTo(0, 0);")
    _screenshot(browser, tmp_path, "report-class.png")

    browser.find_element(By.CSS_SELECTOR, "a.chip[href*='features/']").click()
    WebDriverWait(browser, 10).until(lambda driver: "/features/f" in driver.current_url)
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Feature ")
    assert _console_errors(browser) == []
