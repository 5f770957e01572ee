"""The sparse head of the baselines (SLDD-Model, Q-SENN, glm-saga5): its forward pass, its frozen
sparsity pattern through training, save/load, and the metrics, explanations and report on it."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import openqpm
from openqpm.explain import explain_image
from openqpm.explain.report import write_report
from openqpm.metrics import evaluate_model
from openqpm.models import (
    DenseHead,
    QPMModel,
    SparseHead,
    create_backbone,
    read_metadata,
    sparse_from_dense,
)
from openqpm.training import TrainingSchedule, make_loader, train_model

N_CLASSES = 4
IMAGE_PX = 32
SELECTED = [3, 0, 17, 9, 25]
# signed, continuous, with an unused last column and classes of 1 to 3 features
WEIGHT = [
    [0.8, 0.0, -0.5, 0.0, 0.0],
    [0.0, 1.2, 0.0, 0.3, 0.0],
    [-0.4, 0.0, 0.0, 0.9, 0.0],
    [0.0, 0.0, 0.7, 0.0, 0.0],
]
BIAS = [0.1, -0.2, 0.05, 0.0]
FLAG_NAMES = ("train_normalisation", "train_weights", "train_bias")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the tensors are tiny (see tests/test_training.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _flags(normalisation: bool = False, weights: bool = False, bias: bool = False) -> dict:
    return {"train_normalisation": normalisation, "train_weights": weights, "train_bias": bias}


def _dense_model(seed: int = 1) -> QPMModel:
    torch.manual_seed(seed)
    backbone = create_backbone("tiny_cnn")
    return QPMModel(
        backbone,
        DenseHead(backbone.n_features, N_CLASSES),
        class_names=[f"class {c}" for c in range(N_CLASSES)],
        metadata={"image_size_px": IMAGE_PX, "data_mean": [0.5] * 3, "data_std": [0.25] * 3},
    )


def _sparse_model(*, with_bias: bool = True, dropout: float = 0.1, **flags: bool) -> QPMModel:
    generator = torch.Generator().manual_seed(3)
    return sparse_from_dense(
        _dense_model(),
        SELECTED,
        torch.rand(len(SELECTED), generator=generator),
        torch.rand(len(SELECTED), generator=generator) + 0.5,
        WEIGHT,
        BIAS if with_bias else None,
        dropout=dropout,
        **{**_flags(), **flags},
    )


def _images(n_images: int, *, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 3, IMAGE_PX, IMAGE_PX, generator=generator)
    labels = torch.arange(n_images) % N_CLASSES
    images[:, 0] += 1.5 * labels[:, None, None].float() - 2.0
    return TensorDataset(images, labels)


def _head_state(model: QPMModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.head.state_dict().items()}


# --------------------------------------------------------------------------------------------
# the head


def test_sparse_head_computes_normalised_sparse_logits_by_hand() -> None:
    mean, std = torch.tensor([0.5, 0.0, 1.0, 2.0, 0.1]), torch.tensor([0.5, 1.0, 2.0, 0.0, 1.0])
    head = SparseHead(SELECTED, mean, std, WEIGHT, BIAS, dropout=0.3).eval()
    maps = torch.rand(2, 32, 3, 3)
    pooled = maps.mean(dim=(2, 3))[:, SELECTED]
    normalised = (pooled - mean) / std.clamp(min=1e-6)  # the zero std stays finite
    expected = normalised @ torch.tensor(WEIGHT).T + torch.tensor(BIAS)
    torch.testing.assert_close(head(maps), expected)
    torch.testing.assert_close(head.pre_logits(maps), normalised)
    assert head.select_maps(maps).shape == (2, 5, 3, 3)
    assert torch.equal(head.select_maps(maps)[:, 1], maps[:, 0])


def test_sparse_head_without_bias_and_dropout_before_normalisation() -> None:
    head = SparseHead([0, 1], [1.0, 2.0], [0.5, 0.5], [[1.0, 0.0], [0.0, -1.0]], dropout=0.5)
    assert head.bias is None and not head.has_bias
    assert (
        "head.bias"
        not in QPMModel(create_backbone("tiny_cnn"), head, class_names=["a", "b"]).state_dict()
    )
    maps = torch.ones(64, 32, 2, 2)
    head.train()
    values = head.pre_logits(maps)[:, 0]  # a dropped feature is (0 - mean) / std, not 0
    assert set(torch.unique(values).tolist()) <= {(0.0 - 1.0) / 0.5, (2.0 - 1.0) / 0.5}
    head.eval()
    torch.testing.assert_close(head(maps[:1]), torch.tensor([[0.0, 2.0]]))


def test_sparse_head_properties() -> None:
    head = SparseHead(SELECTED, torch.zeros(5), torch.ones(5), WEIGHT, BIAS)
    assert (head.n_classes, head.n_features, head.n_nonzero) == (4, 5, 7)
    assert head.class_features == [[3, 17], [0, 9], [3, 9], [17]]
    assert torch.equal(head.weight, torch.tensor(WEIGHT))
    assert torch.equal(head.mask, torch.tensor(WEIGHT) != 0)
    assert head.selected_features.tolist() == SELECTED
    assert not head.is_ternary
    ternary = SparseHead([0, 1, 2], torch.zeros(3), torch.ones(3), [[0.5, -0.5, 0], [0, 0, 0.5]])
    assert ternary.is_ternary
    assert "n_nonzero=3" in repr(ternary)


def test_sparse_head_trainability_follows_the_flags_with_stable_keys() -> None:
    keys = None
    for flags in [_flags(), _flags(True, True, True), _flags(weights=True)]:
        head = SparseHead(SELECTED, torch.zeros(5), torch.ones(5), WEIGHT, BIAS, **flags)
        trainable = {name for name, p in head.named_parameters() if p.requires_grad}
        expected = set()
        if flags["train_normalisation"]:
            expected |= {"mean", "std"}
        if flags["train_weights"]:
            expected.add("weight_values")
        if flags["train_bias"]:
            expected.add("bias")
        assert trainable == expected == {name for name, _ in head.named_parameters()}
        assert all(getattr(head, name) == value for name, value in flags.items())
        assert keys is None or set(head.state_dict()) == keys
        keys = set(head.state_dict())
    assert keys == {"selected_features", "mask", "mean", "std", "weight_values", "bias"}
    frozen = SparseHead(SELECTED, torch.zeros(5), torch.ones(5), WEIGHT, BIAS)
    frozen.requires_grad_(True)  # buffers: a frozen head stays frozen
    assert list(frozen.parameters()) == []


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"weight": [[1.0, 0.0]]}, ValueError, r"weight must have shape \(n_classes, 5\)"),
        ({"weight": np.zeros((0, 5))}, ValueError, "at least one class"),
        ({"weight": [[float("nan")] * 5]}, ValueError, "weight has non-finite"),
        ({"bias": [0.0, 1.0]}, ValueError, r"bias must have shape \(4,\)"),
        ({"bias": [0.0, 1.0, float("inf"), 0.0]}, ValueError, "bias has non-finite"),
        ({"bias": None, "train_bias": True}, ValueError, "train_bias=True needs a bias"),
        ({"selected_features": [3, 3, 1, 2, 4]}, ValueError, "SparseHead selected_features has"),
        ({"mean": torch.zeros(4)}, ValueError, r"SparseHead mean must have shape \(5,\)"),
        ({"train_weights": 1}, TypeError, "train_weights must be a bool"),
        ({"dropout": 1.0}, ValueError, "dropout"),
    ],
)
def test_sparse_head_rejects_bad_input(change: dict, error: type, match: str) -> None:
    arguments = {
        "selected_features": SELECTED,
        "mean": torch.zeros(5),
        "std": torch.ones(5),
        "weight": WEIGHT,
        "bias": BIAS,
    }
    arguments |= change
    with pytest.raises(error, match=match):
        SparseHead(**arguments)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=0.1, nesterov=True),
        lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
    ],
)
def test_zero_weights_stay_exactly_zero_through_optimiser_steps(make_optimizer) -> None:
    head = SparseHead(
        SELECTED,
        torch.zeros(5),
        torch.ones(5),
        WEIGHT,
        BIAS,
        dropout=0.2,
        **_flags(True, True, True),
    )
    zeros = torch.tensor(WEIGHT) == 0
    optimizer = make_optimizer(head.parameters())
    for _ in range(5):
        maps = torch.rand(8, 32, 3, 3)
        loss = nn.functional.cross_entropy(head(maps), torch.arange(8) % 4)
        loss = loss + head.weight.pow(2).sum()  # the diversity loss also reads head.weight
        optimizer.zero_grad()
        loss.backward()
        assert torch.equal(head.weight_values.grad[zeros], torch.zeros(int(zeros.sum())))
        optimizer.step()
    assert torch.equal(head.weight_values.detach()[zeros], torch.zeros(int(zeros.sum())))
    assert torch.equal(head.mask, ~zeros)
    assert not torch.equal(head.weight.detach()[~zeros], torch.tensor(WEIGHT)[~zeros])
    assert head.class_features == [[3, 17], [0, 9], [3, 9], [17]]


def test_a_non_finite_gradient_does_not_leak_into_the_zero_weights() -> None:
    original = SparseHead(SELECTED, torch.zeros(5), torch.ones(5), WEIGHT, **_flags(weights=True))
    head = copy.deepcopy(original)  # nothing (such as a tensor hook) is lost in a copy
    maps = torch.rand(2, 32, 3, 3)
    maps[0, 25] = float("nan")  # the unused feature 25: a NaN gradient on its (zero) column
    head(maps).sum().backward()
    gradient = head.weight_values.grad
    assert torch.equal(gradient[:, 4], torch.zeros(4))
    assert torch.isfinite(gradient[torch.tensor(WEIGHT) != 0]).all()


def test_loading_a_state_dict_keeps_the_pattern() -> None:
    head = SparseHead(SELECTED, torch.zeros(5), torch.ones(5), WEIGHT, **_flags(weights=True))
    state = head.state_dict()
    state["weight_values"] = torch.ones(4, 5)  # nonzero outside the pattern
    head.load_state_dict(state)
    assert torch.equal(head.weight_values.detach(), (torch.tensor(WEIGHT) != 0).float())


# --------------------------------------------------------------------------------------------
# the model, save and load


def test_sparse_model_methods_and_description() -> None:
    model = _sparse_model(**_flags(weights=True))
    assert model.is_sparse and not model.is_qpm
    assert not _dense_model().is_sparse
    assert torch.equal(model.class_weights(), torch.tensor(WEIGHT))
    assert not model.class_weights().requires_grad
    head = model.describe()["head"]
    assert head["type"] == "sparse"
    assert head["selected_features"] == SELECTED
    assert head["class_features"] == [[3, 17], [0, 9], [3, 9], [17]]
    assert (head["has_bias"], head["n_nonzero"], head["is_ternary"]) == (True, 7, False)
    assert (head["train_normalisation"], head["train_weights"], head["train_bias"]) == (
        False,
        True,
        False,
    )
    images = torch.randn(2, 3, IMAGE_PX, IMAGE_PX)
    model.eval()
    maps = model.forward_features(images)
    assert model.head_feature_maps(maps).shape[1] == 5
    assert model.forward_head(maps, pre_logits=True).shape == (2, 5)
    torch.testing.assert_close(model(images), model.forward_head(maps))


def test_sparse_from_dense_shares_the_backbone_and_checks_sizes() -> None:
    dense = _dense_model()
    model = sparse_from_dense(
        dense,
        SELECTED,
        torch.zeros(5),
        torch.ones(5),
        WEIGHT,
        None,
        dropout=0.2,
        **_flags(),
    )
    assert model.backbone is dense.backbone
    assert model.class_names == dense.class_names and model.metadata == dense.metadata
    assert model.metadata is not dense.metadata
    assert model.head.dropout.p == pytest.approx(0.2)
    with pytest.raises(ValueError, match="weight has 2 rows but the model has 4 classes"):
        sparse_from_dense(
            dense, [0, 1], [0, 0], [1, 1], [[1, 0], [0, 1]], None, dropout=0.1, **_flags()
        )
    with pytest.raises(ValueError, match="SparseHead selects channel 40 but backbone"):
        sparse_from_dense(
            dense,
            [0, 1, 2, 40],
            torch.zeros(4),
            torch.ones(4),
            torch.eye(4),
            None,
            dropout=0.1,
            **_flags(),
        )


@pytest.mark.parametrize(
    ("with_bias", "flags"),
    [
        (True, _flags()),
        (True, _flags(True, True, True)),
        (False, _flags(normalisation=True, weights=True)),
        (True, _flags(bias=True)),
    ],
)
def test_save_load_round_trip_keeps_logits_and_flags(
    tmp_path: Path, with_bias: bool, flags: dict
) -> None:
    model = _sparse_model(with_bias=with_bias, dropout=0.3, **flags)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, IMAGE_PX, IMAGE_PX) * 3 + 1)  # non-default BatchNorm statistics
        if flags["train_weights"]:  # a trained weight that reached exactly zero
            model.head.weight_values[0, 0] = 0.0
    model.eval()
    path = model.save(tmp_path / "sparse.safetensors")
    assert read_metadata(path)["head"]["type"] == "sparse"
    loaded = openqpm.load(path)
    images = torch.randn(4, 3, IMAGE_PX, IMAGE_PX)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert loaded.is_sparse and not loaded.is_qpm
    head = loaded.head
    assert isinstance(head, SparseHead)
    assert all(getattr(head, name) == flags[name] for name in FLAG_NAMES)
    assert head.has_bias == with_bias
    assert head.dropout.p == pytest.approx(0.3)
    assert torch.equal(head.mask, model.head.mask)  # the saved pattern, not weight != 0
    assert {n: p.requires_grad for n, p in head.named_parameters()} == {
        n: p.requires_grad for n, p in model.head.named_parameters()
    }
    assert set(loaded.state_dict()) == set(model.state_dict())


# --------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize(
    "flags", [_flags(), _flags(True, True, True), _flags(weights=True), _flags(bias=True)]
)
def test_training_keeps_the_pattern_and_trains_what_the_flags_say(flags: dict) -> None:
    model = _sparse_model(**flags)
    before = _head_state(model)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    schedule = TrainingSchedule(
        epochs=1,
        lr_backbone=0.05,
        lr_head=0.1,
        momentum=0.9,
        weight_decay=5e-3,
        step_size_epochs=1,
        gamma=0.5,
        diversity_beta=0.2,
        seed=3,
    )
    loader = make_loader(_images(16, seed=0), batch_size=8, train=True, seed=0)
    assert len(loader) == 2  # two steps
    result = train_model(model, loader, schedule, device="cpu")
    assert result.epochs_completed == 1
    after = _head_state(model)
    zeros = torch.tensor(WEIGHT) == 0
    assert torch.equal(after["mask"], ~zeros)
    assert torch.equal(after["weight_values"][zeros], torch.zeros(int(zeros.sum())))
    assert torch.equal(after["selected_features"], before["selected_features"])
    expected_changes = {
        "mean": flags["train_normalisation"],
        "std": flags["train_normalisation"],
        "weight_values": flags["train_weights"],
        "bias": flags["train_bias"],
    }
    for name, changes in expected_changes.items():
        assert torch.equal(after[name], before[name]) != changes, name
    assert any(
        not torch.equal(value, backbone_before[key])
        for key, value in model.backbone.state_dict().items()
    )


def test_training_resumes_a_sparse_model_exactly(tmp_path: Path) -> None:
    schedule = TrainingSchedule(
        epochs=2,
        lr_backbone=0.05,
        lr_head=0.1,
        momentum=0.9,
        weight_decay=5e-3,
        step_size_epochs=1,
        gamma=0.5,
        diversity_beta=0.2,
        seed=3,
    )
    loader = make_loader(_images(16, seed=0), batch_size=8, train=True, seed=0)
    flags = _flags(True, True, True)
    straight = _sparse_model(**flags)
    train_model(straight, loader, schedule, device="cpu")
    resumed = _sparse_model(**flags)
    checkpoint = tmp_path / "sparse.ckpt"
    train_model(
        resumed, loader, schedule, device="cpu", checkpoint_path=checkpoint, max_epochs_this_call=1
    )
    result = train_model(
        _sparse_model(**flags),
        loader,
        schedule,
        device="cpu",
        checkpoint_path=checkpoint,
        resume=True,
    )
    assert result.start_epoch == 1 and result.epochs_completed == 2
    for key, value in straight.state_dict().items():
        assert torch.equal(result.model.state_dict()[key], value), key


# --------------------------------------------------------------------------------------------
# metrics and explanations


def test_evaluate_model_counts_the_nonzero_features() -> None:
    model = _sparse_model()
    result = evaluate_model(
        model,
        DataLoader(_images(8, seed=1), batch_size=4),
        DataLoader(_images(12, seed=2), batch_size=5),
        device="cpu",
    )
    assert result["n_features_used"] == 4  # the last column is all zeros
    assert result["features_per_class"] == pytest.approx(7 / 4)
    assert result["is_qpm"] is False
    assert 0.0 <= result["accuracy"] <= 100.0
    assert result["n_train_images"] == 12 and result["class_independence"] is not None


def test_explain_image_adds_up_to_the_logits() -> None:
    model = _sparse_model()
    image = _images(1, seed=4).tensors[0][0]
    local = explain_image(model, image)
    assert np.array_equal(local.class_weights, np.asarray(WEIGHT, dtype=np.float32))
    for class_index in range(N_CLASSES):
        total = sum(value for _, value in local.contributions(class_index))
        assert total + BIAS[class_index] == pytest.approx(local.logits[class_index], abs=1e-5)
        used = {feature for feature, _ in local.contributions(class_index)}
        assert used == set(np.flatnonzero(np.asarray(WEIGHT)[class_index]).tolist())
    sentence = local.why_not_sentence(model.class_names, [f"f{c}" for c in SELECTED])
    assert sentence.startswith("Why ") or sentence.endswith("use the same features.")


def test_why_not_sentence_names_signed_weights() -> None:
    local = explain_image(_sparse_model(), _images(1, seed=4).tensors[0][0])
    local.class_weights = np.asarray([[0.5, -1.0], [0.5, 2.0]])
    local.features = np.asarray([1.0, -1.0])
    local.predicted_class, local.runner_up_class = 0, 1
    sentence = local.why_not_sentence(["a", "b"], ["f0", "f1"])
    assert sentence == (
        "Why a and not b: f1 (-1.00 here) has weight -1.00 for a and +2.00 for b, which adds "
        "+3.00 to the margin."
    )


# --------------------------------------------------------------------------------------------
# the report


class _PictureDataset(torch.utils.data.Dataset):
    """A tiny test split in the openqpm data set contract (see tests/test_report.py)."""

    def __init__(self, pictures: list[Image.Image], labels: list[int]) -> None:
        self.pictures = pictures
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = [f"class {c}" for c in range(N_CLASSES)]
        self.n_classes = N_CLASSES
        self.transform = T.Compose(
            [T.Resize((IMAGE_PX, IMAGE_PX)), T.ToTensor(), T.Normalize([0.5] * 3, [0.25] * 3)]
        )
        self.name = "pictures"

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, index: int) -> Image.Image:
        return self.pictures[index].copy()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.pictures[index]), int(self.labels[index])


def _pictures(n_pictures: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    pictures = []
    for _ in range(n_pictures):
        picture = Image.new("RGB", (40, 36), tuple(int(v) for v in rng.integers(40, 140, 3)))
        draw = ImageDraw.Draw(picture)
        for _ in range(3):
            x, y, radius = rng.uniform(0, 40), rng.uniform(0, 36), rng.uniform(4, 10)
            color = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
        pictures.append(picture)
    return pictures


def test_report_lists_signed_weights_of_a_sparse_model(tmp_path: Path) -> None:
    model = _sparse_model().eval()
    pictures = _pictures(16)
    dataset = _PictureDataset(pictures, [0] * len(pictures))
    with torch.no_grad():
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        predictions = model(images).argmax(dim=1).numpy()
    labels = predictions.copy()
    labels[::4] = (labels[::4] + 1) % N_CLASSES  # some mistakes
    dataset = _PictureDataset(pictures, labels.tolist())
    index = write_report(tmp_path / "report", model=model, dataset=dataset, batch_size=8)
    out = index.parent
    assert "weighted sum" in index.read_text()
    assert len(list((out / "classes").iterdir())) == N_CLASSES
    assert len(list((out / "features").iterdir())) == len(SELECTED)
    first = (out / "classes" / "c0000.html").read_text()
    assert "weighted sum of these 2 features, plus a bias of +0.1." in first
    assert "weight +0.8" in first and "weight -0.5" in first
    explanation = json.loads((out / "explanation.json").read_text())
    assert explanation["classes"][0]["channels"] == [3, 17]  # by decreasing weight
    assert explanation["classes"][0]["weights"] == pytest.approx([0.8, -0.5])
    assert explanation["features"][4]["classes"] == []


def test_a_trained_scale_through_zero_divides_by_its_magnitude() -> None:
    """SGD may push a trainable std below zero: the head uses |std| (and loads such a file)."""
    from openqpm.models.head import SparseHead

    weight = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    maps = torch.rand(3, 4, 2, 2)
    kwargs = {"dropout": 0.0, "train_normalisation": True}
    positive = SparseHead([0, 2], torch.zeros(2), torch.tensor([0.5, 2.0]), weight, None, **kwargs)
    negative = SparseHead([0, 2], torch.zeros(2), torch.tensor([-0.5, 2.0]), weight, None, **kwargs)
    positive.eval()
    negative.eval()
    torch.testing.assert_close(positive(maps), negative(maps))
