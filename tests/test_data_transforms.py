"""The paper's transforms and the mean/std estimate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from _fixtures_data import make_image_folder
from openqpm.data import DATASET_STATS, build_transforms, compute_mean_std, create_dataset

MEAN = (0.2, 0.4, 0.6)
STD = (0.1, 0.2, 0.3)


@pytest.mark.parametrize("squash", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_output_is_a_square_normalised_tensor(train: bool, squash: bool) -> None:
    transform = build_transforms(train=train, image_size_px=24, mean=MEAN, std=STD, squash=squash)
    output = transform(Image.new("RGB", (50, 30), (51, 102, 153)))
    assert isinstance(output, torch.Tensor)
    assert output.shape == (3, 24, 24) and output.dtype == torch.float32


@pytest.mark.parametrize("squash", [True, False])
def test_test_transform_normalises_with_the_given_statistics(squash: bool) -> None:
    transform = build_transforms(train=False, image_size_px=16, mean=MEAN, std=STD, squash=squash)
    # a constant image at the mean normalises to zero; one std above to one
    at_mean = transform(Image.new("RGB", (40, 20), (51, 102, 153)))
    assert torch.allclose(at_mean, torch.zeros_like(at_mean), atol=0.01)
    above = transform(Image.new("RGB", (40, 20), (77, 153, 230)))
    assert torch.allclose(above, torch.ones_like(above), atol=0.03)


def test_squash_keeps_the_whole_image_and_crop_keeps_the_centre() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white left quarter
    zero_one = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    squashed = build_transforms(train=False, image_size_px=20, squash=True, **zero_one)(image)
    cropped = build_transforms(train=False, image_size_px=20, squash=False, **zero_one)(image)
    assert squashed[0, 10, 1] > 0.9  # the white quarter survives the squash
    assert cropped.max() < 0.1  # shorter side 20, centre crop 20x20: the quarter is cut off


def test_train_transform_has_the_reference_steps() -> None:
    train = build_transforms(train=True, image_size_px=32, mean=MEAN, std=STD, squash=False)
    kinds = [type(step) for step in train.transforms]
    assert kinds == [
        T.Resize,
        T.RandomCrop,
        T.RandomHorizontalFlip,
        T.ColorJitter,
        T.TrivialAugmentWide,
        T.ToTensor,
        T.Normalize,
    ]
    crop = train.transforms[1]
    assert isinstance(crop, T.RandomCrop) and crop.padding == 4
    jitter = train.transforms[3]
    assert isinstance(jitter, T.ColorJitter)
    assert jitter.brightness == (0.9, 1.1) and jitter.hue is None
    squash = build_transforms(train=True, image_size_px=32, mean=MEAN, std=STD, squash=True)
    assert isinstance(squash.transforms[0], T.Resize) and squash.transforms[0].size == (32, 32)
    assert not any(isinstance(step, T.RandomCrop) for step in squash.transforms)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="3 channels"):
        build_transforms(train=False, image_size_px=8, mean=(0.5,), std=STD, squash=True)
    with pytest.raises(ValueError, match="positive"):
        build_transforms(train=False, image_size_px=8, mean=MEAN, std=(0.1, 0.0, 0.1), squash=True)
    with pytest.raises(ValueError, match="positive"):
        build_transforms(train=False, image_size_px=0, mean=MEAN, std=STD, squash=True)


def test_dataset_stats_have_the_reference_values() -> None:
    assert set(DATASET_STATS) == {"cub", "travelingbirds", "cars", "aircraft", "imagenet"}
    assert DATASET_STATS["cub"] == ((0.4853, 0.4964, 0.4295), (0.2300, 0.2258, 0.2625))


def test_compute_mean_std_weights_every_pixel_once(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
    Image.new("RGB", (10, 10), (255, 0, 0)).save(root / "train" / "a" / "big.png")
    Image.new("RGB", (5, 4), (0, 0, 255)).save(root / "train" / "a" / "small.png")
    Image.new("RGB", (1, 1)).save(root / "val" / "a" / "x.png")
    dataset = create_dataset("imagefolder", root, "train")
    mean, std = compute_mean_std(dataset)
    share_red = 100 / 120  # 100 red pixels, 20 blue ones
    np.testing.assert_allclose(mean, (share_red, 0.0, 1 - share_red), atol=1e-9)
    bernoulli_std = np.sqrt(share_red * (1 - share_red))
    np.testing.assert_allclose(std, (bernoulli_std, 0.0, bernoulli_std), atol=1e-9)
    first_only = compute_mean_std(dataset, max_images=1)
    assert first_only == ((1.0, 0.0, 0.0), (0.0, 0.0, 0.0))  # "big.png" sorts first


def test_compute_mean_std_rejects_empty_requests(tmp_path: Path) -> None:
    dataset = create_dataset("imagefolder", make_image_folder(tmp_path), "train")
    with pytest.raises(ValueError, match="max_images"):
        compute_mean_std(dataset, max_images=0)


def test_light_augmentation_drops_only_trivial_augment() -> None:
    import torchvision.transforms as T

    from openqpm.data import build_transforms

    kwargs = {"image_size_px": 32, "mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2, 0.2), "squash": True}
    paper = [type(t) for t in build_transforms(train=True, **kwargs).transforms]
    light = [type(t) for t in build_transforms(train=True, augment="light", **kwargs).transforms]
    assert T.TrivialAugmentWide in paper and T.TrivialAugmentWide not in light
    assert [t for t in paper if t is not T.TrivialAugmentWide] == light
    with pytest.raises(ValueError, match="augment"):
        build_transforms(train=True, augment="heavy", **kwargs)


def test_imagenet_recipe_is_random_resized_crop_and_lighting() -> None:
    from openqpm.data.transforms import AUGMENTATIONS, Lighting

    assert "imagenet" in AUGMENTATIONS
    kwargs = {"image_size_px": 32, "mean": MEAN, "std": STD, "augment": "imagenet"}
    # the recipe sets the geometry itself: squash (box-cropped birds) changes nothing
    for squash in (True, False):
        train = build_transforms(train=True, squash=squash, **kwargs)
        kinds = [type(step) for step in train.transforms]
        assert kinds == [
            T.RandomResizedCrop,
            T.RandomHorizontalFlip,
            T.ColorJitter,
            T.ToTensor,
            Lighting,
            T.Normalize,
        ]
        assert train.transforms[0].size == (32, 32)
        test = build_transforms(train=False, squash=squash, **kwargs)
        assert [type(step) for step in test.transforms] == [
            T.Resize,
            T.CenterCrop,
            T.ToTensor,
            T.Normalize,
        ]
        assert test.transforms[0].size == 37  # round(32 * 256 / 224): shorter side
        assert test.transforms[1].size == (32, 32)
    output = build_transforms(train=True, squash=False, **kwargs)(Image.new("RGB", (50, 30)))
    assert output.shape == (3, 32, 32)
    # 224 px: the reference code's Resize(256) + CenterCrop(224)
    test_224 = build_transforms(train=False, squash=False, **{**kwargs, "image_size_px": 224})
    assert test_224.transforms[0].size == 256 and test_224.transforms[1].size == (224, 224)


def test_lighting_adds_one_pca_colour_offset_drawn_from_torch() -> None:
    from openqpm.data.transforms import (
        IMAGENET_PCA_EIGENVALUES,
        IMAGENET_PCA_EIGENVECTORS,
        Lighting,
    )

    image = torch.rand(3, 5, 4)
    torch.manual_seed(7)
    shifted = Lighting(0.1)(image)
    torch.manual_seed(7)
    alpha = torch.randn(3) * 0.1
    vectors = torch.tensor(IMAGENET_PCA_EIGENVECTORS)
    values = torch.tensor(IMAGENET_PCA_EIGENVALUES)
    # channel i moves by sum_j vectors[i, j] * alpha[j] * values[j], the same at every pixel
    offset = torch.stack(
        [sum(vectors[i, j] * alpha[j] * values[j] for j in range(3)) for i in range(3)]
    )
    torch.testing.assert_close(shifted - image, offset.view(3, 1, 1).expand(3, 5, 4))
    assert not torch.equal(shifted, image)
    assert Lighting(0.0)(image) is image
    assert "alphastd=0.05" in repr(Lighting())  # the reference code's ImageNet value
    with pytest.raises(ValueError, match="alphastd"):
        Lighting(-1.0)
