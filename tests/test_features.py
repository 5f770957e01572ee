"""The features pass: torch summaries, streamed statistics, save/load round trip."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from openqpm.constants import FeatureStatistics, MapStatistics, summarize_feature_maps
from openqpm.features import (
    FeaturePass,
    FeaturePassProgress,
    extract_features,
    load_feature_pass,
    save_feature_pass,
    summarize_feature_maps_torch,
)
from openqpm.models import DenseHead, QPMModel, create_backbone

N_CLASSES = 3


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these tensors are tiny, and on a busy 2-core machine two spinning
    OpenMP threads made a tiny_cnn step ~300 times slower (0.76 s instead of 2 ms)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model() -> QPMModel:
    torch.manual_seed(3)
    backbone = create_backbone("tiny_cnn")
    head = DenseHead(backbone.n_features, N_CLASSES)
    return QPMModel(backbone, head, class_names=["a", "b", "c"])


def _dataset(n_images: int = 20) -> TensorDataset:
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(n_images, 3, 24, 24, generator=generator)
    labels = torch.arange(n_images) % N_CLASSES
    return TensorDataset(images, labels)


def _assert_same_arrays(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> None:
    assert first.keys() == second.keys()
    for key, value in first.items():
        np.testing.assert_allclose(value, second[key], rtol=1e-6, atol=1e-9, err_msg=key)


def test_torch_summaries_equal_the_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    maps = rng.gamma(1.0, 2.0, size=(3, 5, 4, 6)).astype(np.float32)
    maps[0, 0] = 1.5  # a constant map: softmax 1/24 everywhere, argmax at 0 (first of ties)
    maps[1, 2] = 0.0
    maps[1, 2, 3, 1] = maps[1, 2, 0, 4] = 7.0  # tie between two positions: the first one wins
    maps[2, 3, 2, 5] = 60.0  # a sharp peak: softmax close to 1
    pooled, peak_softmax, peak_index = summarize_feature_maps_torch(torch.from_numpy(maps))
    reference = summarize_feature_maps(maps)
    np.testing.assert_allclose(pooled.numpy(), reference[0], rtol=1e-6)
    np.testing.assert_allclose(peak_softmax.numpy(), reference[1], rtol=1e-5)
    np.testing.assert_array_equal(peak_index.numpy(), reference[2])
    # hand-checked entries
    assert peak_softmax[0, 0] == pytest.approx(1 / 24)
    assert int(peak_index[1, 2]) == 4  # row 0, column 4 comes before row 3, column 1
    assert peak_softmax[2, 3] == pytest.approx(1.0, abs=1e-6)


def test_features_pass_streams_what_one_big_batch_gives() -> None:
    model, dataset = _model(), _dataset()
    images, labels = dataset.tensors
    with torch.no_grad():
        model.eval()
        maps = model.forward_features(images).numpy()  # (N, n_f, h, w)
    model.train()
    n_images, n_features, height, width = maps.shape
    expected_features = FeatureStatistics(n_features, N_CLASSES)
    pooled, peak_softmax, peak_index = summarize_feature_maps(maps)
    expected_features.update(np.asarray(pooled, dtype=np.float64), labels.numpy())
    expected_maps = MapStatistics(n_features)
    expected_maps.update(
        np.asarray(pooled, dtype=np.float64),
        np.asarray(peak_softmax, dtype=np.float64),
        peak_index,
        map_height=height,
        map_width=width,
    )
    events: list[FeaturePassProgress] = []
    result = extract_features(
        model, DataLoader(dataset, batch_size=6), device="cpu", progress=events.append
    )
    assert model.training  # the pass switched to eval and back
    assert result.pooled is not None and result.labels is not None
    assert result.pooled.shape == (n_images, n_features) and result.pooled.dtype == np.float32
    np.testing.assert_allclose(result.pooled, pooled, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(result.labels, labels.numpy())
    _assert_same_arrays(result.feature_stats.to_arrays(), expected_features.to_arrays())
    _assert_same_arrays(result.map_stats.to_arrays(), expected_maps.to_arrays())
    assert result.feature_stats.count == n_images
    assert [(e.step, e.n_steps, e.n_images) for e in events] == [
        (1, 4, 6), (2, 4, 12), (3, 4, 18), (4, 4, 20)
    ]  # fmt: skip

    streamed_only = extract_features(
        model, DataLoader(dataset, batch_size=7), device="cpu", keep_pooled=False
    )
    assert streamed_only.pooled is None and streamed_only.labels is None
    _assert_same_arrays(streamed_only.feature_stats.to_arrays(), expected_features.to_arrays())
    _assert_same_arrays(streamed_only.map_stats.to_arrays(), expected_maps.to_arrays())


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    result = extract_features(_model(), DataLoader(_dataset(), batch_size=8), device="cpu")
    folder = save_feature_pass(tmp_path / "features", result)
    loaded = load_feature_pass(folder)
    assert isinstance(loaded, FeaturePass)
    _assert_same_arrays(loaded.feature_stats.to_arrays(), result.feature_stats.to_arrays())
    _assert_same_arrays(loaded.map_stats.to_arrays(), result.map_stats.to_arrays())
    assert loaded.pooled is not None and result.pooled is not None
    np.testing.assert_array_equal(loaded.pooled, result.pooled)
    np.testing.assert_array_equal(loaded.labels, result.labels)  # type: ignore[arg-type]
    np.testing.assert_array_equal(loaded.feature_stats.std, result.feature_stats.std)
    metadata = json.loads((folder / "feature_pass.json").read_text())
    assert metadata["n_images"] == 20 and metadata["has_pooled"] is True
    assert sorted(p.name for p in folder.iterdir()) == [
        "feature_pass.json", "feature_pass.safetensors"
    ]  # fmt: skip

    streamed = FeaturePass(result.feature_stats, result.map_stats, None, None)
    loaded = load_feature_pass(save_feature_pass(tmp_path / "streamed", streamed))
    assert loaded.pooled is None and loaded.labels is None


def test_load_rejects_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="feature_pass.json"):
        load_feature_pass(tmp_path)
    result = extract_features(_model(), DataLoader(_dataset(6), batch_size=8), device="cpu")
    folder = save_feature_pass(tmp_path / "f", result)
    metadata_path = folder / "feature_pass.json"
    metadata = json.loads(metadata_path.read_text())
    metadata_path.write_text(json.dumps({**metadata, "keys": ["pooled"]}))
    with pytest.raises(ValueError, match="different runs"):
        load_feature_pass(folder)
    metadata_path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not an openqpm features pass"):
        load_feature_pass(folder)


def test_empty_loader_is_an_error() -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0)), batch_size=4)
    with pytest.raises(ValueError, match="no batch"):
        extract_features(_model(), empty, device="cpu")
