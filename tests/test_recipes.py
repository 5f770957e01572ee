"""The paper's recipes as shipped configurations: ImageNet's pretrained dense model, and a
training step of every shipped configuration on a tiny folder of its data set's layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import openqpm
from _fixtures_data import (
    make_aircraft,
    make_cars_devkit,
    make_cub,
    make_image_folder,
    make_travelingbirds,
)
from openqpm.config import RunConfig, config_names, load_config
from openqpm.data import build_transforms
from openqpm.data._base import IMAGENET_MEAN_STD
from openqpm.pipeline import PipelineError

WORDNET_IDS = ("n01440764", "n01443537", "n01484850")


def _imagenet(root: Path) -> Path:
    return make_image_folder(root / "imagenet", WORDNET_IDS, n_per_class=3)


def _travelingbirds(root: Path) -> Path:
    make_travelingbirds(root, make_cub(root))
    return root / "CUB_fixed"


def _synthetic(root: Path) -> Path:
    from openqpm.data.synthetic import make_synthetic

    return make_synthetic(root / "s", n_classes=4, n_images_per_class=4, image_size_px=32)


# a tiny folder in the layout of each data set a shipped configuration names
LAYOUTS: dict[str, Callable[[Path], Path]] = {
    "cub": make_cub,
    "travelingbirds": _travelingbirds,
    "cars": make_cars_devkit,
    "aircraft": make_aircraft,
    "imagenet": _imagenet,
    "synthetic": _synthetic,
}


def _classifier_file(tmp_path: Path, n_classes: int, *, suffix: str = ".pth") -> Path:
    """A torchvision ResNet-18 state dict with an ``fc`` of ``n_classes``, saved as torchvision
    does (``torch.save``) or as safetensors; the classifier gets large, distinct weights."""
    network = torchvision.models.resnet18(weights=None, num_classes=n_classes)
    with torch.no_grad():
        network.fc.weight.normal_(0.0, 1.0)
        network.fc.bias.copy_(torch.linspace(-0.5, 0.5, n_classes))
    state = network.state_dict()
    path = tmp_path / f"resnet18-{n_classes}{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def _imagenet_config(root: Path, weights: Path) -> RunConfig:
    """The shipped ImageNet recipe at toy scale: ResNet-18 (default strides) at 32 px."""
    return load_config(
        "imagenet_resnet50",
        overrides={
            "data.root": str(root),
            "data.image_size_px": 32,
            "data.batch_size": 4,
            "data.num_workers": 0,
            "model.arch": "resnet18",
            "model.weights": str(weights),
            "device": "cpu",
        },
    )


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_imagenet_dense_model_is_the_pretrained_classifier(tmp_path: Path, suffix: str) -> None:
    root = _imagenet(tmp_path)
    weights = _classifier_file(tmp_path, len(WORDNET_IDS), suffix=suffix)
    config = _imagenet_config(root, weights)
    assert config.dense.skip and config.data.augment == "imagenet"
    result = openqpm.run(config, tmp_path / "run", stages=("dense",))

    # the same classifier, computed directly with torchvision on the recipe's test transform
    network = torchvision.models.resnet18(weights=None, num_classes=len(WORDNET_IDS))
    if suffix == ".pth":
        network.load_state_dict(torch.load(weights, weights_only=True))
    else:
        from safetensors.torch import load_file

        network.load_state_dict(load_file(str(weights)))
    network.eval()
    mean, std = IMAGENET_MEAN_STD
    transform = build_transforms(
        train=False, image_size_px=32, mean=mean, std=std, squash=False, augment="imagenet"
    )
    images, labels = [], []
    for label, wordnet_id in enumerate(WORDNET_IDS):
        for path in sorted((root / "val" / wordnet_id).iterdir()):
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
            labels.append(label)
    batch = torch.stack(images)
    with torch.no_grad():
        expected_logits = network(batch)
    expected = 100.0 * float(np.mean(expected_logits.argmax(1).numpy() == np.array(labels)))
    assert result.summaries["dense"]["test_accuracy_percent"] == round(expected, 2)

    dense = result.load_model("dense")
    torch.testing.assert_close(dense.head.linear.weight, network.fc.weight)
    torch.testing.assert_close(dense.head.linear.bias, network.fc.bias)
    with torch.no_grad():
        torch.testing.assert_close(dense(batch), expected_logits, rtol=1e-4, atol=1e-4)
    assert dense.metadata["augment"] == "imagenet" and dense.metadata["crop"] is False


def test_skipping_dense_training_without_a_fitting_classifier_stops_first(
    tmp_path: Path,
) -> None:
    root = _imagenet(tmp_path)
    weights = _classifier_file(tmp_path, 1000)  # an ImageNet classifier, a 3-class data set
    with pytest.raises(PipelineError, match=r"resnet18-1000\.pth.*1000 classes.*has 3"):
        openqpm.run(_imagenet_config(root, weights), tmp_path / "run", stages=("dense",))
    assert not (tmp_path / "run" / "dense.safetensors").exists()
    no_weights = load_config(
        None, base=_imagenet_config(root, weights), overrides=["model.weights=null"]
    )
    with pytest.raises(PipelineError, match="model.weights is null"):
        openqpm.run(no_weights, tmp_path / "run2", stages=("dense",))


def test_the_paper_architectures_have_configurations() -> None:
    assert {"cub_resnet34", "cub_inception_v3", "cub_swin_t", "cub_swin_s"} <= set(config_names())
    for name in ("cub_swin_t", "cub_swin_s"):
        config = load_config(name)
        assert config.data.batch_size == 8 and config.model.diversity_beta == 0.0245
    inception = load_config("cub_inception_v3")
    assert inception.data.image_size_px == 299 and inception.model.diversity_beta == 0.049
    assert load_config("cub_resnet34").model.reduced_strides is True


# the smallest input each architecture of a shipped configuration takes, to keep a step cheap
_SMALL_IMAGES = {"inception_v3": 75}
# the largest networks take the longest (10 to 30 s on two busy CPU cores): -m slow runs them
# (cub_swin_t covers the Swin code path in the default run)
_SLOW = {"cub_swin_s", "cub_inception_v3"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n for n in config_names()],
)
def test_every_shipped_configuration_trains_a_step_and_reloads(tmp_path: Path, name: str) -> None:
    config = load_config(name)
    root = LAYOUTS[config.data.dataset](tmp_path / "data")
    size = _SMALL_IMAGES.get(config.model.arch, 32)
    config = load_config(
        None,
        base=config,
        overrides={
            "data.root": str(root),
            "data.image_size_px": size,
            "data.batch_size": 8,  # one batch: one optimisation step per epoch
            "data.num_workers": 0,
            "model.weights": None,
            "dense.skip": False,
            "dense.epochs": 1,
            "device": "cpu",
        },
    )
    result = openqpm.run(config, tmp_path / "run", stages=("dense",))
    dense = result.load_model("dense")  # the saved model rebuilds from its own description
    with torch.no_grad():
        logits = dense(torch.zeros(2, 3, size, size))
    assert logits.shape == (2, dense.n_classes) and torch.isfinite(logits).all()
    summary = result.summaries["dense"]
    if config.model.arch.startswith("swin"):
        # the paper drops Swin's final LayerNorm after dense training; the file records it
        assert dense.backbone.options() == {"final_norm": False}
        assert summary["backbone_changed"] == {"final_norm": False}
        assert "test_accuracy_before_change_percent" in summary
    else:
        assert "backbone_changed" not in summary
