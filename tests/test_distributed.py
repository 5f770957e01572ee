"""torch.distributed helpers, and 2 CPU processes (gloo) giving what one process gives."""

from __future__ import annotations

import importlib
import inspect
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as torch_distributed
import torch.multiprocessing
from safetensors.numpy import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

from openqpm import distributed
from openqpm.constants import build_problem
from openqpm.features import FeaturePass, extract_features
from openqpm.models import DenseHead, QPMModel, create_backbone
from openqpm.training import TrainingSchedule, make_loader, read_checkpoint_info, train_model

N_CLASSES = 4
N_IMAGES = 23  # odd on purpose: the two ranks get 12 and 11 images
PROBLEM_SIZE = {"n_features": 8, "n_per_class": 2}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these tensors are tiny, and on a busy 2-core machine two spinning
    OpenMP threads made a tiny_cnn step ~300 times slower (0.76 s instead of 2 ms)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_shard_sampler_covers_every_item_once() -> None:
    for n_items in (0, 1, 5, 10):
        for n_replicas in (1, 2, 3):
            shards = [
                list(distributed.ShardSampler(range(n_items), num_replicas=n_replicas, rank=r))
                for r in range(n_replicas)
            ]
            assert sorted(i for shard in shards for i in shard) == list(range(n_items))
            for r, shard in enumerate(shards):
                assert len(
                    distributed.ShardSampler(range(n_items), num_replicas=n_replicas, rank=r)
                ) == len(shard)
    with pytest.raises(ValueError, match="rank 2"):
        distributed.ShardSampler(range(4), num_replicas=2, rank=2)


def test_single_process_helpers() -> None:
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    arrays = {"a": np.arange(3, dtype=np.int64), "b": np.ones((2, 2), dtype=np.float32)}
    reduced = distributed.all_reduce_arrays(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(reduced[key], value)
        assert reduced[key].dtype == value.dtype and reduced[key] is not value
    assert distributed.all_gather_rows(arrays["b"])[0] is arrays["b"]
    (gathered,) = distributed.all_gather_arrays(arrays)
    assert gathered.keys() == arrays.keys() and gathered["a"] is not arrays["a"]
    loader = DataLoader(TensorDataset(torch.arange(3)), batch_size=2)
    assert distributed.shard_loader(loader) is loader
    with pytest.raises(TypeError, match="'c' must be a numeric numpy array"):
        distributed.all_reduce_arrays({"c": [1, 2]})  # type: ignore[dict-item]


# ----------------------------------------------------------------------------- two processes


def _model() -> QPMModel:
    torch.manual_seed(11)
    backbone = create_backbone("tiny_cnn")
    head = DenseHead(backbone.n_features, N_CLASSES)
    return QPMModel(backbone, head, class_names=[str(c) for c in range(N_CLASSES)])


def _dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(12)
    images = torch.randn(N_IMAGES, 3, 16, 16, generator=generator)
    labels = torch.arange(N_IMAGES) % N_CLASSES
    images[:, 1] += labels[:, None, None].float()
    return TensorDataset(images, labels)


def _pass_arrays(feature_pass: FeaturePass) -> dict[str, np.ndarray]:
    arrays = {f"feature_stats.{k}": v for k, v in feature_pass.feature_stats.to_arrays().items()}
    arrays.update({f"map_stats.{k}": v for k, v in feature_pass.map_stats.to_arrays().items()})
    assert feature_pass.pooled is not None and feature_pass.labels is not None
    arrays["pooled"] = feature_pass.pooled
    arrays["labels"] = feature_pass.labels
    return {k: np.array(v, order="C", copy=True) for k, v in arrays.items()}


def _problem_arrays(feature_pass: FeaturePass) -> dict[str, Any]:
    problem, _ = build_problem(feature_pass.feature_stats, feature_pass.map_stats, **PROBLEM_SIZE)
    arrays: dict[str, Any] = {"A": problem.A, "R": problem.R, "b": problem.b}
    solver = importlib.import_module("openqpm.solver")
    solve = getattr(solver, "solve", None)
    if solve is not None:
        options: dict[str, Any] = {"method": "search", "time_limit_s": 30, "seed": 0}
        if "max_iterations" in inspect.signature(solve).parameters:
            options["max_iterations"] = 200
        assignment = solve(problem, **options)
        arrays["selected_features"] = np.asarray(assignment.selected_features)
        arrays["class_feature_matrix"] = np.asarray(assignment.class_feature_matrix())
    return arrays


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch_distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        out = Path(out_dir)
        dataset = _dataset()
        sharded = make_loader(dataset, batch_size=4, train=False, seed=0)
        assert len(sharded.sampler) == (12 if rank == 0 else 11)  # type: ignore[arg-type]
        feature_pass = extract_features(_model(), sharded, device="cpu", keep_pooled=True)
        # a plain loader is re-sharded by the pass itself
        plain = extract_features(_model(), DataLoader(dataset, batch_size=5), device="cpu")
        problem = _problem_arrays(feature_pass)
        model = _model()
        schedule = TrainingSchedule(
            epochs=2,
            lr_backbone=0.05,
            lr_head=0.05,
            momentum=0.9,
            weight_decay=5e-4,
            step_size_epochs=1,
            gamma=0.5,
            diversity_beta=0.2,
            seed=3,
        )
        train_model(
            model,
            make_loader(dataset, batch_size=4, train=True, seed=3),
            schedule,
            device="cpu",
            checkpoint_path=out / "ddp.ckpt",
        )
        parameters = {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
        save_file(parameters, str(out / f"parameters_rank{rank}.safetensors"))
        if rank == 0:
            save_file(_pass_arrays(feature_pass), str(out / "pass.safetensors"))
            save_file(_pass_arrays(plain), str(out / "pass_plain.safetensors"))
            np.savez(out / "problem.npz", **problem)
    finally:
        torch_distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)

    single = extract_features(
        _model(), DataLoader(_dataset(), batch_size=4), device="cpu", keep_pooled=True
    )
    expected = _pass_arrays(single)
    for name in ("pass.safetensors", "pass_plain.safetensors"):
        got = load_file(str(tmp_path / name))
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-8, err_msg=key)
    np.testing.assert_array_equal(got["labels"], np.arange(N_IMAGES) % N_CLASSES)

    expected_problem = _problem_arrays(single)
    with np.load(tmp_path / "problem.npz", allow_pickle=False) as got_problem:
        assert sorted(got_problem.files) == sorted(expected_problem)
        for key, value in expected_problem.items():
            np.testing.assert_allclose(got_problem[key], value, rtol=1e-6, atol=1e-9, err_msg=key)

    # DDP kept the two replicas identical, and only rank 0 wrote the checkpoint
    rank0 = load_file(str(tmp_path / "parameters_rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "parameters_rank1.safetensors"))
    for key in rank0:
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)
    info = read_checkpoint_info(tmp_path / "ddp.ckpt")
    assert info["epochs_completed"] == 2 and info["hyperparameters"]["world_size"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp renamed
