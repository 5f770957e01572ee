"""TravelingBirds, Stanford Cars (three layouts), FGVC-Aircraft, ImageNet and ImageFolder trees."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from _fixtures_data import (
    AIRCRAFT_TEST,
    AIRCRAFT_TRAINVAL,
    AIRCRAFT_VARIANTS,
    CARS_CLASSES,
    make_aircraft,
    make_cars_annos,
    make_cars_csv,
    make_cars_devkit,
    make_cub,
    make_image_folder,
    make_travelingbirds,
    write_image,
)
from openqpm.data import DATASET_STATS, DatasetError, create_dataset

# ----------------------------------------------------------------------------- TravelingBirds


def test_travelingbirds_maps_to_cub_ids_and_split(tmp_path: Path) -> None:
    cub = make_cub(tmp_path / "CUB200")
    make_travelingbirds(tmp_path / "TravelingBirds", cub)  # CUB found one folder up and over
    train = create_dataset("travelingbirds", tmp_path / "TravelingBirds", "train")
    test = create_dataset("travelingbirds", tmp_path / "TravelingBirds" / "CUB_fixed", "test")
    assert train.image_ids.tolist() == [1, 3, 5, 7, 9, 11]
    assert test.image_ids.tolist() == [2, 4, 6, 8, 10, 12]
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert train.mean_std == DATASET_STATS["travelingbirds"]
    # pixels come from CUB_fixed (blue = 200 + id), the box from CUB: (3, 2, 8, 6)
    image = np.asarray(train.load_image(1))
    assert image.shape == (6, 8, 3) and image[0, 0].tolist() == [30, 20, 203]
    assert train.class_attributes is not None and train.part_locations is not None


def test_travelingbirds_with_an_explicit_cub_root_and_unknown_images(tmp_path: Path) -> None:
    cub = make_cub(tmp_path / "elsewhere" / "deep")
    fixed = make_travelingbirds(tmp_path / "tb", cub)
    with pytest.raises(DatasetError, match="pass cub_root"):
        create_dataset("travelingbirds", tmp_path / "tb", "train")
    train = create_dataset("travelingbirds", fixed, "train", cub_root=cub.parent)
    assert len(train) == 6
    (fixed / "train" / "001.Black_footed_Albatross" / "stray.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="1 images not in CUB's images.txt: .*stray.jpg"):
        create_dataset("travelingbirds", fixed, "train", cub_root=cub)


def test_travelingbirds_missing_split_images_are_reported(tmp_path: Path) -> None:
    cub = make_cub(tmp_path / "data")
    fixed = make_travelingbirds(tmp_path / "data", cub)
    shutil.rmtree(fixed / "test" / "003.Sooty_Albatross")
    with pytest.raises(DatasetError, match="2 images of CUB's test split are missing"):
        create_dataset("travelingbirds", tmp_path / "data", "test")


# ----------------------------------------------------------------------------- Stanford Cars


@pytest.mark.parametrize("layout", ["devkit", "csv", "annos"])
def test_cars_layouts_give_the_same_data_set(tmp_path: Path, layout: str) -> None:
    maker = {"devkit": make_cars_devkit, "csv": make_cars_csv, "annos": make_cars_annos}[layout]
    maker(tmp_path)
    train = create_dataset("cars", tmp_path, "train", crop=False)
    test = create_dataset("cars", tmp_path, "test", crop=False)
    assert train.class_names == list(CARS_CLASSES)
    assert train.labels.tolist() == [0, 1, 1] and test.labels.tolist() == [1, 0]
    assert train.mean_std == DATASET_STATS["cars"]
    assert train.load_image(0).size == (20, 16)
    # MATLAB corners (2, 3)-(11, 9), 1-based inclusive -> x, y, w, h = 1, 2, 10, 7
    assert train.boxes is not None
    np.testing.assert_allclose(train.boxes[0], [1, 2, 10, 7])
    cropped = create_dataset("cars", tmp_path, "train", crop=True).load_image(0)
    assert cropped.size == (10, 7) and np.asarray(cropped)[0, 0, :2].tolist() == [10, 20]


def test_cars_devkit_without_test_labels_says_which_file_is_missing(tmp_path: Path) -> None:
    make_cars_devkit(tmp_path, with_test_labels=False)
    assert len(create_dataset("cars", tmp_path, "train")) == 3
    with pytest.raises(DatasetError, match="cars_test_annos_withlabels.mat: missing file"):
        create_dataset("cars", tmp_path, "test")


def test_cars_csv_errors_name_the_line(tmp_path: Path) -> None:
    make_cars_csv(tmp_path)
    (tmp_path / "anno_train.csv").write_text("00001.jpg,2,3,11,9,1\n00009.jpg,1,1,4,4,3\n")
    with pytest.raises(DatasetError, match=r"anno_train.csv:2: class '3' outside 1..2"):
        create_dataset("cars", tmp_path, "train")
    (tmp_path / "anno_train.csv").write_text("00001.jpg,2,3,11,9,1\n00042.jpg,1,1,4,4,1\n")
    with pytest.raises(DatasetError, match=r"anno_train.csv:2: image '00042.jpg' not found"):
        create_dataset("cars", tmp_path, "train")


def test_cars_unreadable_mat_file_is_named(tmp_path: Path) -> None:
    base = make_cars_devkit(tmp_path)
    (base / "devkit" / "cars_train_annos.mat").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="cars_train_annos.mat: cannot read"):
        create_dataset("cars", tmp_path, "train")


# ----------------------------------------------------------------------------- FGVC-Aircraft


def test_aircraft_variants_trainval_and_test(tmp_path: Path) -> None:
    make_aircraft(tmp_path)
    train = create_dataset("aircraft", tmp_path, "trainval", crop=False)
    test = create_dataset("aircraft", tmp_path / "fgvc-aircraft-2013b", "test", crop=False)
    assert train.class_names == list(AIRCRAFT_VARIANTS)
    assert train.labels.tolist() == [AIRCRAFT_VARIANTS.index(v) for _, v in AIRCRAFT_TRAINVAL]
    assert test.labels.tolist() == [AIRCRAFT_VARIANTS.index(v) for _, v in AIRCRAFT_TEST]
    assert train.image_paths[1].name == "0034958.jpg"
    cropped = create_dataset("aircraft", tmp_path, "train").load_image(0)
    assert cropped.size == (10, 8)  # corners (3, 2)-(12, 9), 1-based inclusive


def test_aircraft_unknown_variant_is_named(tmp_path: Path) -> None:
    data = make_aircraft(tmp_path)
    (data / "images_variant_test.txt").write_text("1514522 Boeing 999\n")
    with pytest.raises(DatasetError, match=r"images_variant_test.txt:1: variant 'Boeing 999'"):
        create_dataset("aircraft", tmp_path, "test")


# ----------------------------------------------------------------------------- folders


def test_image_folder_tree(tmp_path: Path) -> None:
    make_image_folder(tmp_path, test_folder="test")
    train = create_dataset("imagefolder", tmp_path, "train")
    test = create_dataset("imagefolder", tmp_path, "val")
    assert train.class_names == ["cat", "dog", "red fox"]
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2] and len(test) == 6
    assert train.boxes is None and not train.crop
    assert np.asarray(train.load_image(3))[0, 0, 2] == 11  # dog/1.png


def test_image_folder_test_classes_must_exist_in_train(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    (tmp_path / "val" / "wolf").mkdir()
    with pytest.raises(DatasetError, match=r"class folders \['wolf'\] are not in"):
        create_dataset("imagefolder", tmp_path, "test")


def test_image_folder_refuses_a_link_loop_by_name(tmp_path: Path) -> None:
    """A link back up the tree made 12 images into hundreds, with wrong labels, "usable"."""
    from openqpm.data import check_dataset

    make_image_folder(tmp_path)
    loop = tmp_path / "train" / "cat" / "loop"
    loop.symlink_to("..", target_is_directory=True)
    with pytest.raises(DatasetError, match=r"cat/loop is the folder .*train again"):
        create_dataset("imagefolder", tmp_path, "train")
    problems = check_dataset(tmp_path, "imagefolder", image_check="none")
    assert len(problems) == 1 and str(loop) in problems[0] and "link" in problems[0]
    loop.unlink()
    assert len(create_dataset("imagefolder", tmp_path, "train")) == 6
    assert check_dataset(tmp_path, "imagefolder", image_check="none") == []


def test_image_folder_refuses_a_link_from_one_class_into_another(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    (tmp_path / "train" / "cat" / "more").symlink_to(
        tmp_path / "train" / "dog", target_is_directory=True
    )
    with pytest.raises(DatasetError, match=r"train/dog is the folder .*cat/more again"):
        create_dataset("imagefolder", tmp_path, "train")


def test_image_folder_follows_a_link_to_a_folder_kept_elsewhere(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "tree")
    elsewhere = tmp_path / "disk2" / "foxes"
    elsewhere.parent.mkdir()
    shutil.move(root / "train" / "red_fox", elsewhere)
    (root / "train" / "red_fox").symlink_to(elsewhere, target_is_directory=True)
    (root / "train" / "dog" / "batch2").symlink_to(tmp_path / "more", target_is_directory=True)
    write_image(tmp_path / "more" / "extra.png", blue=99)
    train = create_dataset("imagefolder", root, "train")
    assert train.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert train.image_paths[4].name == "extra.png"


def test_imagenet_readable_names_and_flat_validation_folder(tmp_path: Path) -> None:
    wordnet_ids = ("n01440764", "n01443537")
    make_image_folder(tmp_path / "CLS-LOC", wordnet_ids)
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
    )
    train = create_dataset("imagenet", tmp_path / "CLS-LOC", "train")
    assert train.class_names == ["tench", "goldfish"]
    # the raw archive's flat val/ folder, labelled by Kaggle's LOC_val_solution.csv
    val = tmp_path / "CLS-LOC" / "val"
    for class_folder in list(val.iterdir()):
        for image in class_folder.iterdir():
            image.rename(val / f"{class_folder.name}_{image.name}")
        class_folder.rmdir()
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "n01443537_0,n01443537 1 2 3 4\nn01440764_1,n01440764 5 6 7 8 n01440764 1 1 2 2\n"
    )
    test = create_dataset("imagenet", tmp_path / "CLS-LOC", "test")
    assert test.labels.tolist() == [1, 0]
    assert [path.name for path in test.image_paths] == ["n01443537_0.png", "n01440764_1.png"]


def test_cars_kaggle_copy_of_the_devkit_layout(tmp_path: Path) -> None:
    base = make_cars_devkit(tmp_path)
    # Kaggle's copy: car_devkit/devkit/, cars_train/cars_train/, "... (1).mat" test labels
    (base / "car_devkit").mkdir()
    (base / "devkit").rename(base / "car_devkit" / "devkit")
    for split in ("train", "test"):
        (base / f"cars_{split}").rename(base / "nested")
        (base / f"cars_{split}").mkdir()
        (base / "nested").rename(base / f"cars_{split}" / f"cars_{split}")
    (base / "cars_test_annos_withlabels.mat").rename(base / "cars_test_annos_withlabels (1).mat")
    test = create_dataset("cars", tmp_path, "test", crop=False)
    assert test.labels.tolist() == [1, 0]
    assert test.image_paths[0] == base / "cars_test" / "cars_test" / "00001.jpg"
