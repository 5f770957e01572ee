"""CUB-200-2011 loader on a tiny generated folder: splits, crop, parts, attributes, image modes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _fixtures_data import CUB_ATTRIBUTES, CUB_PARTS, cub_image_path, make_cub
from openqpm.data import DATASET_STATS, DatasetError, create_dataset


@pytest.fixture()
def cub(tmp_path: Path) -> Path:
    return make_cub(tmp_path)


def test_splits_labels_and_names(cub: Path) -> None:
    train = create_dataset("cub", cub, "train")
    test = create_dataset("cub", cub, "test")
    assert len(train) == len(test) == 6
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert train.image_ids.tolist() == [1, 3, 5, 7, 9, 11]
    assert test.image_ids.tolist() == [2, 4, 6, 8, 10, 12]
    assert train.class_names == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert train.n_classes == 3 and train.mean_std == DATASET_STATS["cub"]
    assert train.labels.dtype == np.int64


def test_root_may_be_the_parent_folder(cub: Path) -> None:
    assert len(create_dataset("cub", cub.parent, "train")) == 6


def test_box_crop_returns_the_box_pixels(cub: Path) -> None:
    train = create_dataset("cub", cub, "train", crop=True)
    image = train.load_image(0)
    # box (x, y, w, h) = (3, 2, 8, 6): columns 3..10, rows 2..7 of the coordinate image
    assert image.size == (8, 6)
    pixels = np.asarray(image)
    assert pixels[0, 0].tolist() == [30, 20, 1]
    assert pixels[-1, -1].tolist() == [100, 70, 1]
    uncropped = create_dataset("cub", cub, "train", crop=False).load_image(0)
    assert uncropped.size == (20, 16)


def test_fractional_and_overhanging_boxes_are_widened_and_clipped(tmp_path: Path) -> None:
    folder = make_cub(tmp_path, box=(14.5, -3.0, 10.0, 8.2))
    image = create_dataset("cub", folder, "train").load_image(0)
    # x: floor(14.5) = 14 .. min(20, ceil(24.5)) = 20; y: 0 .. ceil(5.2) = 6
    assert image.size == (6, 6)
    assert np.asarray(image)[0, 0].tolist() == [140, 0, 1]


def test_getitem_applies_the_transform(cub: Path) -> None:
    train = create_dataset("cub", cub, "train", transform=lambda image: image.size)
    assert train[2] == ((8, 6), 1)


def test_class_and_image_attributes(cub: Path) -> None:
    train = create_dataset("cub", cub, "train")
    assert train.attribute_names == list(CUB_ATTRIBUTES)
    assert train.class_attributes is not None
    np.testing.assert_allclose(train.class_attributes[1], [0.2, 0.4, 0.6])
    attributes = train.image_attributes
    assert attributes is not None and attributes.dtype == np.int8 and attributes.shape == (6, 3)
    # image id 1: attribute 1 present ((1 + 1) even), attribute 2 absent, 3 not confident
    assert attributes[0].tolist() == [1, 0, -1]
    assert attributes[1].tolist() == [1, 0, -1]  # image id 3
    assert (attributes[:, 2] == -1).all()


def test_attribute_names_one_folder_up(tmp_path: Path) -> None:
    folder = make_cub(tmp_path, attributes_one_folder_up=True)
    assert create_dataset("cub", folder, "test").attribute_names == list(CUB_ATTRIBUTES)


def test_part_locations_are_relative_to_the_cropped_image(cub: Path) -> None:
    cropped = create_dataset("cub", cub, "train", crop=True)
    assert cropped.part_names == list(CUB_PARTS)
    locations = cropped.part_locations
    assert locations is not None and locations.shape == (6, 3, 3)
    # part 1 at pixel (5, 4), box (3, 2, 8, 6): ((5 - 3) / 8, (4 - 2) / 6)
    np.testing.assert_allclose(locations[0, 0], [0.25, 1 / 3, 1.0], rtol=1e-6)
    # part 2 at (60, 60) lies outside the crop: not visible, clipped into [0, 1]
    np.testing.assert_allclose(locations[0, 1], [1.0, 1.0, 0.0])
    assert locations[0, 2, 2] == 0.0  # hidden in the annotation
    full = create_dataset("cub", cub, "train", crop=False).part_locations
    assert full is not None
    np.testing.assert_allclose(full[0, 0], [5 / 20, 4 / 16, 1.0], rtol=1e-6)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16", "LA"])
def test_every_image_mode_is_converted_to_rgb(cub: Path, mode: str) -> None:
    path = cub_image_path(cub, 1)
    source = Image.open(path).convert("RGB")
    if mode == "I;16":
        grey = (np.asarray(source.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        converted = Image.fromarray(grey)  # 16-bit greyscale ("I;16")
    elif mode == "P":
        converted = source.convert("P")
        converted.info["transparency"] = 0
    else:
        converted = source.convert(mode)
    converted.save(path, format="PNG" if mode != "CMYK" else "TIFF")
    image = create_dataset("cub", cub, "train", crop=False).load_image(0)
    assert image.mode == "RGB" and image.size == (20, 16)
    if mode in ("L", "I;16"):
        pixels = np.asarray(image, dtype=int)
        assert (pixels[..., 0] == pixels[..., 1]).all()  # grey stays grey
        assert abs(pixels[15, 19, 0] - np.asarray(source.convert("L"))[15, 19]) <= 1


def test_transparent_pixels_become_white(cub: Path) -> None:
    path = cub_image_path(cub, 1)
    rgba = np.zeros((16, 20, 4), dtype=np.uint8)  # fully transparent black
    Image.fromarray(rgba, mode="RGBA").save(path, format="PNG")
    image = create_dataset("cub", cub, "train", crop=False).load_image(0)
    assert (np.asarray(image) == 255).all()


def test_corrupt_image_is_named_when_loaded(cub: Path) -> None:
    path = cub_image_path(cub, 3)
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    train = create_dataset("cub", cub, "train")
    with pytest.raises(DatasetError, match=path.name):
        train.load_image(1)


def test_missing_image_file_is_named_at_load_time(cub: Path) -> None:
    path = cub_image_path(cub, 5)
    path.unlink()
    with pytest.raises(DatasetError, match=path.name):
        create_dataset("cub", cub, "train")


def test_box_entirely_outside_the_image_is_an_error(tmp_path: Path) -> None:
    folder = make_cub(tmp_path, box=(30.0, 2.0, 5.0, 5.0))
    train = create_dataset("cub", folder, "train")
    with pytest.raises(DatasetError, match="outside the 20x16 image"):
        train.load_image(0)
    assert create_dataset("cub", folder, "train", crop=False).load_image(0).size == (20, 16)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: (f / "image_class_labels.txt").unlink(), "image_class_labels.txt: missing file"),
        (
            lambda f: _drop_line(f / "train_test_split.txt", 4),
            "ids 4 are in images.txt but not here",
        ),
        (
            lambda f: _append(f / "bounding_boxes.txt", "99 1 1 2 2"),
            "ids 99 are in bounding_boxes.txt",
        ),
        (
            lambda f: _replace(f / "image_class_labels.txt", "5 2", "5 7"),
            "image 5 has class id '7'",
        ),
        (lambda f: _replace(f / "train_test_split.txt", "6 0", "6 2"), "split flag '2'"),
        (
            lambda f: _replace(f / "bounding_boxes.txt", "2 3.0 2.0 8.0 6.0", "2 3.0 2.0 0 6.0"),
            "positive width",
        ),
        (
            lambda f: _replace(f / "image_class_labels.txt", "7 2", "7 2 9"),
            "image_class_labels.txt:7: expected 2 fields",
        ),
        (lambda f: _append(f / "images.txt", "3 002.Laysan_Albatross/x.jpg"), "duplicate id 3"),
        (lambda f: _drop_line(f / "classes.txt", 2), "class ids must run from 1 to 2"),
    ],
)
def test_broken_index_files_are_reported_by_name(
    cub: Path, edit: Callable[[Path], None], message: str
) -> None:
    edit(cub)
    with pytest.raises(DatasetError, match=message):
        create_dataset("cub", cub, "train")


def test_missing_boxes_only_matter_for_the_crop(cub: Path) -> None:
    (cub / "bounding_boxes.txt").unlink()
    with pytest.raises(DatasetError, match="bounding_boxes.txt: missing file"):
        create_dataset("cub", cub, "train", crop=True)
    train = create_dataset("cub", cub, "train", crop=False)
    assert not train.crop and train.load_image(0).size == (20, 16)


def test_class_attribute_table_must_match_the_classes(cub: Path) -> None:
    path = cub / "attributes" / "class_attribute_labels_continuous.txt"
    path.write_text("10 20 30\n20 40 60\n")
    with pytest.raises(DatasetError, match="expected 3 rows"):
        create_dataset("cub", cub, "train")
    path.write_text("10 20 30\n20 40 60\n30 60 190\n")
    with pytest.raises(DatasetError, match=r"percentages in \[0, 100\]"):
        create_dataset("cub", cub, "train")


def test_unknown_split_and_folder_are_errors(cub: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        create_dataset("cub", cub, "dev")
    with pytest.raises(DatasetError, match="no images.txt"):
        create_dataset("cub", tmp_path / "CUB_200_2011" / "images", "train")
    assert len(create_dataset("cub", cub, "val")) == 6  # "val" is the test split


def _drop_line(path: Path, line_number: int) -> None:
    lines = path.read_text().splitlines(keepends=True)
    del lines[line_number - 1]
    path.write_text("".join(lines))


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line + "\n")


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
