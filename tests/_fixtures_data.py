"""Tiny data set folders in each real layout, generated into a temporary folder by the tests.

Every image encodes its own pixel coordinates (red = 10 * x, green = 10 * y, blue = a per-image
value), so a crop can be checked pixel by pixel. Nothing here is committed as a binary.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

IMAGE_SIZE = (20, 16)  # width, height of every fixture image


def coordinate_image(blue: int, size: tuple[int, int] = IMAGE_SIZE) -> Image.Image:
    """An RGB image whose pixel (x, y) is (10 x, 10 y, blue)."""
    width, height = size
    x = np.arange(width)[None, :].repeat(height, axis=0)  # (H, W)
    y = np.arange(height)[:, None].repeat(width, axis=1)  # (H, W)
    pixels = np.stack([10 * x, 10 * y, np.full_like(x, blue)], axis=-1)  # (H, W, 3)
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


def write_image(path: Path, blue: int = 0, size: tuple[int, int] = IMAGE_SIZE) -> Path:
    """Write a coordinate image; PNG-encoded whatever the suffix, so that pixels stay exact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    coordinate_image(blue, size).save(path, format="PNG")
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- CUB-200-2011

CUB_CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")
CUB_PARTS = ("back", "beak", "left eye")
CUB_ATTRIBUTES = ("has_bill_shape::curved", "has_eye_color::red", "has_size::small")
CUB_IMAGES_PER_CLASS = 4  # two train, two test


def make_cub(
    root: Path,
    *,
    attributes_one_folder_up: bool = False,
    box: tuple[float, float, float, float] = (3.0, 2.0, 8.0, 6.0),
) -> Path:
    """A CUB_200_2011 folder below ``root``: 3 classes x 4 images, parts and attributes.

    Image ``i`` (1-based) has blue value ``i``, the box ``box`` (x, y, w, h), is in the training
    split when ``i`` is odd-numbered within its class, and has part 1 at (5, 4) visible, part 2
    at (60, 60) visible (outside the image), part 3 hidden. Attribute ``a`` of image ``i`` is
    present with certainty 4 when ``(i + a)`` is even, and has certainty 2 (guessing) when
    ``a == 3``. Class ``c`` has the continuous attributes ``(10 c, 20 c, 30 c)`` percent.

    Returns:
        The ``CUB_200_2011`` folder.
    """
    folder = root / "CUB_200_2011"
    images, labels, split, boxes, part_locs, attribute_labels = [], [], [], [], [], []
    image_id = 0
    for class_id, class_folder in enumerate(CUB_CLASSES, start=1):
        for member in range(CUB_IMAGES_PER_CLASS):
            image_id += 1
            relative = f"{class_folder}/{class_folder[4:]}_{member:04d}_{image_id}.jpg"
            write_image(folder / "images" / relative, blue=image_id)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {int(member % 2 == 0)}")
            boxes.append(f"{image_id} {' '.join(str(v) for v in box)}")
            part_locs += [
                f"{image_id} 1 5.0 4.0 1",
                f"{image_id} 2 60.0 60.0 1",
                f"{image_id} 3 0.0 0.0 0",
            ]
            for attribute in range(1, len(CUB_ATTRIBUTES) + 1):
                certainty = 2 if attribute == 3 else 4
                present = int((image_id + attribute) % 2 == 0)
                attribute_labels.append(f"{image_id} {attribute} {present} {certainty} 12.5")
    write_lines(folder / "images.txt", images)
    write_lines(folder / "image_class_labels.txt", labels)
    write_lines(folder / "train_test_split.txt", split)
    write_lines(folder / "bounding_boxes.txt", boxes)
    write_lines(folder / "classes.txt", [f"{c} {name}" for c, name in enumerate(CUB_CLASSES, 1)])
    write_lines(folder / "parts" / "parts.txt", [f"{p} {n}" for p, n in enumerate(CUB_PARTS, 1)])
    write_lines(folder / "parts" / "part_locs.txt", part_locs)
    names = [f"{a} {name}" for a, name in enumerate(CUB_ATTRIBUTES, 1)]
    if attributes_one_folder_up:  # where the CUB archive puts it
        write_lines(root / "attributes.txt", names)
    else:
        write_lines(folder / "attributes" / "attributes.txt", names)
    write_lines(folder / "attributes" / "image_attribute_labels.txt", attribute_labels)
    write_lines(
        folder / "attributes" / "class_attribute_labels_continuous.txt",
        [f"{10.0 * c} {20.0 * c} {30.0 * c}" for c in range(1, len(CUB_CLASSES) + 1)],
    )
    return folder


def cub_image_path(folder: Path, image_id: int) -> Path:
    """The file of a fixture CUB image, from ``images.txt``."""
    for line in (folder / "images.txt").read_text().splitlines():
        identifier, relative = line.split()
        if int(identifier) == image_id:
            return folder / "images" / relative
    raise KeyError(image_id)


def make_travelingbirds(root: Path, cub_folder: Path) -> Path:
    """``root/CUB_fixed/{train,test}`` holding every CUB image (as in the CBM release).

    The copies get blue value 200 + id, so that tests can tell them from CUB's own images.
    """
    fixed = root / "CUB_fixed"
    for line in (cub_folder / "images.txt").read_text().splitlines():
        image_id, relative = line.split()
        for split in ("train", "test"):
            write_image(fixed / split / relative, blue=200 + int(image_id))
    return fixed


# ----------------------------------------------------------------------------- Stanford Cars

CARS_CLASSES = ("AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012")
# (file, class id 1-based, x1, y1, x2, y2) per split; MATLAB corners are 1-based inclusive
CARS_TRAIN = (
    ("00001.jpg", 1, 2, 3, 11, 9),
    ("00002.jpg", 2, 1, 1, 20, 16),
    ("00003.jpg", 2, 5, 5, 6, 6),
)
CARS_TEST = (("00001.jpg", 2, 2, 2, 8, 8), ("00002.jpg", 1, 1, 1, 4, 4))


def _cell(values: list[str]) -> np.ndarray:
    cell = np.empty((1, len(values)), dtype=object)
    for index, value in enumerate(values):
        cell[0, index] = value
    return cell


def _annotation_struct(
    rows: tuple[tuple[object, ...], ...], *, with_class: bool = True
) -> np.ndarray:
    fields = [
        "bbox_x1",
        "bbox_y1",
        "bbox_x2",
        "bbox_y2",
        *(["class"] if with_class else []),
        "fname",
    ]
    struct = np.zeros((1, len(rows)), dtype=[(field, object) for field in fields])
    for index, (fname, class_id, x1, y1, x2, y2) in enumerate(rows):
        values = [np.array([[v]], dtype=np.uint16) for v in (x1, y1, x2, y2)]
        if with_class:
            values.append(np.array([[class_id]], dtype=np.uint8))
        struct[0, index] = (*values, np.array([fname]))
    return struct


def make_cars_devkit(root: Path, *, with_test_labels: bool = True) -> Path:
    """The devkit layout in ``root/stanford_cars``; returns that folder."""
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": _cell(list(CARS_CLASSES))})
    savemat(
        base / "devkit" / "cars_train_annos.mat", {"annotations": _annotation_struct(CARS_TRAIN)}
    )
    savemat(
        base / "devkit" / "cars_test_annos.mat",
        {"annotations": _annotation_struct(CARS_TEST, with_class=False)},
    )
    if with_test_labels:
        savemat(
            base / "cars_test_annos_withlabels.mat", {"annotations": _annotation_struct(CARS_TEST)}
        )
    for split, rows in (("train", CARS_TRAIN), ("test", CARS_TEST)):
        for number, (fname, *_) in enumerate(rows, start=1):
            write_image(
                base / f"cars_{split}" / fname, blue=number + (100 if split == "test" else 0)
            )
    return base


def make_cars_csv(root: Path) -> Path:
    """The Kaggle "by classes folder" layout (CSV annotations, class folders); returns ``root``."""
    write_lines(root / "names.csv", list(CARS_CLASSES))
    for split, rows in (("train", CARS_TRAIN), ("test", CARS_TEST)):
        with (root / f"anno_{split}.csv").open("w", newline="") as stream:
            writer = csv.writer(stream)
            for fname, class_id, x1, y1, x2, y2 in rows:
                writer.writerow([fname, x1, y1, x2, y2, class_id])
        for number, (fname, class_id, *_) in enumerate(rows, start=1):
            # Class folders cannot hold "/": the Kaggle copy renamed them.
            class_folder = CARS_CLASSES[class_id - 1].replace("/", "-")
            write_image(
                root / "car_data" / "car_data" / split / class_folder / fname,
                blue=number + (100 if split == "test" else 0),
            )
    return root


def make_cars_annos(root: Path) -> Path:
    """The single-file layout: ``cars_annos.mat`` + ``car_ims/``; returns ``root``."""
    rows = [
        (f"car_ims/{n:06d}.jpg", c, x1, y1, x2, y2, 0)
        for n, (_, c, x1, y1, x2, y2) in enumerate(CARS_TRAIN, 1)
    ]
    rows += [
        (f"car_ims/{n:06d}.jpg", c, x1, y1, x2, y2, 1)
        for n, (_, c, x1, y1, x2, y2) in enumerate(CARS_TEST, len(rows) + 1)
    ]
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    struct = np.zeros((1, len(rows)), dtype=[(field, object) for field in fields])
    for index, (path, class_id, x1, y1, x2, y2, test) in enumerate(rows):
        struct[0, index] = (
            np.array([path]),
            *(np.array([[v]], dtype=np.uint16) for v in (x1, y1, x2, y2)),
            np.array([[class_id]], dtype=np.uint8),
            np.array([[test]], dtype=np.uint8),
        )
        write_image(root / path, blue=index)
    savemat(
        root / "cars_annos.mat", {"annotations": struct, "class_names": _cell(list(CARS_CLASSES))}
    )
    return root


# ----------------------------------------------------------------------------- FGVC-Aircraft

AIRCRAFT_VARIANTS = ("707-320", "Boeing 717", "Cessna 172")
AIRCRAFT_TRAINVAL = (("0034309", "707-320"), ("0034958", "Boeing 717"), ("0037511", "Cessna 172"))
AIRCRAFT_TEST = (("1514522", "Boeing 717"), ("0062765", "707-320"), ("0041234", "Cessna 172"))


def make_aircraft(root: Path) -> Path:
    """``root/fgvc-aircraft-2013b/data``; every box is (3, 2)-(12, 9) in 1-based corners."""
    data = root / "fgvc-aircraft-2013b" / "data"
    write_lines(data / "variants.txt", list(AIRCRAFT_VARIANTS))
    write_lines(data / "images_variant_trainval.txt", [f"{i} {v}" for i, v in AIRCRAFT_TRAINVAL])
    write_lines(data / "images_variant_test.txt", [f"{i} {v}" for i, v in AIRCRAFT_TEST])
    all_ids = [image_id for image_id, _ in AIRCRAFT_TRAINVAL + AIRCRAFT_TEST]
    write_lines(data / "images_box.txt", [f"{i} 3 2 12 9" for i in all_ids])
    for number, image_id in enumerate(all_ids):
        write_image(data / "images" / f"{image_id}.jpg", blue=number)
    return data


# ----------------------------------------------------------------------------- ImageFolder trees


def make_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "red_fox"),
    *,
    test_folder: str = "val",
    n_per_class: int = 2,
) -> Path:
    """``root/{train,<test_folder>}/<class>/<n>.png``; returns ``root``."""
    for split in ("train", test_folder):
        for class_index, name in enumerate(classes):
            for member in range(n_per_class):
                write_image(root / split / name / f"{member}.png", blue=10 * class_index + member)
    return root
