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
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from openqpm.losses import feature_grounding_loss
from openqpm.models import DenseHead, QPMModel, create_backbone
from openqpm.training import (
    CheckpointError,
    TrainingDivergedError,
    TrainingProgress,
    TrainingSchedule,
    _LossModule,
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


def _schedule(epochs: int, **changes: Any) -> TrainingSchedule:
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


# --------------------------------------------------------------------------------------------
# CHiQPM: the feature grounding loss in the first epochs of fine-tuning

_CLASS_FEATURE_MATRIX = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]])


def _chiqpm_model(seed: int = 1) -> QPMModel:
    """A tiny QPM with the CHiQPM ReLU on a fresh dense model's backbone."""
    return _dense_model(seed).to_qpm(
        np.array([3, 8, 17, 30]),
        np.array([0.5, 0.4, 0.3, 0.2]),
        np.array([1.0, 2.0, 0.5, 1.5]),
        _CLASS_FEATURE_MATRIX,
        dropout=0.1,
        relu=True,
    )


def _finetune(epochs: int, **changes: Any) -> TrainingSchedule:
    """The fine-tuning recipe of these tests (``changes`` may set the grounding values)."""
    return _schedule(epochs, lr_backbone=0.01, momentum=0.95, step_size_epochs=1, **changes)


def _assert_same_weights(expected: nn.Module, actual: nn.Module) -> None:
    expected_state, actual_state = _weights(expected), _weights(actual)
    assert expected_state.keys() == actual_state.keys()
    for key, value in expected_state.items():
        assert torch.equal(value, actual_state[key]), key


def test_grounding_loss_module_adds_the_weighted_term_in_its_epochs_only() -> None:
    model = _chiqpm_model().train()
    images, labels = _dataset(8).tensors
    plain = _LossModule(model, diversity_beta=0.2)
    grounded = _LossModule(model, diversity_beta=0.2, grounding_weight=3.0, grounding_epochs=1)

    def run(module: _LossModule, epoch: int) -> tuple[torch.Tensor, ...]:
        module.epoch = epoch
        torch.manual_seed(0)  # the same dropout draws
        with torch.no_grad():
            return tuple(module(images, labels))

    loss, cross_entropy, terms, logits = run(plain, 0)
    assert terms.shape == (2,) and terms[1].item() == 0.0
    # epoch 0: the same logits (dropout drawn once, as in the plain step) and the same
    # cross-entropy and diversity, plus 3 x the grounding loss of the head's input
    g_loss, g_cross_entropy, g_terms, g_logits = run(grounded, 0)
    assert torch.equal(g_logits, logits) and torch.equal(g_cross_entropy, cross_entropy)
    assert torch.equal(g_terms[0], terms[0])
    torch.manual_seed(0)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
    expected = 3.0 * feature_grounding_loss(features, labels, model.head.weight)
    assert g_terms[1].item() == pytest.approx(expected.item(), rel=1e-6)
    assert g_terms[1].item() != 0.0
    assert g_loss.item() == pytest.approx((cross_entropy + terms[0] + expected).item(), rel=1e-6)
    # epoch 1 is past grounding_epochs: exactly the plain step
    late = run(grounded, 1)
    for plain_value, late_value in zip((loss, cross_entropy, terms, logits), late):
        assert torch.equal(plain_value, late_value)


def test_grounding_changes_the_training_and_is_reported() -> None:
    dataset = _dataset()
    baseline = _chiqpm_model()
    train_model(baseline, _train_loader(dataset), _finetune(2), device="cpu")
    grounded = _chiqpm_model()
    events: list[TrainingProgress] = []
    result = train_model(
        grounded, _train_loader(dataset), _finetune(2, grounding_weight=3.0), device="cpu",
        progress=events.append,
    )  # fmt: skip
    changed = [
        key
        for key, value in _weights(baseline.backbone).items()
        if not torch.equal(value, grounded.backbone.state_dict()[key])
    ]
    assert changed, "the grounding loss did not change the training"
    for record in result.history:
        assert record["grounding_loss"] != 0.0
        assert record["loss"] == pytest.approx(
            record["cross_entropy"] + record["diversity_loss"] + record["grounding_loss"]
        )
    assert all(event.grounding_loss != 0.0 for event in events)
    # the head stays frozen
    assert torch.equal(grounded.class_weights(), torch.as_tensor(_CLASS_FEATURE_MATRIX).float())


def test_grounding_in_zero_epochs_is_bit_identical_to_no_grounding(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dataset = _dataset()
    plain = _chiqpm_model()
    with caplog.at_level(logging.INFO, logger="openqpm.training"):
        result = train_model(plain, _train_loader(dataset), _finetune(2), device="cpu")
    assert all(record["grounding_loss"] == 0.0 for record in result.history)
    assert "grounding" not in caplog.text  # the log line is as before
    never = _chiqpm_model()
    train_model(
        never, _train_loader(dataset), _finetune(2, grounding_weight=3.0, grounding_epochs=0),
        device="cpu",
    )  # fmt: skip
    _assert_same_weights(plain, never)


def test_grounding_stops_after_grounding_epochs(caplog: pytest.LogCaptureFixture) -> None:
    dataset = _dataset()
    always = _chiqpm_model()
    always_result = train_model(
        always, _train_loader(dataset), _finetune(2, grounding_weight=3.0), device="cpu"
    )
    first_only = _chiqpm_model()
    with caplog.at_level(logging.INFO, logger="openqpm.training"):
        result = train_model(
            first_only, _train_loader(dataset),
            _finetune(2, grounding_weight=3.0, grounding_epochs=1), device="cpu",
        )  # fmt: skip
    first, second = result.history
    # epoch 1 is the same as with grounding in every epoch ...
    for key in ("loss", "cross_entropy", "diversity_loss", "grounding_loss"):
        assert first[key] == always_result.history[0][key], key
    assert first["grounding_loss"] != 0.0
    # ... epoch 2 has no grounding term and ends elsewhere
    assert second["grounding_loss"] == 0.0 and always_result.history[1]["grounding_loss"] != 0.0
    assert second["loss"] == pytest.approx(second["cross_entropy"] + second["diversity_loss"])
    assert any(
        not torch.equal(value, first_only.state_dict()[key])
        for key, value in _weights(always).items()
    )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 2 and all(", grounding " in line for line in lines)
    assert ", grounding 0.0000)" in lines[1]


def test_resume_across_the_end_of_grounding_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    dataset = _dataset()
    schedule = _finetune(3, grounding_weight=3.0, grounding_epochs=2)
    reference = _chiqpm_model()
    train_model(reference, _train_loader(dataset), schedule, device="cpu")
    checkpoint = tmp_path / "chiqpm.ckpt"
    train_model(
        _chiqpm_model(), _train_loader(dataset), schedule, device="cpu",
        checkpoint_path=checkpoint, max_epochs_this_call=2,
    )  # fmt: skip
    assert read_checkpoint_info(checkpoint)["hyperparameters"]["grounding_epochs"] == 2
    # a fresh process: another model and random state, the epoch count restarts from 0 here
    torch.manual_seed(12345)
    resumed = _chiqpm_model(seed=99)
    result = train_model(
        resumed, _train_loader(dataset), schedule, device="cpu", checkpoint_path=checkpoint,
        resume=True,
    )  # fmt: skip
    assert result.start_epoch == 2
    assert [record["grounding_loss"] == 0.0 for record in result.history] == [False, False, True]
    _assert_same_weights(reference, resumed)


def test_resume_with_other_grounding_settings_is_refused(tmp_path: Path) -> None:
    dataset = _dataset()
    checkpoint = tmp_path / "chiqpm.ckpt"
    schedule = _finetune(2, grounding_weight=3.0, grounding_epochs=1)
    train_model(
        _chiqpm_model(), _train_loader(dataset), schedule, device="cpu",
        checkpoint_path=checkpoint, max_epochs_this_call=1,
    )  # fmt: skip
    for changes, message in (
        ({"grounding_weight": 1.0}, "grounding_weight: checkpoint 3.0, now 1.0"),
        ({"grounding_epochs": 2}, "grounding_epochs: checkpoint 1, now 2"),
        ({"grounding_epochs": None}, "grounding_epochs: checkpoint 1, now None"),
    ):
        with pytest.raises(CheckpointError, match=message):
            train_model(
                _chiqpm_model(), _train_loader(dataset), dataclasses.replace(schedule, **changes),
                device="cpu", checkpoint_path=checkpoint, resume=True,
            )  # fmt: skip


def _drop_hyperparameters(checkpoint: Path, names: tuple[str, ...]) -> None:
    """Rewrite ``checkpoint`` as a version without the hyperparameters ``names`` wrote it."""
    with safe_open(str(checkpoint), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    document = json.loads(metadata["openqpm_checkpoint"])
    for name in names:
        del document["hyperparameters"][name]
    for record in document["history"]:
        record.pop("grounding_loss", None)
    save_file(tensors, str(checkpoint), metadata={"openqpm_checkpoint": json.dumps(document)})


def test_checkpoints_from_before_grounding_resume_with_the_defaults(tmp_path: Path) -> None:
    dataset = _dataset()
    reference = _chiqpm_model()
    train_model(reference, _train_loader(dataset), _finetune(2), device="cpu")
    checkpoint = tmp_path / "old.ckpt"
    train_model(
        _chiqpm_model(), _train_loader(dataset), _finetune(2), device="cpu",
        checkpoint_path=checkpoint, max_epochs_this_call=1,
    )  # fmt: skip
    _drop_hyperparameters(checkpoint, ("grounding_weight", "grounding_epochs"))
    assert "grounding_weight" not in read_checkpoint_info(checkpoint)["hyperparameters"]
    with pytest.raises(CheckpointError, match="grounding_weight: checkpoint 0.0, now 3.0"):
        train_model(
            _chiqpm_model(), _train_loader(dataset), _finetune(2, grounding_weight=3.0),
            device="cpu", checkpoint_path=checkpoint, resume=True,
        )  # fmt: skip
    resumed = _chiqpm_model(seed=99)
    result = train_model(
        resumed, _train_loader(dataset), _finetune(2), device="cpu", checkpoint_path=checkpoint,
        resume=True,
    )  # fmt: skip
    assert result.start_epoch == 1
    _assert_same_weights(reference, resumed)


def test_grounding_needs_a_qpm_head_and_valid_values() -> None:
    loader = _train_loader(_dataset())
    with pytest.raises(ValueError, match="grounding_weight=3.0 needs a QPM head.*DenseHead"):
        train_model(_dense_model(), loader, _schedule(1, grounding_weight=3.0), device="cpu")
    # weight 0 trains any head, whatever grounding_epochs says
    train_model(_dense_model(), loader, _schedule(1, grounding_epochs=5), device="cpu")
    for changes, message in (
        ({"grounding_weight": -1.0}, "grounding_weight=-1.0, expected a finite number >= 0"),
        ({"grounding_weight": float("inf")}, "grounding_weight=inf"),
        ({"grounding_epochs": -1}, "grounding_epochs=-1, expected None or an integer >= 0"),
        ({"grounding_epochs": 1.5}, "grounding_epochs=1.5"),
        ({"grounding_epochs": True}, "grounding_epochs=True"),
    ):
        with pytest.raises(ValueError, match=message):
            _schedule(1, **changes)
    schedule = _schedule(40, grounding_weight=3.0, grounding_epochs=30)
    assert [schedule.grounding_weight_at(epoch) for epoch in (0, 29, 30, 39)] == [3, 3, 0, 0]
    assert _schedule(40, grounding_weight=3.0).grounding_weight_at(39) == 3.0


def _grounding_ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank of a 2-process CHiQPM fine-tuning whose grounding stops after epoch 1."""
    import torch.distributed as torch_distributed

    torch.set_num_threads(1)
    torch_distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        model = _chiqpm_model()
        result = train_model(
            model,
            _train_loader(_dataset()),
            _finetune(2, grounding_weight=3.0, grounding_epochs=1),
            device="cpu",
        )
        # the parameters (batch-norm statistics are per rank: DDP broadcasts them before steps)
        tensors = {key: value.detach().clone() for key, value in model.named_parameters()}
        history = [record["grounding_loss"] for record in result.history]
        save_file(
            tensors,
            str(Path(out_dir) / f"rank{rank}.safetensors"),
            metadata={"grounding": json.dumps(history)},
        )
    finally:
        torch_distributed.destroy_process_group()


def test_grounding_epochs_reach_the_loss_under_distributed_data_parallel(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    torch.multiprocessing.spawn(_grounding_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = []
    for rank in range(2):
        with safe_open(str(tmp_path / f"rank{rank}.safetensors"), framework="pt") as handle:
            grounding = json.loads(handle.metadata()["grounding"])
            weights = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        # the wrapped loss module saw the epoch: grounding in epoch 1 only
        assert grounding[0] != 0.0 and grounding[1] == 0.0
        ranks.append(weights)
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
