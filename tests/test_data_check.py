"""Layout detection, the registry, and check_dataset's report of every kind of bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from _fixtures_data import (
    cub_image_path,
    make_aircraft,
    make_cars_annos,
    make_cars_csv,
    make_cars_devkit,
    make_cub,
    make_image_folder,
    make_travelingbirds,
)
from openqpm.data import (
    DatasetError,
    check_dataset,
    create_dataset,
    dataset_names,
    detect_dataset,
    make_synthetic,
    resize_squashes,
)


def _travelingbirds(root: Path) -> Path:
    make_travelingbirds(root, make_cub(root))
    return root / "CUB_fixed"


def _imagenet(root: Path) -> Path:
    return make_image_folder(root, ("n01440764", "n01443537"))


LAYOUTS: dict[str, Callable[[Path], Path]] = {
    "synthetic": lambda root: make_synthetic(root / "s", n_classes=4, n_images_per_class=3),
    "cub": make_cub,
    "travelingbirds": _travelingbirds,
    "cars": make_cars_devkit,
    "aircraft": make_aircraft,
    "imagenet": _imagenet,
    "imagefolder": make_image_folder,
}


def test_every_registered_data_set_has_a_fixture() -> None:
    assert set(dataset_names()) == set(LAYOUTS)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_layout_is_detected_checked_and_loaded(tmp_path: Path, name: str) -> None:
    root = LAYOUTS[name](tmp_path)
    assert detect_dataset(root) == name
    assert check_dataset(root) == []
    assert check_dataset(root, name, image_check="sample") == []
    train = create_dataset(name, root, "train")
    test = create_dataset(name, root, "test")
    assert len(train) > 0 and len(test) > 0 and train.n_classes == test.n_classes
    image, label = train[0]
    assert image.mode == "RGB" and 0 <= label < train.n_classes


def test_only_box_cropped_birds_are_squashed() -> None:
    squashed = {name for name in dataset_names() if resize_squashes(name, True)}
    assert squashed == {"cub", "travelingbirds", "synthetic"}
    assert not any(resize_squashes(name, False) for name in dataset_names())
    assert resize_squashes(" CUB ", True)  # names as create_dataset accepts them
    with pytest.raises(DatasetError, match="unknown data set 'cub2011'"):
        resize_squashes("cub2011", True)


@pytest.mark.parametrize("maker", [make_cars_csv, make_cars_annos])
def test_other_cars_layouts_are_detected(tmp_path: Path, maker: Callable[[Path], Path]) -> None:
    maker(tmp_path)
    assert detect_dataset(tmp_path) == "cars"
    assert check_dataset(tmp_path) == []


def test_unknown_layout_and_names_list_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="(?s)no known data set layout.*cub: CUB-200-2011"):
        detect_dataset(tmp_path)
    with pytest.raises(
        DatasetError, match="unknown data set 'cub2011'; valid: synthetic, travelingbirds, cub"
    ):
        create_dataset("cub2011", tmp_path, "train")
    assert check_dataset(tmp_path / "absent") == [
        f"{tmp_path / 'absent'}: data set folder not found"
    ]
    problems = check_dataset(tmp_path)
    assert len(problems) == 1 and "no known data set layout" in problems[0]
    with pytest.raises(ValueError, match="unknown image_check"):
        check_dataset(tmp_path, image_check="quick")


def test_missing_index_file_is_named(tmp_path: Path) -> None:
    cub = make_cub(tmp_path)
    (cub / "train_test_split.txt").unlink()
    assert check_dataset(tmp_path, "cub") == [f"{cub / 'train_test_split.txt'}: missing file"]


def test_ids_in_one_index_file_and_not_another_are_named(tmp_path: Path) -> None:
    cub = make_cub(tmp_path)
    labels = cub / "image_class_labels.txt"
    labels.write_text("".join(line + "\n" for line in labels.read_text().splitlines()[:-2]))
    problems = check_dataset(cub)
    assert problems == [
        f"{labels}: ids 11, 12 are in images.txt but not here",
    ]


def test_corrupt_and_missing_images_are_named(tmp_path: Path) -> None:
    cub = make_cub(tmp_path)
    corrupt = cub_image_path(cub, 2)
    corrupt.write_bytes(corrupt.read_bytes()[:60])  # truncated
    missing = cub_image_path(cub, 7)
    missing.unlink()
    problems = check_dataset(cub)
    assert len(problems) == 2
    assert problems[0].startswith(f"{corrupt}: cannot read image")
    assert problems[1] == f"{missing}: image file not found"
    sampled = check_dataset(cub, image_check="none")
    assert sampled == [f"{missing}: image file not found"]


def test_boxes_are_clipped_and_only_empty_ones_are_problems(tmp_path: Path) -> None:
    cub = make_cub(tmp_path, box=(15.0, 10.0, 30.0, 30.0))  # sticks out right and bottom
    assert check_dataset(cub) == []
    boxes = cub / "bounding_boxes.txt"
    boxes.write_text(boxes.read_text().replace("3 15.0 10.0 30.0 30.0", "3 25.0 1.0 4.0 4.0"))
    problems = check_dataset(cub)
    assert len(problems) == 1
    assert problems[0].startswith(f"{cub_image_path(cub, 3)}: bounding box (x, y, w, h) = ")
    assert "lies outside the 20x16 image" in problems[0]


def test_empty_class_is_named(tmp_path: Path) -> None:
    cub = make_cub(tmp_path)
    split = cub / "train_test_split.txt"
    # class 2 (images 5-8) loses its training images
    split.write_text(split.read_text().replace("5 1", "5 0").replace("7 1", "7 0"))
    assert check_dataset(cub) == [
        f"{cub} (train split): class 2 ('Laysan Albatross') has no images"
    ]


def test_label_out_of_range_is_named(tmp_path: Path) -> None:
    cub = make_cub(tmp_path)
    labels = cub / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace("9 3", "9 4"))
    assert check_dataset(cub) == [
        f"{labels}: image 9 has class id '4', expected 1..3 (the ids of classes.txt)"
    ]


def test_malformed_part_locations_are_named(tmp_path: Path) -> None:
    cub = make_cub(tmp_path)
    part_locs = cub / "parts" / "part_locs.txt"
    part_locs.write_text(part_locs.read_text() + "77 1 5.0 4.0 1\n4 9 1.0 1.0 1\n")
    problems = check_dataset(cub)
    assert problems == [
        f"{part_locs}: image ids [77] are not in images.txt",
        f"{part_locs}: part ids [9] outside 1..3",
    ]


def test_image_attribute_problems_are_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cub = make_cub(tmp_path)
    path = cub / "attributes" / "image_attribute_labels.txt"
    path.write_text(path.read_text() + "1 2\n1 3 1 4 0 extra fields\n")
    train = create_dataset("cub", cub, "train")
    attributes = train.image_attributes
    assert attributes is not None and attributes[0, 2] == 1  # the extra-field line still counts
    assert "malformed line '1 2'" in caplog.text


def test_travelingbirds_check_names_missing_images(tmp_path: Path) -> None:
    fixed = _travelingbirds(tmp_path)
    (fixed / "train" / "002.Laysan_Albatross" / "Laysan_Albatross_0000_5.jpg").unlink()
    problems = check_dataset(tmp_path)
    missing = "002.Laysan_Albatross/Laysan_Albatross_0000_5.jpg"
    assert problems == [f"{fixed / 'train'}: 1 images of CUB's train split are missing: {missing}"]


def test_cars_check_names_empty_classes(tmp_path: Path) -> None:
    make_cars_csv(tmp_path)
    (tmp_path / "anno_test.csv").write_text("00001.jpg,2,2,8,8,2\n")
    problems = check_dataset(tmp_path)
    assert problems == [
        f"{tmp_path} (test split): class 1 ('AM General Hummer SUV 2000') has no images"
    ]
