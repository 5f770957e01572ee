"""``openqpm app``: served in a subprocess, driven by gradio_client and headless Chromium."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from tests._tiny import tiny_run_dir

import openqpm
from openqpm.app._loaded import load_run
from openqpm.config import load_config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def app_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run_dir(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="module")
def server(app_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("app_log") / "app.log"
    url = f"http://127.0.0.1:{port}/"
    with log.open("w") as sink:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "openqpm", "app", str(app_run), "--port", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                if process.poll() is not None:
                    pytest.fail(f"openqpm app exited {process.returncode}:\n{log.read_text()}")
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"openqpm app did not serve within 120 s:\n{log.read_text()}")
                time.sleep(0.3)
            print(f"app start to page served: {time.perf_counter() - started:.1f}s")
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


def _test_image(run_dir: Path) -> Path:
    root = Path(load_config(run_dir / "config.yaml").data.root)
    return min((root / "images").rglob("*.png"))


def test_client_prediction_matches_python(app_run: Path, server: str) -> None:
    from gradio_client import Client, handle_file

    image = _test_image(app_run)
    client = Client(server, verbose=False)
    label, scores, grid, contrast = client.predict(
        handle_file(str(image)), 3, "(runner-up)", api_name="/explain"
    )
    (expected,) = openqpm.predict(load_run(app_run).model, [image], top_k=3)
    assert label["label"] == expected.top_classes[0].class_name
    assert [c["label"] for c in label["confidences"]] == [
        c.class_name for c in expected.top_classes
    ]
    assert "score" in scores and "Why" in contrast
    assert Path(grid).is_file()


def test_app_state_caches_forward_pass(app_run: Path) -> None:
    from PIL import Image

    from openqpm.app import AppState

    state = AppState(load_run(app_run))
    picture = Image.open(_test_image(app_run)).convert("RGB")
    display, local = state.analyse(picture)
    for k in (1, 2, 3):
        state.grid(display, state.analyse(picture)[1], state.top_k(local, k))
    passes = state.n_forward_passes
    state.contrast_text(state.analyse(picture)[1], 0)
    assert state.analyse(picture)[1] is local
    assert state.n_forward_passes == passes  # only the examples' passes were added


def test_browser_upload_shows_grid(app_run: Path, server: str, tmp_path: Path) -> None:
    if shutil.which("chromedriver") is None or shutil.which("chromium") is None:
        pytest.skip("headless Chromium / chromedriver not installed")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(server)
        wait = WebDriverWait(driver, 60)
        upload = wait.until(
            conditions.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]"))
        )
        upload.send_keys(str(_test_image(app_run)))
        wait.until(conditions.presence_of_element_located((By.CSS_SELECTOR, "#grid img[src]")))
        time.sleep(1.0)  # let the image paint before the screenshot
        shot = tmp_path / "app.png"
        driver.save_screenshot(str(shot))
        shutil.copy(shot, "/tmp/app_screenshot.png")
        assert shot.stat().st_size > 0
        assert "openqpm" in driver.title
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def calibrated_app_run(app_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the app's run with the calibration file its evaluate stage would write."""
    from tests.test_predict import write_calibration

    run_dir = tmp_path_factory.mktemp("calibrated_app") / "run"
    shutil.copytree(app_run, run_dir)
    write_calibration(run_dir, agreement=0.9)
    return run_dir


def _components(app: object, kind: str) -> list[object]:
    blocks = getattr(app, "blocks", {})
    return [block for block in blocks.values() if type(block).__name__ == kind]


def test_app_coverage_slider_sets_the_calibrated_set(calibrated_app_run: Path) -> None:
    from PIL import Image

    from openqpm.app import build_app

    app = build_app(calibrated_app_run, device="cpu")
    state = app.openqpm_state
    (slider,) = [s for s in _components(app, "Slider") if getattr(s, "elem_id", "") == "coverage"]
    assert (slider.minimum, slider.maximum, slider.value) == (0.80, 0.99, 0.90)  # type: ignore[attr-defined]
    assert any(getattr(i, "elem_id", "") == "tree" for i in _components(app, "Image"))
    root = Path(load_config(calibrated_app_run / "config.yaml").data.root)
    pictures = [Image.open(p).convert("RGB") for p in sorted((root / "images").rglob("*.png"))[::7]]
    calibration = state.loaded.calibration
    sizes = []
    for picture in pictures:
        tree_low, text_low = app.openqpm_hierarchy(picture, 0.80)
        tree_high, text_high = app.openqpm_hierarchy(picture, 0.99)
        assert tree_low.ndim == 3 and tree_low.shape[2] == 3 and tree_high.shape[2] == 3
        _, local = state.analyse(picture)
        low = state.calibrated_sets(local, 0.80)["hierarchical"]
        high = state.calibrated_sets(local, 0.99)["hierarchical"]
        for chosen, alpha in ((low, 0.2), (high, 0.01)):  # the calibration's own sets
            (expected,) = calibration.prediction_sets(
                "hierarchical", local.logits[None], local.features[None], alpha
            )
            assert chosen.classes == expected.tolist() and chosen.alpha == alpha
        assert set(low.classes) <= set(high.classes)
        assert "target coverage 80%" in text_low and "target coverage 99%" in text_high
        for name in low.class_names:
            assert name in text_low
        sizes.append((len(low.classes), len(high.classes)))
    assert any(small < large for small, large in sizes), sizes


def test_app_without_calibration_has_no_slider_and_says_why(app_run: Path) -> None:
    from PIL import Image

    from openqpm.app import build_app

    app = build_app(app_run, device="cpu")
    assert not [s for s in _components(app, "Slider") if getattr(s, "elem_id", "") == "coverage"]
    notes = [
        m for m in _components(app, "Markdown") if getattr(m, "elem_id", "") == "no-calibration"
    ]
    assert len(notes) == 1 and "data.calibration_fraction=0.1" in notes[0].value  # type: ignore[attr-defined]
    picture = Image.open(_test_image(app_run)).convert("RGB")
    tree, text = app.openqpm_hierarchy(picture)
    assert tree is not None and tree.ndim == 3
    assert "path: " in text and "No calibrated prediction sets" in text


def test_client_hierarchy_endpoint(app_run: Path, server: str) -> None:
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    tree, text = client.predict(handle_file(str(_test_image(app_run))), api_name="/hierarchy")
    assert Path(tree).is_file()
    (expected,) = openqpm.predict(load_run(app_run).model, [_test_image(app_run)], top_k=1)
    # the path starts at the predicted class's strongest feature
    assert text.startswith(f"path: Feature {expected.features[0].channel} (")
    assert "No calibrated prediction sets" in text
