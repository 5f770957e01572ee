"""Tests of the backbones, the heads, QPMModel and save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

import openqpm
from openqpm.models import (
    Backbone,
    DenseHead,
    QPMHead,
    QPMModel,
    SparseHead,
    backbone_names,
    check_image_size,
    check_n_features,
    create_backbone,
    load,
    qpm_from_dense,
    read_metadata,
    register_backbone,
    sparse_from_dense,
)
from openqpm.models.backbones import _REGISTRY
from openqpm.solver.problem import Assignment

# A valid 4-class assignment over 4 selected features, 2 per class, rows distinct.
_MATRIX = [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]]
_SELECTED = [3, 0, 17, 9]


def _dense_model(n_classes: int = 4) -> QPMModel:
    backbone = create_backbone("tiny_cnn")
    return QPMModel(
        backbone,
        DenseHead(backbone.n_features, n_classes),
        class_names=[f"class {i}" for i in range(n_classes)],
        metadata={"image_size_px": 32, "data_mean": [0.5, 0.5, 0.5], "data_std": [0.2] * 3},
    )


def _qpm_model() -> QPMModel:
    return _dense_model().to_qpm(
        _SELECTED, torch.rand(4) + 0.1, torch.rand(4) + 0.5, _MATRIX, dropout=0.1
    )


def _sparse_model() -> QPMModel:
    weight = [[0.5, 0.0, -1.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.3], [1.0, 0, 0, 1.0]]
    return sparse_from_dense(
        _dense_model(),
        _SELECTED,
        torch.rand(4),
        torch.rand(4) + 0.5,
        weight,
        torch.randn(4),
        dropout=0.1,
        train_normalisation=True,
        train_weights=True,
        train_bias=False,
    )


# --------------------------------------------------------------------------------------------
# backbones


def test_registry_lists_the_required_backbones() -> None:
    assert {
        "resnet18",
        "resnet34",
        "resnet50",
        "inception_v3",
        "swin_t",
        "swin_s",
        "convnext_tiny",
        "small_cnn",
        "tiny_cnn",
    } <= set(backbone_names())


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet51'.*resnet50.*small_cnn"):
        create_backbone("resnet51")


def test_registering_a_taken_name_fails() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet50")


def test_timm_names_need_timm() -> None:
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"openqpm\[timm\]"):
            create_backbone("timm:resnet18")
    else:
        backbone = create_backbone("timm:resnet18")
        maps = backbone(torch.rand(1, 3, 64, 64))
        assert maps.shape == (1, backbone.n_features, 2, 2)


# The torchvision networks take seconds each to build on 2 cores: only resnet18 by default.
_FAST_BACKBONES = {"resnet18", "small_cnn", "tiny_cnn"}


@pytest.mark.parametrize(
    "name",
    [
        name if name in _FAST_BACKBONES else pytest.param(name, marks=pytest.mark.slow)
        for name in sorted(_REGISTRY)
    ],
)
def test_every_backbone_gives_non_negative_maps_of_the_announced_shape(name: str) -> None:
    backbone = create_backbone(name).eval()
    size = max(backbone.min_image_size_px, 64)
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, size, size))
    assert isinstance(backbone, Backbone)
    assert backbone.name == name
    assert maps.shape == (2, backbone.n_features, *backbone.feature_map_size(size))
    assert (maps >= 0).all()
    assert backbone.min_image_size_px <= backbone.default_image_size_px


@pytest.mark.parametrize(("name", "n_features"), [("resnet18", 512), ("resnet50", 2048)])
def test_reduced_strides_give_28x28_maps_at_224_px(name: str, n_features: int) -> None:
    default = create_backbone(name)
    reduced = create_backbone(name, reduced_strides=True)
    assert default.n_features == reduced.n_features == n_features
    assert default.feature_map_size(224) == (7, 7)
    assert reduced.feature_map_size(224) == (28, 28)
    # Same parameters, only strides differ: a default checkpoint loads into both.
    assert {k: v.shape for k, v in default.state_dict().items()} == {
        k: v.shape for k, v in reduced.state_dict().items()
    }
    # The real forward agrees with the shape-only one.
    with torch.no_grad():
        assert reduced.eval()(torch.rand(1, 3, 64, 64)).shape == (1, n_features, 8, 8)


def test_small_cnn_maps_are_8x8_at_64_px() -> None:
    assert create_backbone("small_cnn").feature_map_size(64) == (8, 8)


def test_small_cnn_is_small() -> None:
    n_parameters = sum(p.numel() for p in create_backbone("small_cnn").parameters())
    assert 100_000 < n_parameters < 1_000_000
    assert sum(p.numel() for p in create_backbone("tiny_cnn").parameters()) < 10_000


@pytest.mark.parametrize("name", ["inception_v3", "swin_t", "small_cnn", "tiny_cnn"])
def test_reduced_strides_only_for_resnets(name: str) -> None:
    with pytest.raises(ValueError, match="only available for resnet"):
        create_backbone(name, reduced_strides=True)


def test_image_size_checks() -> None:
    inception = create_backbone("inception_v3")
    assert inception.feature_map_size(299) == (8, 8)
    assert inception.feature_map_size(75) == (1, 1)
    with pytest.raises(ValueError, match=r"74 px is too small for backbone 'inception_v3'.*75"):
        check_image_size(inception, 74)
    check_image_size(inception, 75)
    with pytest.raises(TypeError, match="integer"):
        check_image_size(inception, 299.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too small"):
        create_backbone("tiny_cnn").feature_map_size(4)


def test_n_features_checks() -> None:
    backbone = create_backbone("tiny_cnn")
    check_n_features(backbone, 32)
    with pytest.raises(ValueError, match=r"n_features=33 is larger than the 32 feature channels"):
        check_n_features(backbone, 33)
    with pytest.raises(ValueError, match="positive integer"):
        check_n_features(backbone, 0)


def _torchvision_resnet18_state(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(state, path)
    return path, state


def test_torchvision_weights_load_from_a_local_pth(tmp_path: Path) -> None:
    path, state = _torchvision_resnet18_state(tmp_path)
    backbone = create_backbone("resnet18", weights_path=path, reduced_strides=True)
    loaded = backbone.state_dict()
    assert "fc.weight" in state and "fc.weight" not in loaded
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    # A fresh random backbone differs, so the equality above is not trivial.
    assert not torch.equal(create_backbone("resnet18").conv1.weight, loaded["conv1.weight"])


def test_weights_load_from_safetensors_and_old_checkpoints(tmp_path: Path) -> None:
    _, state = _torchvision_resnet18_state(tmp_path)
    # Old torchvision checkpoints (e.g. resnet18-5c106cde.pth) have no num_batches_tracked.
    old_style = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in old_style.items()}, str(path))
    backbone = create_backbone("resnet18", weights_path=path)
    assert torch.equal(backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_missing_weights_file_names_the_expected_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"resnet50-19c8e357\.pth.*download\.pytorch"):
        create_backbone("resnet50", weights_path=tmp_path / "nowhere.pth")


def test_weights_of_another_architecture_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"unexpected keys \['layer1\.2\."):
        create_backbone("resnet18", weights_path=path)


def test_non_state_dict_weights_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        create_backbone("tiny_cnn", weights_path=path)


# --------------------------------------------------------------------------------------------
# heads


def test_dense_head_pools_then_applies_the_linear_layer() -> None:
    head = DenseHead(3, 2, dropout=0.2).eval()
    maps = torch.rand(5, 3, 4, 4)
    pooled = maps.mean(dim=(2, 3))
    assert torch.allclose(head.pre_logits(maps), pooled)
    expected = pooled @ head.linear.weight.T + head.linear.bias
    assert torch.allclose(head(maps), expected, atol=1e-6)
    assert head.weight is head.linear.weight


def test_qpm_head_computes_normalised_sums_by_hand() -> None:
    # Three selected channels (2, 0, 1), pooled values read off constant maps.
    maps = torch.zeros(1, 4, 2, 2)
    maps[0, 0] = 4.0  # channel 0: pooled 4
    maps[0, 1] = 100.0  # channel 1: pooled 100
    maps[0, 2] = 1.0  # channel 2: pooled 1
    maps[0, 3] = 7.0  # not selected
    head = QPMHead(
        [2, 0, 1],
        mean=[0.5, 2.0, 90.0],
        std=[0.5, 4.0, 5.0],
        class_feature_matrix=[[1, 1, 0], [0, 1, 1]],
    ).eval()
    # z = [(1 - 0.5) / 0.5, (4 - 2) / 4, (100 - 90) / 5] = [1, 0.5, 2]
    # class 0 = z0 + z1 = 1.5, class 1 = z1 + z2 = 2.5
    assert torch.allclose(head.pre_logits(maps), torch.tensor([[1.0, 0.5, 2.0]]))
    assert torch.allclose(head(maps), torch.tensor([[1.5, 2.5]]))
    assert torch.equal(head.select_maps(maps), maps[:, [2, 0, 1]])
    assert head.class_features == [[2, 0], [0, 1]]
    assert (head.n_classes, head.n_features, head.n_per_class) == (2, 3, 2)


def test_qpm_head_has_no_trainable_parameters_and_guards_zero_std() -> None:
    head = QPMHead([0, 1], [0.0, 1.0], [0.0, 2.0], [[1, 0], [0, 1]])
    assert list(head.parameters()) == []
    maps = torch.full((1, 2, 3, 3), 3.0)
    # std 0 is clamped at 1e-6: (3 - 0) / 1e-6; std 2: (3 - 1) / 2.
    assert torch.allclose(head.eval().pre_logits(maps), torch.tensor([[3e6, 1.0]]))


def test_qpm_dropout_acts_before_normalisation() -> None:
    torch.manual_seed(0)
    mean, std, p = torch.tensor([2.0, 3.0]), torch.tensor([0.5, 2.0]), 0.5
    head = QPMHead([0, 1], mean, std, [[1, 0], [0, 1]], dropout=p).train()
    maps = torch.full((200, 2, 2, 2), 5.0)
    normalised = head.pre_logits(maps)  # (200, 2)
    dropped = -mean / std  # a dropped raw feature is 0, then normalised
    kept = (5.0 / (1 - p) - mean) / std
    is_dropped = torch.isclose(normalised, dropped.expand_as(normalised))
    is_kept = torch.isclose(normalised, kept.expand_as(normalised))
    assert (is_dropped | is_kept).all()
    assert is_dropped.any() and is_kept.any()


def _relu_example_maps() -> torch.Tensor:
    """Constant maps whose pooled values are: channel 0 -> 1, channel 1 -> 100, channel 2 -> 1."""
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 0] = 1.0
    maps[0, 1] = 100.0
    maps[0, 2] = 1.0
    return maps


def test_qpm_head_with_relu_zeroes_negative_normalised_features() -> None:
    # selected (2, 0, 1): z = [(1 - 0.5) / 0.5, (1 - 2) / 4, (100 - 90) / 5] = [1, -0.25, 2]
    settings = {"mean": [0.5, 2.0, 90.0], "std": [0.5, 4.0, 5.0]}
    matrix = [[1, 1, 0], [0, 1, 1]]
    maps = _relu_example_maps()
    plain = QPMHead([2, 0, 1], class_feature_matrix=matrix, **settings).eval()
    rectified = QPMHead([2, 0, 1], class_feature_matrix=matrix, relu=True, **settings).eval()
    assert not plain.relu and rectified.relu
    assert torch.allclose(plain.pre_logits(maps), torch.tensor([[1.0, -0.25, 2.0]]))
    assert torch.allclose(rectified.pre_logits(maps), torch.tensor([[1.0, 0.0, 2.0]]))
    # plain: class 0 = 1 - 0.25, class 1 = -0.25 + 2; rectified: 1 + 0 and 0 + 2
    assert torch.allclose(plain(maps), torch.tensor([[0.75, 1.75]]))
    assert torch.allclose(rectified(maps), torch.tensor([[1.0, 2.0]]))
    assert torch.equal(
        rectified.logits_from_pre_logits(rectified.pre_logits(maps)), rectified(maps)
    )
    # nothing new trains and the state dict is the same as without the ReLU
    assert list(rectified.parameters()) == []
    assert rectified.state_dict().keys() == plain.state_dict().keys()
    assert "relu=True" in repr(rectified) and "relu=False" in repr(plain)
    with pytest.raises(TypeError, match="relu must be a bool"):
        QPMHead([0, 1], [0, 0], [1, 1], [[1, 0], [0, 1]], relu=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("selected", "mean", "std", "matrix", "message"),
    [
        ([0, 1], [0, 0], [1, 1], [[1, 0], [0, 2]], "only 0 and 1"),
        ([0, 1, 2], [0] * 3, [1] * 3, [[1, 0, 0], [0, 1, 1]], "same positive number of ones"),
        ([0, 1], [0, 0], [1, 1], [[1, 0], [1, 0]], "identical rows"),
        ([0, 1], [0, 0], [1, 1], [[1, 0, 0], [0, 1, 0]], r"shape \(n_classes, 2\)"),
        ([0, 0], [0, 0], [1, 1], [[1, 0], [0, 1]], "duplicates"),
        ([0, 1], [0, 0, 0], [1, 1], [[1, 0], [0, 1]], r"mean must have shape \(2,\)"),
        ([0, 1], [0, 0], [1, -1], [[1, 0], [0, 1]], "std must be >= 0"),
        ([0, 1], [0, float("nan")], [1, 1], [[1, 0], [0, 1]], "non-finite"),
        ([-1, 1], [0, 0], [1, 1], [[1, 0], [0, 1]], ">= 0"),
        ([0.5, 1], [0, 0], [1, 1], [[1, 0], [0, 1]], "integers"),
    ],
)
def test_qpm_head_rejects_bad_input(
    selected: list[float],
    mean: list[float],
    std: list[float],
    matrix: list[list[int]],
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        QPMHead(selected, mean, std, matrix)


def test_heads_reject_bad_sizes_and_dropout() -> None:
    with pytest.raises(ValueError, match="n_classes must be a positive integer"):
        DenseHead(4, 0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        DenseHead(4, 2, dropout=1.0)


# --------------------------------------------------------------------------------------------
# QPMModel


def test_model_methods_compose() -> None:
    model = _qpm_model().eval()
    images = torch.randn(3, 3, 32, 32)
    maps = model.forward_features(images)
    assert maps.shape == (3, 32, 4, 4)
    head_maps = model.head_feature_maps(maps)
    assert torch.equal(head_maps, maps[:, _SELECTED])
    logits = model.forward_head(maps)
    assert torch.equal(model(images), logits)
    features = model.forward_head(maps, pre_logits=True)  # (B, K)
    assert torch.allclose(logits, features @ torch.tensor(_MATRIX, dtype=torch.float32).T)
    weights = model.class_weights()
    assert torch.equal(weights, torch.tensor(_MATRIX, dtype=torch.float32))
    assert not weights.requires_grad
    assert model.is_qpm and not _dense_model().is_qpm


def test_dense_class_weights_are_the_detached_linear_weight() -> None:
    model = _dense_model()
    weights = model.class_weights()
    assert weights.shape == (4, 32) and not weights.requires_grad
    assert torch.equal(weights, model.head.linear.weight)  # type: ignore[union-attr]


def test_to_qpm_shares_the_backbone_and_keeps_names() -> None:
    dense = _dense_model()
    qpm = dense.to_qpm(_SELECTED, torch.zeros(4), torch.ones(4), np.array(_MATRIX, dtype=bool))
    assert qpm.backbone is dense.backbone
    assert qpm.class_names == dense.class_names
    assert qpm.metadata == dense.metadata and qpm.metadata is not dense.metadata
    assert qpm.head.n_per_class == 2  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="3 rows but the model has 4 classes"):
        dense.to_qpm([0, 1, 2], torch.zeros(3), torch.ones(3), np.eye(3))


def test_qpm_from_dense_takes_the_statistics_of_the_selected_features() -> None:
    dense = _dense_model()
    class_features = [[_SELECTED[k] for k in np.flatnonzero(row)] for row in _MATRIX]
    assignment = Assignment(_SELECTED, class_features, objective=1.0)
    mean = 0.1 * np.arange(32)  # statistics of all 32 backbone features
    std = 1.0 + np.arange(32)
    qpm = qpm_from_dense(dense, assignment, mean, std, dropout=0.25)
    head = qpm.head
    assert isinstance(head, QPMHead) and qpm.backbone is dense.backbone
    order = sorted(_SELECTED)  # the assignment keeps its features in ascending order
    assert head.selected_features.tolist() == order
    assert torch.allclose(head.mean, torch.tensor(mean[order], dtype=head.mean.dtype))
    assert torch.allclose(head.std, torch.tensor(std[order], dtype=head.std.dtype))
    assert head.class_features == assignment.class_features
    assert head.dropout.p == 0.25
    # the logits are W z with z the selected pooled features normalised by those statistics
    maps = dense.eval().forward_features(torch.rand(2, 3, 32, 32))
    pooled = maps.mean(dim=(2, 3))[:, order].double()
    normalised = (pooled - torch.tensor(mean[order])) / torch.tensor(std[order])
    expected = normalised @ torch.tensor(assignment.class_feature_matrix(), dtype=torch.float64).T
    assert torch.allclose(qpm.eval().forward_head(maps).double(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="one value per backbone feature"):
        qpm_from_dense(dense, assignment, mean[order], std[order], dropout=0.1)
    outside = Assignment([0, 1, 2, 40], [[0, 1], [1, 2], [2, 40], [0, 40]], objective=0.0)
    with pytest.raises(ValueError, match="selects feature 40"):
        qpm_from_dense(dense, outside, mean, std, dropout=0.1)


def test_to_qpm_and_qpm_from_dense_pass_relu_through() -> None:
    def relu_of(model: QPMModel) -> bool:
        assert isinstance(model.head, QPMHead)
        return model.head.relu

    dense = _dense_model()
    assert not relu_of(dense.to_qpm(_SELECTED, torch.zeros(4), torch.ones(4), _MATRIX))
    assert relu_of(dense.to_qpm(_SELECTED, torch.zeros(4), torch.ones(4), _MATRIX, relu=True))
    class_features = [[_SELECTED[k] for k in np.flatnonzero(row)] for row in _MATRIX]
    assignment = Assignment(_SELECTED, class_features, objective=1.0)
    mean, std = np.full(32, 0.2), np.full(32, 0.1)  # some features fall below their mean
    assert not relu_of(qpm_from_dense(dense, assignment, mean, std, dropout=0.1))
    chiqpm = qpm_from_dense(dense, assignment, mean, std, dropout=0.1, relu=True)
    assert relu_of(chiqpm)
    with torch.no_grad():
        maps = dense.eval().forward_features(torch.rand(3, 3, 32, 32))
        features = chiqpm.eval().forward_head(maps, pre_logits=True)
    assert (features >= 0).all() and (features == 0).any()


def test_model_rejects_mismatched_parts() -> None:
    backbone = create_backbone("tiny_cnn")
    with pytest.raises(ValueError, match="3 class names given for a head with 4 classes"):
        QPMModel(backbone, DenseHead(32, 4), class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="DenseHead reads 16 features but backbone"):
        QPMModel(backbone, DenseHead(16, 2), class_names=["a", "b"])
    head = QPMHead([0, 40], [0, 0], [1, 1], [[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="selects channel 40 but backbone 'tiny_cnn' has only 32"):
        QPMModel(backbone, head, class_names=["a", "b"])
    sparse = SparseHead([0, 40], [0, 0], [1, 1], [[1.0, 0.0], [0.0, -1.0]])
    with pytest.raises(ValueError, match="SparseHead selects channel 40 but backbone"):
        QPMModel(backbone, sparse, class_names=["a", "b"])
    with pytest.raises(TypeError, match="SparseHead"):
        QPMModel(backbone, torch.nn.Linear(2, 2), class_names=["a", "b"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("make_model", [_dense_model, _qpm_model, _sparse_model])
def test_save_load_round_trip_gives_the_same_logits(tmp_path: Path, make_model) -> None:
    model = make_model()
    # Non-default BatchNorm statistics, so that the buffers must round-trip too.
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32) * 3 + 1)
    model.eval()
    path = model.save(tmp_path / "model.safetensors", extra_metadata={"accuracy": 0.5})
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp files left
    loaded = openqpm.load(path)
    assert not loaded.training
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert loaded.class_names == model.class_names
    assert loaded.is_qpm == model.is_qpm
    assert loaded.is_sparse == model.is_sparse
    assert loaded.metadata == {**model.metadata, "accuracy": 0.5}


def test_saved_metadata_describes_the_qpm(tmp_path: Path) -> None:
    path = _qpm_model().save(tmp_path / "qpm.safetensors")
    metadata = read_metadata(path)
    assert metadata["format"] == "openqpm-model"
    assert metadata["architecture"] == {
        "name": "tiny_cnn",
        "reduced_strides": False,
        "n_features": 32,
        "options": {},
    }
    assert metadata["n_classes"] == 4
    assert metadata["head"]["selected_features"] == _SELECTED
    assert metadata["head"]["class_features"] == [[3, 0], [0, 17], [17, 9], [3, 9]]
    assert metadata["head"]["n_per_class"] == 2
    assert metadata["head"]["dropout"] == pytest.approx(0.1)
    assert metadata["head"]["relu"] is False
    assert metadata["image_size_px"] == 32
    assert metadata["data_std"] == [0.2] * 3


def _relu_qpm_model() -> QPMModel:
    # means well inside the features' range, so that the ReLU zeroes some of them
    return _dense_model().to_qpm(
        _SELECTED, torch.full((4,), 0.2), torch.full((4,), 0.1), _MATRIX, relu=True
    )


def test_save_load_keeps_the_relu(tmp_path: Path) -> None:
    model = _relu_qpm_model().eval()
    path = model.save(tmp_path / "chiqpm.safetensors")
    metadata = read_metadata(path)
    assert metadata["head"]["relu"] is True
    assert metadata["format_version"] == 2  # readers of version 1 would drop the ReLU
    loaded = load(path)
    assert isinstance(loaded.head, QPMHead) and loaded.head.relu
    images = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        features = loaded.forward_head(loaded.forward_features(images), pre_logits=True)
        assert (features >= 0).all() and (features == 0).any()
        assert torch.equal(loaded(images), model(images))
    # a plain QPM is written as before: version 1, relu false
    plain_path = _qpm_model().save(tmp_path / "qpm.safetensors")
    plain = read_metadata(plain_path)
    assert plain["head"]["relu"] is False and plain["format_version"] == 1
    assert not load(plain_path).head.relu  # type: ignore[union-attr]


def test_a_qpm_file_without_the_relu_key_loads_without_relu(tmp_path: Path) -> None:
    model = _relu_qpm_model().eval()
    description = model.describe()
    del description["head"]["relu"]  # as written before the key existed
    description["format_version"] = 1
    description["metadata"] = {}
    path = tmp_path / "old.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path),
        metadata={"openqpm": json.dumps(description)},
    )
    loaded = load(path)
    assert isinstance(loaded.head, QPMHead) and not loaded.head.relu
    images = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        features = loaded.forward_head(loaded.forward_features(images), pre_logits=True)
    assert (features < 0).any()  # not rectified


def test_loading_a_reduced_stride_resnet_restores_the_strides(tmp_path: Path) -> None:
    backbone = create_backbone("resnet18", reduced_strides=True)
    model = QPMModel(backbone, DenseHead(512, 2), class_names=["a", "b"]).eval()
    path = model.save(tmp_path / "dense.safetensors")
    loaded = load(path)
    assert loaded.backbone.reduced_strides
    assert loaded.backbone.feature_map_size(224) == (28, 28)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_loading_files_that_are_not_openqpm_models(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not an openqpm model"):
        load(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"definitely not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load(garbage)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "missing.safetensors")


def test_newer_format_versions_are_refused(tmp_path: Path) -> None:
    model = _dense_model()
    description = model.describe()
    description["format_version"] = 99
    path = tmp_path / "future.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path),
        metadata={"openqpm": json.dumps(description)},
    )
    with pytest.raises(ValueError, match="format version 99"):
        load(path)


def test_tensors_that_do_not_match_the_metadata_are_refused(tmp_path: Path) -> None:
    model = _dense_model()
    description = model.describe()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del state["head.linear.bias"]
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path), metadata={"openqpm": json.dumps(description)})
    with pytest.raises(ValueError, match="do not match its metadata"):
        load(path)


def test_non_json_metadata_is_refused_before_writing(tmp_path: Path) -> None:
    model = _dense_model()
    with pytest.raises(ValueError, match="'bad' is not JSON-serialisable"):
        model.save(tmp_path / "m.safetensors", extra_metadata={"bad": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "build"),
    [
        ("resnet50", lambda: torchvision.models.resnet50(weights=None)),
        # The published Inception checkpoint carries the auxiliary classifier: ignored.
        (
            "inception_v3",
            lambda: torchvision.models.inception_v3(
                weights=None, aux_logits=True, init_weights=False
            ),
        ),
        ("swin_t", lambda: torchvision.models.swin_t(weights=None)),
        ("convnext_tiny", lambda: torchvision.models.convnext_tiny(weights=None)),
    ],
)
def test_torchvision_checkpoints_of_every_family_load(tmp_path: Path, name: str, build) -> None:
    state = build().state_dict()
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    loaded = create_backbone(name, weights_path=path).state_dict()
    assert loaded and all(torch.equal(value, state[key]) for key, value in loaded.items())


@pytest.mark.slow
def test_swin_without_final_norm_round_trips(tmp_path: Path) -> None:
    backbone = create_backbone("swin_t")
    backbone.set_options(final_norm=False)
    assert backbone.options() == {"final_norm": False}
    assert not any(key.startswith("norm.") for key in backbone.state_dict())
    model = QPMModel(backbone, DenseHead(768, 2), class_names=["a", "b"]).eval()
    path = model.save(tmp_path / "swin.safetensors")
    loaded = load(path)
    assert loaded.backbone.options() == {"final_norm": False}
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    with pytest.raises(ValueError, match="takes no options"):
        create_backbone("tiny_cnn").set_options(final_norm=False)


# --------------------------------------------------------------------------------------------
# the dense model of a run


class _TrainSet:
    """What dense_model_for reads of a training set."""

    def __init__(self, n_classes: int) -> None:
        self.n_classes = n_classes
        self.class_names = [f"class {i}" for i in range(n_classes)]
        self.mean_std = ((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
        self.crop = False


def _resnet18_with_classes(tmp_path: Path, n_classes: int) -> tuple[Path, dict]:
    network = torchvision.models.resnet18(weights=None, num_classes=n_classes)
    state = {f"module.{key}": value for key, value in network.state_dict().items()}  # DataParallel
    path = tmp_path / f"resnet18-{n_classes}.pth"
    torch.save(state, path)
    return path, network.state_dict()


def test_the_dense_head_is_the_file_s_classifier_when_its_classes_fit(tmp_path: Path) -> None:
    from openqpm.config import DataConfig, ModelConfig
    from openqpm.models.build import dense_model_for

    path, state = _resnet18_with_classes(tmp_path, 3)
    weight, bias = create_backbone("resnet18").read_classifier(path) or (None, None)
    assert torch.equal(weight, state["fc.weight"]) and torch.equal(bias, state["fc.bias"])
    model_config = ModelConfig(arch="resnet18", weights=str(path), reduced_strides=False)
    data_config = DataConfig(dataset="imagenet")
    model = dense_model_for(model_config, data_config, _TrainSet(3), require_pretrained_head=True)
    assert torch.equal(model.head.linear.weight, state["fc.weight"])
    assert torch.equal(model.head.linear.bias, state["fc.bias"])
    assert model.metadata["crop"] is False and model.metadata["augment"] == "paper"


def test_a_classifier_that_does_not_fit_is_named_in_a_warning_or_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from openqpm.config import DataConfig, ModelConfig
    from openqpm.models.build import PretrainedHeadError, dense_model_for

    path, state = _resnet18_with_classes(tmp_path, 5)
    model_config = ModelConfig(arch="resnet18", weights=str(path))
    data_config = DataConfig(dataset="cub")
    with caplog.at_level("WARNING", logger="openqpm.models.build"):
        model = dense_model_for(model_config, data_config, _TrainSet(3))
    assert model.head.linear.weight.shape == (3, 512)
    assert "resnet18-5.pth" in caplog.text and "5 classes" in caplog.text and "has 3" in caplog.text
    with pytest.raises(
        PretrainedHeadError, match=r"dense\.skip.*resnet18-5\.pth.*5 classes.*has 3"
    ):
        dense_model_for(model_config, data_config, _TrainSet(3), require_pretrained_head=True)
    # a file without a classifier, and no file at all
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, headless)
    headless_config = ModelConfig(arch="resnet18", weights=str(headless))
    with pytest.raises(PretrainedHeadError, match=r"headless\.pth.*no classifier \(fc\.weight"):
        dense_model_for(headless_config, data_config, _TrainSet(3), require_pretrained_head=True)
    with pytest.raises(PretrainedHeadError, match="model.weights is null"):
        dense_model_for(
            ModelConfig(arch="resnet18"), data_config, _TrainSet(3), require_pretrained_head=True
        )


def test_swin_drops_its_final_layer_norm_after_dense_training() -> None:
    swin = create_backbone("swin_t")
    assert swin.dense_training_changes() == {"final_norm": False}
    assert swin.after_dense_training() == {"final_norm": False}
    assert swin.options() == {"final_norm": False} and isinstance(swin.norm, torch.nn.Identity)
    assert swin.after_dense_training() == {}  # once
    # the other families keep their architecture, and have no classifier for their maps but fc
    tiny = create_backbone("tiny_cnn")
    assert tiny.after_dense_training() == {} and tiny.options() == {}
    assert swin.classifier_keys is None and create_backbone("resnet18").classifier_keys == (
        "fc.weight",
        "fc.bias",
    )
