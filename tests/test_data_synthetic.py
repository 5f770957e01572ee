"""The embedded part-based data set: determinism, counts, CUB layout, labels that match pixels."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openqpm.data import compute_mean_std, create_dataset
from openqpm.data.synthetic import (
    ATTRIBUTE_GROUPS,
    METADATA_FILE,
    PALETTE,
    PARTS,
    _class_style,
    _design_classes,
    make_synthetic,
    render_preview,
)

N_CLASSES = 5
N_PER_CLASS = 6


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "creatures"
    return make_synthetic(root, n_classes=N_CLASSES, n_images_per_class=N_PER_CLASS, seed=3)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _table(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def test_same_arguments_give_identical_bytes_whatever_the_worker_count(
    tmp_path: Path, synthetic_root: Path
) -> None:
    again = make_synthetic(
        tmp_path / "again", n_classes=N_CLASSES, n_images_per_class=N_PER_CLASS, seed=3, n_workers=1
    )
    parallel = make_synthetic(
        tmp_path / "parallel",
        n_classes=N_CLASSES,
        n_images_per_class=N_PER_CLASS,
        seed=3,
        n_workers=2,
    )
    reference = _tree_digest(synthetic_root)
    assert len(reference) == N_CLASSES * N_PER_CLASS + 11  # images + 10 index files + JSON
    assert _tree_digest(again) == reference
    assert _tree_digest(parallel) == reference
    other_seed = make_synthetic(
        tmp_path / "other", n_classes=N_CLASSES, n_images_per_class=N_PER_CLASS, seed=4
    )
    assert _tree_digest(other_seed) != reference


def test_counts_and_cub_index_files_agree(synthetic_root: Path) -> None:
    n_images = N_CLASSES * N_PER_CLASS
    images = _table(synthetic_root / "images.txt")
    assert [int(row[0]) for row in images] == list(range(1, n_images + 1))
    for name in ("image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt"):
        assert [int(row[0]) for row in _table(synthetic_root / name)] == list(
            range(1, n_images + 1)
        )
    labels = np.array([int(row[1]) for row in _table(synthetic_root / "image_class_labels.txt")])
    split = np.array([int(row[1]) for row in _table(synthetic_root / "train_test_split.txt")])
    assert np.bincount(labels)[1:].tolist() == [N_PER_CLASS] * N_CLASSES
    # 60/40 per class: round(0.6 * 6) = 4 training images in every class
    assert [int(split[labels == c].sum()) for c in range(1, N_CLASSES + 1)] == [4] * N_CLASSES
    for _, relative in images:
        folder, file_name = relative.split("/")
        assert (synthetic_root / "images" / relative).is_file()
        assert folder[:3].isdigit() and file_name.endswith(".png")
    n_attributes = sum(len(values) for values in ATTRIBUTE_GROUPS.values())
    assert n_attributes >= 25
    assert len(_table(synthetic_root / "attributes" / "attributes.txt")) == n_attributes
    assert (
        len(_table(synthetic_root / "attributes" / "image_attribute_labels.txt"))
        == n_images * n_attributes
    )
    continuous = np.loadtxt(synthetic_root / "attributes" / "class_attribute_labels_continuous.txt")
    assert continuous.shape == (N_CLASSES, n_attributes)
    assert continuous.min() >= 0 and continuous.max() <= 100
    parts = [row[1] for row in _table(synthetic_root / "parts" / "parts.txt")]
    assert {"body", "head", "eye", "beak", "wing", "tail", "legs"} <= set(parts)
    assert len(_table(synthetic_root / "parts" / "part_locs.txt")) == n_images * len(parts)


def test_continuous_attributes_are_distributions_over_each_group(synthetic_root: Path) -> None:
    continuous = np.loadtxt(synthetic_root / "attributes" / "class_attribute_labels_continuous.txt")
    start = 0
    for values in ATTRIBUTE_GROUPS.values():
        block = continuous[:, start : start + len(values)]  # (n_classes, n_values)
        np.testing.assert_allclose(block.sum(axis=1), 100.0, atol=0.2)
        start += len(values)


def test_families_contain_pairs_that_differ_in_exactly_one_attribute_group(
    synthetic_root: Path,
) -> None:
    metadata = json.loads((synthetic_root / METADATA_FILE).read_text())
    assert metadata["families"] == [list(range(N_CLASSES))]  # 5 classes: one family
    continuous = np.loadtxt(synthetic_root / "attributes" / "class_attribute_labels_continuous.txt")
    # The dominant value of each group, read back from the CUB file alone.
    dominant, start = [], 0
    for values in ATTRIBUTE_GROUPS.values():
        dominant.append(continuous[:, start : start + len(values)].argmax(axis=1))
        start += len(values)
    dominant_values = np.stack(dominant, axis=1)  # (n_classes, n_groups)
    pairs = metadata["one_attribute_pairs"]
    assert pairs
    groups = list(ATTRIBUTE_GROUPS)
    for first, second, group in pairs:
        differing = np.flatnonzero(dominant_values[first] != dominant_values[second])
        assert [groups[g] for g in differing] == [group]
    # Family 0's first variant is the "cowbird" pair: the eye colour alone differs.
    assert [0, 1, "has_eye_color"] in pairs
    # Same family: classes share most groups.
    for first in range(N_CLASSES):
        for second in range(first + 1, N_CLASSES):
            assert (dominant_values[first] != dominant_values[second]).sum() <= 4


def _nearest_palette_color(pixel: np.ndarray, candidates: tuple[str, ...]) -> str:
    return min(candidates, key=lambda name: float(np.sum((pixel - np.array(PALETTE[name])) ** 2)))


def test_image_attribute_labels_match_the_drawn_pixels(synthetic_root: Path) -> None:
    data = create_dataset("synthetic", synthetic_root, "train", crop=False)
    test = create_dataset("synthetic", synthetic_root, "test", crop=False)
    names = data.attribute_names
    assert names is not None and data.part_names == list(PARTS)
    n_checked = 0
    for dataset in (data, test):
        attributes = dataset.image_attributes
        locations = dataset.part_locations
        assert attributes is not None and locations is not None
        for index in range(len(dataset)):
            pixels = np.asarray(dataset.load_image(index), dtype=np.float64)  # (H, W, 3)
            height, width = pixels.shape[:2]
            for part, group in (("eye", "has_eye_color"), ("head", "has_head_color")):
                x, y, visible = locations[index, PARTS.index(part)]
                present = [
                    n.split("::")[1]
                    for n, a in zip(names, attributes[index])
                    if n.startswith(group) and a == 1
                ]
                if not visible:
                    # hidden part: its attributes are "not visible" (-1), never present
                    assert not present
                    continue
                assert len(present) == 1
                pixel = pixels[min(int(y * height), height - 1), min(int(x * width), width - 1)]
                assert _nearest_palette_color(pixel, ATTRIBUTE_GROUPS[group]) == present[0]
                n_checked += 1
    assert n_checked >= N_CLASSES * N_PER_CLASS  # most parts are visible


def test_red_eyed_images_have_red_pixels_at_the_eye(synthetic_root: Path) -> None:
    data = create_dataset("synthetic", synthetic_root, "train", crop=False)
    names, attributes, locations = data.attribute_names, data.image_attributes, data.part_locations
    assert names is not None and attributes is not None and locations is not None
    rows = np.flatnonzero(attributes[:, names.index("has_eye_color::red")] == 1)
    assert len(rows) > 0  # seed 3 draws red eyes in some training images
    for index in rows:
        x, y, _ = locations[index, PARTS.index("eye")]
        r, g, b = np.asarray(data.load_image(int(index)), dtype=int)[int(y * 64), int(x * 64)]
        assert r > g + 60 and r > b + 60


def test_boxes_and_parts_lie_inside_the_images(synthetic_root: Path) -> None:
    boxes = np.array(
        [[float(v) for v in row[1:]] for row in _table(synthetic_root / "bounding_boxes.txt")]
    )
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] > 10).all()
    assert (boxes[:, 0] + boxes[:, 2] <= 64).all() and (boxes[:, 1] + boxes[:, 3] <= 64).all()
    cropped = create_dataset("synthetic", synthetic_root, "train", crop=True)
    locations = cropped.part_locations
    assert locations is not None
    visible = locations[..., 2] > 0
    assert visible.mean() > 0.7
    assert (locations[..., :2][visible] >= 0).all() and (locations[..., :2][visible] <= 1).all()
    image = cropped.load_image(0)
    box = boxes[cropped.image_ids[0] - 1]
    assert abs(image.size[0] - box[2]) <= 2 and abs(image.size[1] - box[3]) <= 2


def test_metadata_mean_std_is_that_of_the_training_images(synthetic_root: Path) -> None:
    train = create_dataset("synthetic", synthetic_root, "train", crop=False)
    metadata = json.loads((synthetic_root / METADATA_FILE).read_text())
    mean, std = compute_mean_std(train)
    np.testing.assert_allclose(mean, metadata["mean"], atol=1e-5)
    np.testing.assert_allclose(std, metadata["std"], atol=1e-5)
    assert train.mean_std == (tuple(metadata["mean"]), tuple(metadata["std"]))


def test_correlated_backgrounds_follow_the_class_in_training_only(tmp_path: Path) -> None:
    root = make_synthetic(
        tmp_path / "tb", n_classes=4, n_images_per_class=10, seed=1, correlated_backgrounds=True
    )
    labels = np.array([int(row[1]) - 1 for row in _table(root / "image_class_labels.txt")])
    split = np.array([int(row[1]) for row in _table(root / "train_test_split.txt")])
    paths = [row[1] for row in _table(root / "images.txt")]
    matches = {0: [], 1: []}
    for path, label, is_train in zip(paths, labels, split):
        top_row = np.asarray(Image.open(root / "images" / path), dtype=np.float64)[0]  # (W, 3)
        expected = np.array(_class_style(1, int(label)).top, dtype=np.float64)
        # Median over the top row ignores clutter; 15% covers the global illumination change.
        close = np.abs(np.median(top_row, axis=0) - expected).max() <= 0.15 * expected.max() + 6
        matches[int(is_train)].append(close)
    assert np.mean(matches[1]) >= 0.8  # training images: their own class's background
    assert np.mean(matches[0]) <= 0.2  # test images: another class's background


def test_class_designs_scale_to_400_distinct_named_classes() -> None:
    designs = _design_classes(400, np.random.default_rng(0))
    assert len(designs) == 400
    assert len({design.name for design in designs}) == 400
    assert len({design.values for design in designs}) == 400
    families = {design.family for design in designs}
    assert len(families) == 80


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"n_classes": 3}, ValueError),
        ({"n_classes": 401}, ValueError),
        ({"n_images_per_class": 1}, ValueError),
        ({"image_size_px": 16}, ValueError),
        ({"train_fraction": 1.0}, ValueError),
    ],
)
def test_bad_arguments_are_rejected(tmp_path: Path, arguments: dict, error: type) -> None:
    with pytest.raises(error):
        make_synthetic(tmp_path / "bad", **arguments)


def test_existing_folder_is_kept_unless_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "note.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        make_synthetic(target, n_classes=4, n_images_per_class=2)
    assert (target / "note.txt").read_text() == "mine"
    make_synthetic(target, n_classes=4, n_images_per_class=2, overwrite=True)
    assert not (target / "note.txt").exists() and (target / "images.txt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_render_preview_writes_one_row_per_class(synthetic_root: Path, tmp_path: Path) -> None:
    out = render_preview(
        synthetic_root, tmp_path / "grid.png", n_classes=3, n_per_class=2, tile_px=32
    )
    with Image.open(out) as grid:
        assert grid.mode == "RGB"
        assert grid.size[1] == 3 * (32 + 4) + 4
    with pytest.raises(ValueError, match="missing file"):
        render_preview(tmp_path, tmp_path / "none.png")


def test_generator_imports_without_torch() -> None:
    # Worker processes import this module; it must not drag torch in (seconds per process).
    code = "import sys, openqpm.data.synthetic; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_cub_loader_does_not_import_the_generator() -> None:
    # The synthetic set registers itself (openqpm.data.synthetic_loader) on top of the CUB loader.
    code = "import sys, openqpm.data.cub; sys.exit('openqpm.data.synthetic' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
