"""Training loop: loss goes down, exact resume, NaN handling, frozen QPM head, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from openqpm.models import DenseHead, QPMModel, create_backbone
from openqpm.training import (
    CheckpointError,
    TrainingDivergedError,
    TrainingProgress,
    TrainingSchedule,
    evaluate_accuracy,
    make_loader,
    read_checkpoint_info,
    train_model,
)

N_CLASSES = 4
RECIPE: dict[str, Any] = {
    "lr_backbone": 0.05,
    "lr_head": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "step_size_epochs": 2,
    "gamma": 0.5,
    "diversity_beta": 0.2,
    "seed": 7,
}


def _schedule(epochs: int, **changes: float) -> TrainingSchedule:
    """The test recipe for ``epochs`` epochs, with ``changes`` to its values."""
    return TrainingSchedule(epochs=epochs, **{**RECIPE, **changes})


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these tensors are tiny, and on a busy 2-core machine two spinning
    OpenMP threads made a tiny_cnn step ~300 times slower (0.76 s instead of 2 ms)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _dataset(n_images: int = 32, *, seed: int = 0) -> TensorDataset:
    """Random 16 px images whose class shifts the mean of one colour channel (learnable)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 3, 16, 16, generator=generator)
    labels = torch.arange(n_images) % N_CLASSES
    images[:, 0] += 1.5 * labels[:, None, None].float() - 2.0
    return TensorDataset(images, labels)


def _dense_model(seed: int = 1) -> QPMModel:
    torch.manual_seed(seed)
    backbone = create_backbone("tiny_cnn")
    head = DenseHead(backbone.n_features, N_CLASSES)
    return QPMModel(backbone, head, class_names=[f"class {c}" for c in range(N_CLASSES)])


def _train_loader(dataset: TensorDataset, *, seed: int = 7) -> DataLoader:
    return make_loader(dataset, batch_size=8, train=True, seed=seed)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@torch.no_grad()
def _mean_cross_entropy(model: nn.Module, dataset: TensorDataset) -> float:
    model.eval()
    images, labels = dataset.tensors
    return float(functional.cross_entropy(model(images), labels))


def test_dense_training_reduces_the_loss() -> None:
    dataset = _dataset()
    model = _dense_model()
    before = _mean_cross_entropy(model, dataset)
    result = train_model(model, _train_loader(dataset), _schedule(6), device="cpu")
    after = _mean_cross_entropy(model, dataset)
    assert after < 0.7 * before
    assert len(result.history) == 6 and result.epochs_completed == 6
    # the history is consistent: loss = cross-entropy + diversity, the schedule halves every 2
    for record in result.history:
        assert record["loss"] == pytest.approx(record["cross_entropy"] + record["diversity_loss"])
        assert record["diversity_loss"] < 0
    assert [r["lr_backbone"] for r in result.history] == pytest.approx(
        [0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125]
    )
    assert [r["lr_head"] for r in result.history][::2] == pytest.approx([0.1, 0.05, 0.025])


def test_resume_after_an_interruption_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    dataset = _dataset()
    schedule = _schedule(3)
    reference = _dense_model()
    train_model(
        reference,
        _train_loader(dataset),
        schedule,
        device="cpu",
        checkpoint_path=tmp_path / "reference.ckpt",
    )

    class Interrupt(Exception):
        pass

    def stop_in_second_epoch(event: TrainingProgress) -> None:
        if event.epoch == 2 and event.step == 2:
            raise Interrupt

    checkpoint = tmp_path / "interrupted.ckpt"
    with pytest.raises(Interrupt):
        train_model(
            _dense_model(),
            _train_loader(dataset),
            schedule,
            device="cpu",
            checkpoint_path=checkpoint,
            progress=stop_in_second_epoch,
        )
    assert read_checkpoint_info(checkpoint)["epochs_completed"] == 1

    # a fresh process would start from a different model and random state
    torch.manual_seed(12345)
    resumed = _dense_model(seed=99)
    result = train_model(
        resumed,
        _train_loader(dataset),
        schedule,
        device="cpu",
        checkpoint_path=checkpoint,
        resume=True,
    )
    assert result.start_epoch == 1 and result.epochs_completed == schedule.epochs
    expected, actual = _weights(reference), _weights(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    # and resuming a finished run does nothing
    again = train_model(
        resumed, _train_loader(dataset), schedule, device="cpu", checkpoint_path=checkpoint,
        resume=True,
    )  # fmt: skip
    assert again.start_epoch == schedule.epochs
    for key, value in _weights(resumed).items():
        assert torch.equal(value, expected[key])


def test_max_epochs_this_call_slices_a_run(tmp_path: Path) -> None:
    dataset = _dataset()
    reference = _dense_model()
    train_model(reference, _train_loader(dataset), _schedule(2), device="cpu")
    sliced = _dense_model()
    checkpoint = tmp_path / "sliced.ckpt"
    for _ in range(2):
        train_model(
            sliced,
            _train_loader(dataset),
            _schedule(2),
            device="cpu",
            checkpoint_path=checkpoint,
            resume=True,
            max_epochs_this_call=1,
        )
    for key, value in _weights(reference).items():
        assert torch.equal(value, sliced.state_dict()[key]), key


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    dataset = _dataset()
    checkpoint = tmp_path / "dense.ckpt"
    model = _dense_model()
    train_model(
        model, _train_loader(dataset), _schedule(1), device="cpu", checkpoint_path=checkpoint
    )
    after_epoch_1 = _weights(model)
    images, labels = dataset.tensors
    poisoned = TensorDataset(torch.full_like(images, float("nan")), labels)
    with pytest.raises(TrainingDivergedError) as caught:
        train_model(
            model,
            _train_loader(poisoned),
            _schedule(2),
            device="cpu",
            checkpoint_path=checkpoint,
            resume=True,
        )
    error = caught.value
    assert (error.epoch, error.step) == (2, 1)
    assert np.isnan(error.loss)
    assert error.checkpoint_path == checkpoint
    assert "epoch 2, step 1/4" in str(error) and str(checkpoint) in str(error)
    # the checkpoint still holds epoch 1 and loads into a fresh model
    assert read_checkpoint_info(checkpoint)["epochs_completed"] == 1
    restored = _dense_model(seed=5)
    train_model(
        restored, _train_loader(dataset), _schedule(1), device="cpu", checkpoint_path=checkpoint,
        resume=True,
    )  # fmt: skip
    for key, value in after_epoch_1.items():
        assert torch.equal(value, restored.state_dict()[key]), key
    # the bad step was never applied to the trainable parameters
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.detach(), after_epoch_1[name]), name


def test_qpm_fine_tuning_leaves_the_binary_head_untouched() -> None:
    dataset = _dataset()
    dense = _dense_model()
    class_feature_matrix = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]])
    qpm = dense.to_qpm(
        np.array([3, 8, 17, 30]),
        np.array([0.5, 0.4, 0.3, 0.2]),
        np.array([1.0, 2.0, 0.5, 1.5]),
        class_feature_matrix,
        dropout=0.1,
    )
    head_before = {key: value.clone() for key, value in qpm.head.state_dict().items()}
    backbone_before = _weights(qpm.backbone)
    # fine-tuning is the same call with other schedule values
    finetune = _schedule(2, lr_backbone=0.01, momentum=0.95, step_size_epochs=1)
    result = train_model(qpm, _train_loader(dataset), finetune, device="cpu")
    for key, value in qpm.head.state_dict().items():
        assert torch.equal(value, head_before[key]), key
    assert torch.equal(qpm.class_weights(), torch.as_tensor(class_feature_matrix).float())
    changed = [
        k for k, v in qpm.backbone.state_dict().items() if not torch.equal(v, backbone_before[k])
    ]
    assert changed, "fine-tuning did not move the backbone"
    assert all(record["lr_head"] is None for record in result.history)  # no head group
    assert [record["lr_backbone"] for record in result.history] == pytest.approx([0.01, 0.005])


def test_checkpoint_is_safetensors_with_json_and_no_pickle(tmp_path: Path) -> None:
    checkpoint = tmp_path / "dense.ckpt"
    model = _dense_model()
    train_model(
        model, _train_loader(_dataset()), _schedule(1), device="cpu", checkpoint_path=checkpoint
    )
    raw = checkpoint.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_length])  # the whole header is JSON
    assert b"\x80\x02" not in raw[:2] and b"\x80\x04" not in raw[:2]  # no pickle protocol mark
    document = json.loads(header["__metadata__"]["openqpm_checkpoint"])
    assert document["format_version"] == 1
    assert document.keys() >= {"epochs_completed", "epochs", "seed", "hyperparameters", "history"}
    assert document.keys() >= {"optimizer", "scheduler", "grad_scaler", "format"}
    assert document["epochs_completed"] == 1
    assert document["hyperparameters"]["lr_backbone"] == RECIPE["lr_backbone"]
    tensor_names = set(header) - {"__metadata__"}
    assert {f"model.{key}" for key in model.state_dict()} <= tensor_names
    assert any(name.endswith("momentum_buffer") for name in tensor_names)
    assert [p.name for p in tmp_path.iterdir()] == ["dense.ckpt"]  # the temporary file renamed


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "dense.ckpt"
    dataset = _dataset()
    train_model(
        _dense_model(),
        _train_loader(dataset),
        _schedule(1),
        device="cpu",
        checkpoint_path=checkpoint,
    )
    changed = _schedule(2, lr_backbone=0.01)
    with pytest.raises(CheckpointError, match="lr_backbone: checkpoint 0.05, now 0.01"):
        train_model(
            _dense_model(), _train_loader(dataset), changed, device="cpu",
            checkpoint_path=checkpoint, resume=True,
        )  # fmt: skip
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_checkpoint_info(checkpoint)


def test_progress_events_cover_every_step() -> None:
    events: list[TrainingProgress] = []
    train_model(
        _dense_model(), _train_loader(_dataset(24)), _schedule(2), device="cpu",
        progress=events.append,
    )  # fmt: skip
    assert [(e.epoch, e.step) for e in events] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert all(e.n_epochs == 2 and e.n_steps == 3 for e in events)
    assert events[-1].eta_s == 0.0 and all(0.0 <= e.accuracy <= 1.0 for e in events)
    assert events[0].lr == RECIPE["lr_backbone"]


def test_evaluation_every_n_epochs_and_after_the_last(caplog: pytest.LogCaptureFixture) -> None:
    dataset = _dataset()
    test_loader = make_loader(dataset, batch_size=8, train=False, seed=0)
    with caplog.at_level(logging.INFO, logger="openqpm.training"):
        result = train_model(
            _dense_model(), _train_loader(dataset), _schedule(3), device="cpu",
            test_loader=test_loader, eval_every_epochs=2,
        )  # fmt: skip
    accuracies = [record["test_accuracy"] for record in result.history]
    assert accuracies[0] is None and accuracies[1] is not None and accuracies[2] is not None
    assert accuracies[2] == evaluate_accuracy(result.model, test_loader, device="cpu")
    assert result.model.training
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert "test accuracy" in lines[1] and "test accuracy" not in lines[0]


def test_bad_arguments_fail_early_naming_the_argument() -> None:
    loader = _train_loader(_dataset())
    with pytest.raises(ValueError, match="TrainingSchedule: epochs=-1, expected an integer >= 0"):
        _schedule(-1)
    with pytest.raises(ValueError, match=r"momentum=1.5, expected in \[0, 1\)"):
        _schedule(1, momentum=1.5)
    with pytest.raises(ValueError, match="diversity_beta=nan"):
        _schedule(1, diversity_beta=float("nan"))
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_path"):
        train_model(_dense_model(), loader, _schedule(1), device="cpu", resume=True)
    with pytest.raises(ValueError, match="eval_every_epochs=-1"):
        train_model(_dense_model(), loader, _schedule(1), device="cpu", eval_every_epochs=-1)
    with pytest.raises(ValueError, match="max_epochs_this_call=0, expected None or >= 1"):
        train_model(_dense_model(), loader, _schedule(1), device="cpu", max_epochs_this_call=0)
    with pytest.raises(TypeError, match="schedule must be a TrainingSchedule"):
        train_model(_dense_model(), loader, RECIPE, device="cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        make_loader(TensorDataset(torch.zeros(0, 3)), batch_size=4, train=True, seed=0)


def test_training_schedule_is_frozen() -> None:
    schedule = _schedule(2)
    assert (schedule.amp, schedule.seed) == (True, RECIPE["seed"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.epochs = 3  # type: ignore[misc]
    assert dataclasses.replace(schedule, epochs=5).epochs == 5
    with pytest.raises(ValueError, match="gamma=0"):
        dataclasses.replace(schedule, gamma=0)


def test_make_loader_caps_the_workers_at_the_cores(caplog: pytest.LogCaptureFixture) -> None:
    dataset = TensorDataset(torch.arange(10), torch.zeros(10, dtype=torch.long))
    with caplog.at_level(logging.INFO, logger="openqpm.training"):
        loader = make_loader(dataset, batch_size=4, train=False, seed=0, num_workers=64)
    n_cores = os.cpu_count() or 1
    assert 1 <= loader.num_workers <= n_cores
    assert "num_workers=64 lowered to" in caplog.text
    assert make_loader(dataset, batch_size=4, train=False, seed=0).num_workers == 0


def test_make_loader_orders() -> None:
    dataset = TensorDataset(torch.arange(10), torch.zeros(10, dtype=torch.long))

    def order(loader: DataLoader) -> list[int]:
        return [int(i) for images, _ in loader for i in images]

    evaluation = make_loader(dataset, batch_size=4, train=False, seed=0)
    assert order(evaluation) == list(range(10))
    train = make_loader(dataset, batch_size=3, train=True, seed=5)
    train.sampler.set_epoch(0)  # type: ignore[attr-defined]
    first = order(train)
    train.sampler.set_epoch(1)  # type: ignore[attr-defined]
    second = order(train)
    train.sampler.set_epoch(0)  # type: ignore[attr-defined]
    assert order(train) == first != second
    # 10 = 3 + 3 + 3 + 1: the lone last image is dropped (batch norm cannot train on one)
    assert len(first) == 9 and len(set(first)) == 9
    assert len(make_loader(dataset, batch_size=4, train=True, seed=5)) == 3  # 4 + 4 + 2 kept


def test_evaluate_accuracy_counts_correct_predictions() -> None:
    class Fixed(nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return images  # the "images" are the logits

    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 1, 1])  # correct: 0, 1, 4 -> 3 of 5
    model = Fixed().train()
    loader = DataLoader(TensorDataset(logits, labels), batch_size=2)
    assert evaluate_accuracy(model, loader, device="cpu") == pytest.approx(0.6)
    assert model.training  # mode restored
