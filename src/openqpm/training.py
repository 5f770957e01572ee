"""Dense training and QPM fine-tuning: one loop, checkpoints at every epoch, exact resume, AMP, DDP.

The loop follows the reference recipe (paper App. C, reference code): SGD with momentum and weight
decay, one learning rate for the backbone and one for the head, a StepLR schedule stepped once per
epoch, and the loss cross-entropy + feature diversity loss. The same function fine-tunes a QPM:
its head has no trainable parameter (the binary assignment, the mean and the std are frozen), so
only the backbone moves. CHiQPM fine-tuning adds the feature grounding loss for its first epochs
(``TrainingSchedule.grounding_weight`` and ``grounding_epochs``).

Exact resume: at the end of every epoch a checkpoint is written atomically (one safetensors file:
model, optimizer and grad-scaler tensors, with the epoch, the schedule, the hyperparameters and the
history as JSON in its header; no pickle). The randomness of an epoch (data order, dropout,
augmentation, worker seeds) is derived from ``(seed, epoch, rank)`` when the epoch starts, so an
interrupted run resumed from its checkpoint ends with the same weights as an uninterrupted one on
the CPU, whatever happened to the process's random state in between.

Multi-GPU: when ``torch.distributed`` is initialised (``torchrun``) the model is wrapped in
``DistributedDataParallel``, each rank reads its shard (``make_loader`` builds the right sampler),
only rank 0 writes checkpoints and reports progress.

The loop is split the way timm's ``train.py`` is: :func:`train_model` sets up (``_build_optimizer``,
``_restore``) and runs the epochs, ``_train_one_epoch`` runs one (seeding, steps, the NaN check,
progress events), :func:`evaluate_accuracy` evaluates and ``_save_checkpoint`` writes the
checkpoint. Dense training and fine-tuning differ only by their :class:`TrainingSchedule`.

Example:
    >>> loader = make_loader(train_set, batch_size=16, train=True, seed=0)
    >>> dense = TrainingSchedule(epochs=150, lr_backbone=5e-3, lr_head=1e-2, momentum=0.9,
    ...                          weight_decay=5e-4, step_size_epochs=30, gamma=0.4,
    ...                          diversity_beta=0.196)
    >>> result = train_model(model, loader, dense, device="cuda", checkpoint_path="dense.ckpt")
    >>> evaluate_accuracy(model, test_loader, device="cuda")
    0.866
    >>> finetune = dataclasses.replace(dense, epochs=40, lr_backbone=1e-4, lr_head=1e-4,
    ...                                momentum=0.95, step_size_epochs=10)
    >>> train_model(qpm_model, loader, finetune, device="cuda", checkpoint_path="finetune.ckpt")
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.distributed as torch_distributed
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from openqpm import distributed as _distributed
from openqpm._io import atomic_path, eval_mode, is_main_process, read_json_header, unpack_batch
from openqpm.losses import (
    REFERENCE_REMAINING_FACTOR,
    feature_diversity_loss,
    feature_grounding_loss,
)

if TYPE_CHECKING:  # pragma: no cover - annotations only; models import torchvision
    from openqpm.models.head import QPMHead
    from openqpm.models.model import QPMModel

__all__ = [
    "CheckpointError",
    "TrainingDivergedError",
    "TrainingProgress",
    "TrainingResult",
    "TrainingSchedule",
    "evaluate_accuracy",
    "make_loader",
    "read_checkpoint_info",
    "train_model",
]

_logger = logging.getLogger(__name__)

_CHECKPOINT_FORMAT = "openqpm.training_checkpoint"
_CHECKPOINT_VERSION = 1
_METADATA_KEY = "openqpm_checkpoint"
# Hyperparameters recorded since a later version, with the value that checkpoints without them
# were trained with.
_ADDED_HYPERPARAMETERS: dict[str, Any] = {
    "grounding_weight": 0.0,
    "grounding_epochs": None,
    "grounding_remaining_factor": REFERENCE_REMAINING_FACTOR,
}


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the bad step was applied.

    Attributes:
        epoch: the epoch (1-based) in which it happened.
        step: the step (1-based) within that epoch.
        loss: the offending value.
        checkpoint_path: the last good checkpoint, kept as it was (None when not checkpointing).
    """

    def __init__(
        self, message: str, *, epoch: int, step: int, loss: float, checkpoint_path: Path | None
    ) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.loss = loss
        self.checkpoint_path = checkpoint_path


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, not an openqpm checkpoint, or from a different setup."""


@dataclass(frozen=True)
class TrainingProgress:
    """One progress event, sent after every optimisation step (on rank 0 only).

    Attributes:
        epoch: current epoch, 1-based.
        n_epochs: epochs of the whole run.
        step: steps done in this epoch, 1-based.
        n_steps: steps per epoch.
        loss: mean training loss over this epoch so far (cross-entropy + diversity +
            grounding).
        accuracy: training accuracy over this epoch so far, a fraction (dropout active).
        lr: the backbone's current learning rate (the head's when the backbone is frozen).
        elapsed_s: seconds since this call started.
        eta_s: estimated seconds until the run's last epoch ends.
        grounding_loss: mean weighted feature grounding term over this epoch so far (0 when
            the schedule does not apply it in this epoch).
    """

    epoch: int
    n_epochs: int
    step: int
    n_steps: int
    loss: float
    accuracy: float
    lr: float
    elapsed_s: float
    eta_s: float
    grounding_loss: float = 0.0


@dataclass
class TrainingResult:
    """What :func:`train_model` did.

    Attributes:
        model: the trained model (the object passed in, trained in place), in train mode.
        history: one dict per finished epoch (including epochs restored from a checkpoint):
            ``epoch`` (1-based), ``loss``, ``cross_entropy``, ``diversity_loss``,
            ``grounding_loss`` (the weighted term, 0 when not applied; absent from the records
            of checkpoints written before it existed), ``train_accuracy`` (fraction),
            ``lr_backbone``, ``lr_head``, ``time_s``, ``test_accuracy`` (fraction, or None when
            not evaluated).
        epochs_completed: epochs finished in total.
        start_epoch: epochs that were already done when this call started (from the checkpoint).
        checkpoint_path: the checkpoint file, or None.
        elapsed_s: seconds this call took.
    """

    model: QPMModel
    history: list[dict[str, Any]] = field(default_factory=list)
    epochs_completed: int = 0
    start_epoch: int = 0
    checkpoint_path: Path | None = None
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class TrainingSchedule:
    """The values that differ between dense training and QPM fine-tuning; checked when built.

    Dense training and fine-tuning run the same :func:`train_model`; only these values differ
    (paper App. C, reference code: dense 150 epochs at 5e-3/1e-2, StepLR 30 x 0.4; fine-tuning
    40 epochs at 1e-4, momentum 0.95, StepLR 10 x 0.4). Resuming a checkpoint written with other
    values is refused, except for ``epochs`` (which may grow) and ``amp`` off CUDA (unused there).

    CHiQPM fine-tuning adds ``grounding_weight * feature_grounding_loss`` (see
    :func:`openqpm.losses.feature_grounding_loss`) in the epochs ``0 .. grounding_epochs - 1``
    (every epoch when ``grounding_epochs`` is None); the authors use weight 3 for the first 30 of
    40 epochs. It needs a QPM head (a binary class-feature matrix). With weight 0 (the default)
    training is exactly the QPM one.

    Raises:
        ValueError: a value out of range, naming the field, the value and what was expected.
    """

    epochs: int  # total epochs of the run, including those a resumed checkpoint already did
    lr_backbone: float  # learning rate of every backbone parameter
    lr_head: float  # learning rate of the head's parameters (a QPM head has none)
    momentum: float  # SGD momentum, in [0, 1)
    weight_decay: float  # SGD weight decay, on every parameter (as the reference code)
    step_size_epochs: int  # StepLR step, in epochs
    gamma: float  # StepLR factor
    diversity_beta: float  # weight of the feature diversity loss; 0 = cross-entropy only
    amp: bool = True  # mixed precision (autocast + GradScaler); used on CUDA only
    seed: int = 0  # with the epoch and the rank, derives the randomness of every epoch
    grounding_weight: float = 0.0  # weight of the feature grounding loss (CHiQPM); 0 = none
    grounding_epochs: int | None = None  # epochs (from 0) with grounding; None = all of them
    # the factor on the unassigned features' mean (the authors' 2; see feature_grounding_loss)
    grounding_remaining_factor: float = REFERENCE_REMAINING_FACTOR

    def __post_init__(self) -> None:
        self.validate()

    def grounding_weight_at(self, epoch: int) -> float:
        """The grounding loss weight in epoch ``epoch`` (0-based): the weight, or 0 after
        ``grounding_epochs``."""
        return _grounding_weight_at(self.grounding_weight, self.grounding_epochs, epoch)

    def validate(self) -> None:
        """Check every value (called when the schedule is built).

        Raises:
            ValueError: the first value out of range, as ``TrainingSchedule: name=value,
                expected ...``.
        """
        checks = {
            "epochs": (isinstance(self.epochs, int) and self.epochs >= 0, "an integer >= 0"),
            "lr_backbone": (self.lr_backbone >= 0, ">= 0"),
            "lr_head": (self.lr_head >= 0, ">= 0"),
            "momentum": (0 <= self.momentum < 1, "in [0, 1)"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "step_size_epochs": (self.step_size_epochs >= 1, ">= 1"),
            "gamma": (self.gamma > 0, "> 0"),
            "diversity_beta": (math.isfinite(self.diversity_beta), "finite"),
            "seed": (isinstance(self.seed, int) and self.seed >= 0, "an integer >= 0"),
            "grounding_weight": (
                not isinstance(self.grounding_weight, bool)
                and isinstance(self.grounding_weight, (int, float))
                and math.isfinite(self.grounding_weight)
                and self.grounding_weight >= 0,
                "a finite number >= 0",
            ),
            "grounding_epochs": (
                self.grounding_epochs is None
                or (
                    isinstance(self.grounding_epochs, int)
                    and not isinstance(self.grounding_epochs, bool)
                    and self.grounding_epochs >= 0
                ),
                "None or an integer >= 0",
            ),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"TrainingSchedule: {name}={value!r}, expected {expected}")


# ----------------------------------------------------------------------------- loaders


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int = 0,
    distributed: bool | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader whose order is reproducible and, under torch.distributed, sharded by rank.

    Training loaders shuffle with a ``DistributedSampler`` (also in a single process, as one
    replica): its order is a function of ``seed`` and the epoch that :func:`train_model` sets, which
    is what makes resuming exact. Evaluation loaders read the data set in order; under
    torch.distributed each rank reads every W-th item without padding (``ShardSampler``), so
    statistics summed over ranks count every image exactly once.

    Args:
        dataset: a map-style data set yielding ``(image, label)``.
        batch_size: images per batch and per process.
        train: shuffle (per epoch) for training, or keep the data set order.
        seed: the shuffling seed.
        num_workers: worker processes (not persistent: every epoch's workers are seeded anew);
            lowered to the CPU cores available to this process when it asks for more.
        distributed: shard across ranks; None = when torch.distributed is initialised.
        pin_memory: pin host memory (worth it when training on CUDA).

    Returns:
        The DataLoader. A training loader drops its last batch only when it would hold a single
        image (batch norm cannot train on one).

    Raises:
        ValueError: empty data set or a batch size below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be at least 0, got {num_workers}")
    n_items = len(dataset) if isinstance(dataset, Sized) else 0
    if n_items == 0:
        raise ValueError("make_loader: the data set is empty")
    num_workers = _cap_workers(num_workers)
    sharded = _distributed.is_distributed() if distributed is None else distributed
    n_replicas = _distributed.world_size() if sharded else 1
    replica = _distributed.rank() if sharded else 0
    sampler: DistributedSampler | _distributed.ShardSampler
    if train:
        sampler = DistributedSampler(
            dataset, num_replicas=n_replicas, rank=replica, shuffle=True, seed=seed
        )
    else:
        sampler = _distributed.ShardSampler(dataset, num_replicas=n_replicas, rank=replica)
    drop_last = train and len(sampler) % batch_size == 1 and len(sampler) > 1
    if drop_last:
        _logger.info(
            "training loader: dropping the last batch of each epoch (it would hold 1 image)"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=False,
    )


def _cap_workers(num_workers: int) -> int:
    """``num_workers`` lowered to the CPU cores this process may run on (logged when lowered)."""
    get_affinity = getattr(os, "sched_getaffinity", None)  # Linux; not on macOS or Windows
    n_cores = max(len(get_affinity(0)), 1) if get_affinity is not None else os.cpu_count() or 1
    if num_workers > n_cores:
        _logger.info(
            "make_loader: num_workers=%d lowered to %d, the CPU cores available to this process",
            num_workers,
            n_cores,
        )
    return min(num_workers, n_cores)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: DataLoader, *, device: torch.device | str) -> float:
    """Top-1 accuracy of ``model`` over ``loader``, as a fraction.

    Runs in eval mode (the previous mode is restored). Under torch.distributed each rank reads its
    shard and the counts are summed, so every rank returns the accuracy over the whole data set.

    Args:
        model: maps images to logits (B, n_c).
        loader: yields ``(images, labels)``.
        device: where the forward passes run.

    Returns:
        Correct predictions / images, in [0, 1].

    Raises:
        ValueError: the loader yielded no image, or a batch that is not ``(images, labels)``.
    """
    device = torch.device(device)
    loader = _distributed.shard_loader(loader)
    model.to(device)
    counts = np.zeros(2, dtype=np.int64)  # correct, total
    with eval_mode(model):
        for batch in loader:
            images, labels = unpack_batch(batch, name="the evaluation loader")
            logits = model(images.to(device, non_blocking=True))  # (B, n_c)
            predictions = logits.argmax(dim=1).cpu()
            counts[0] += int((predictions == labels.cpu()).sum())
            counts[1] += int(labels.numel())
    correct, total = _distributed.all_reduce_arrays({"counts": counts})["counts"]
    if total == 0:
        raise ValueError("evaluate_accuracy: the loader yielded no image")
    return float(correct) / float(total)


# ----------------------------------------------------------------------------- the loss


def _grounding_weight_at(weight: float, epochs: int | None, epoch: int) -> float:
    """``weight`` in epoch ``epoch`` (0-based) when it is below ``epochs`` (None: always), else 0."""
    if epochs is not None and epoch >= epochs:
        return 0.0
    return float(weight)


class _LossModule(nn.Module):
    """Forward pass and loss in one module, so that DistributedDataParallel sees the whole step.

    The loss is cross-entropy + the feature diversity loss (beta inside) + ``grounding_weight``
    times the feature grounding loss while ``epoch`` (0-based) is below ``grounding_epochs``.
    The training loop sets ``epoch`` at the start of every epoch (on this module, not on its
    DistributedDataParallel wrapper). Without grounding in the current epoch the step is exactly
    the QPM step: the same operations and random draws.

    Raises:
        ValueError: a positive ``grounding_weight`` with a head that is not a QPM head.
    """

    def __init__(
        self,
        model: QPMModel,
        *,
        diversity_beta: float,
        grounding_weight: float = 0.0,
        grounding_epochs: int | None = None,
        grounding_remaining_factor: float = REFERENCE_REMAINING_FACTOR,
    ) -> None:
        super().__init__()
        if grounding_weight > 0 and not getattr(model, "is_qpm", False):
            head = getattr(model, "head", None)
            raise ValueError(
                f"grounding_weight={grounding_weight!r} needs a QPM head (a binary "
                f"class-feature matrix), but the model's head is a {type(head).__name__}; set "
                "grounding_weight=0 to train it"
            )
        self.model = model
        self.diversity_beta = diversity_beta
        self.grounding_weight = grounding_weight
        self.grounding_epochs = grounding_epochs
        self.grounding_remaining_factor = grounding_remaining_factor
        self.epoch = 0  # the current epoch (0-based), set by the training loop

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss, then detached: the cross-entropy, the (2,) regularisation terms (diversity,
        weighted grounding) and the logits."""
        feature_maps = self.model.forward_features(images)  # (B, n_f, h, w)
        grounding_weight = _grounding_weight_at(
            self.grounding_weight, self.grounding_epochs, self.epoch
        )
        grounding: torch.Tensor | None = None
        if grounding_weight == 0.0:
            logits = self.model.forward_head(feature_maps)  # (B, n_c)
        else:
            # the head's input and the logits from the same tensor: dropout is drawn once
            head = cast("QPMHead", self.model.head)  # checked when the module was built
            pre_logits = self.model.forward_head(feature_maps, pre_logits=True)  # (B, K)
            logits = head.logits_from_pre_logits(pre_logits)  # (B, n_c)
            with torch.autocast(device_type=images.device.type, enabled=False):
                grounding = grounding_weight * feature_grounding_loss(
                    pre_logits.float(),
                    labels,
                    head.weight,
                    remaining_factor=self.grounding_remaining_factor,
                )
        cross_entropy = functional.cross_entropy(logits.float(), labels)
        if self.diversity_beta == 0.0:
            diversity = torch.zeros((), device=logits.device)
        else:
            head_maps = self.model.head_feature_maps(feature_maps)  # (B, K, h, w)
            # In float32 even under autocast: a softmax over h*w positions summed in half
            # precision loses the small terms the loss is made of.
            with torch.autocast(device_type=images.device.type, enabled=False):
                diversity = feature_diversity_loss(
                    head_maps.float(),
                    logits.float(),
                    self.model.head.weight.float(),
                    beta=self.diversity_beta,
                )
        loss = cross_entropy + diversity
        if grounding is None:
            grounding = torch.zeros((), device=logits.device)
        else:
            loss = loss + grounding
        regularisers = torch.stack([diversity.detach().float(), grounding.detach().float()])
        return loss, cross_entropy.detach(), regularisers, logits.detach()


def _set_loss_epoch(loss_module: nn.Module, epoch: int) -> None:
    """Tell the loss module (inside its DistributedDataParallel wrapper, if any) the epoch."""
    inner = loss_module.module if isinstance(loss_module, DistributedDataParallel) else loss_module
    if isinstance(inner, _LossModule):
        inner.epoch = epoch


# ----------------------------------------------------------------------------- checkpoints


def _optimizer_to_parts(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able values."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    other_state: dict[str, dict[str, Any]] = {}
    for param_index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.state.{param_index}.{name}"] = value
            else:
                other_state.setdefault(str(param_index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": other_state}


def _optimizer_from_parts(
    tensors: dict[str, torch.Tensor], description: dict[str, Any]
) -> dict[str, Any]:
    """An optimizer state dict again, from the parts :func:`_optimizer_to_parts` made."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, _, param_index, name = key.split(".", 3)
        state.setdefault(int(param_index), {})[name] = value
    for param_index, values in description["state"].items():
        state.setdefault(int(param_index), {}).update(values)
    return {"state": state, "param_groups": description["param_groups"]}


def _save_checkpoint(
    path: Path, state: _TrainingState, *, epochs_completed: int, epochs: int
) -> None:
    """Write the checkpoint atomically: model and optimizer tensors, the rest JSON in the header.

    Args:
        path: the checkpoint file, replaced in one rename (never half-written).
        state: the model (``model.`` tensors), the optimizer (``optimizer.state.`` tensors and
            JSON), the scheduler, the grad scaler, the seed, hyperparameters and history (JSON).
        epochs_completed: epochs done (where a resumed run goes on).
        epochs: epochs of the whole run.
    """
    info = {
        "epochs_completed": epochs_completed,
        "epochs": epochs,
        "seed": state.seed,
        "hyperparameters": state.hyperparameters,
        "history": state.history,
    }
    tensors = {
        f"model.{key}": value.detach().to("cpu", copy=True).contiguous()
        for key, value in state.model.state_dict().items()
    }
    optimizer_tensors, optimizer_description = _optimizer_to_parts(state.optimizer)
    for key, value in optimizer_tensors.items():
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
    document = {
        **info,
        "format": _CHECKPOINT_FORMAT,
        "format_version": _CHECKPOINT_VERSION,
        "optimizer": optimizer_description,
        "scheduler": state.scheduler.state_dict(),
        "grad_scaler": state.scaler.state_dict(),
    }
    with atomic_path(path, suffix=".safetensors") as temporary:
        save_file(tensors, str(temporary), metadata={_METADATA_KEY: json.dumps(document)})


def read_checkpoint_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON part of a training checkpoint: epochs done, hyperparameters, history, schedule.

    Args:
        path: a checkpoint written by :func:`train_model`.

    Returns:
        The decoded document (keys include ``epochs_completed``, ``epochs``, ``seed``,
        ``hyperparameters``, ``history``).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a readable openqpm training checkpoint.
    """
    path = Path(path)
    what = "openqpm training checkpoint"
    document = read_json_header(path, _METADATA_KEY, what=what, error=CheckpointError)
    if document.get("format") != _CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format {document.get('format')!r} is not a checkpoint")
    if document.get("format_version") != _CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {document.get('format_version')!r}; this openqpm "
            f"reads {_CHECKPOINT_VERSION}"
        )
    return dict(document)


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A checkpoint's JSON document and all its tensors."""
    document = read_checkpoint_info(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return document, tensors


def _check_compatible(path: Path, document: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint written with other settings; name every difference.

    A setting added after a checkpoint was written counts as its default there (see
    ``_ADDED_HYPERPARAMETERS``), so such a checkpoint resumes when the setting is at its default.
    """
    stored = {**_ADDED_HYPERPARAMETERS, **document.get("hyperparameters", {})}
    differences = [
        f"{name}: checkpoint {stored.get(name)!r}, now {value!r}"
        for name, value in expected.items()
        if stored.get(name) != value
    ]
    if differences:
        raise CheckpointError(
            f"cannot resume from {path}: it was written with other settings ("
            + "; ".join(differences)
            + "). Delete it, or resume with the same settings."
        )


def _restore(
    checkpoint: Path, state: _TrainingState, *, epochs: int
) -> tuple[int, list[dict[str, Any]]]:
    """Load a checkpoint into ``state``: model, optimizer, scheduler and grad scaler.

    Args:
        checkpoint: a checkpoint written by :func:`train_model`.
        state: its model (strict: every key must fit), optimizer, scheduler and grad scaler
            receive their saved states; its hyperparameters must equal the checkpoint's.
        epochs: the run's total epochs; the checkpoint must not hold more.

    Returns:
        The epochs the checkpoint holds (where training goes on) and their history.

    Raises:
        CheckpointError: a corrupt checkpoint, one from other settings or another model, or one
            with more than ``epochs`` epochs.
    """
    document, tensors = _read_checkpoint(checkpoint)
    _check_compatible(checkpoint, document, state.hyperparameters)
    start_epoch = int(document["epochs_completed"])
    if start_epoch > epochs:
        raise CheckpointError(
            f"{checkpoint} already holds {start_epoch} epochs, more than epochs={epochs}"
        )
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        state.model.load_state_dict(model_state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{checkpoint} does not fit this model: {error}") from None
    state.optimizer.load_state_dict(
        _optimizer_from_parts(
            {k: v for k, v in tensors.items() if k.startswith("optimizer.")},
            document["optimizer"],
        )
    )
    state.scheduler.load_state_dict(document["scheduler"])
    if document.get("grad_scaler"):
        state.scaler.load_state_dict(document["grad_scaler"])
    _logger.info("resuming from %s after epoch %d of %d", checkpoint, start_epoch, epochs)
    return start_epoch, list(document.get("history", []))


# ----------------------------------------------------------------------------- training


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed every global generator from (seed, epoch, rank): dropout, augmentation, workers."""
    words = np.random.SeedSequence([seed, epoch, rank]).generate_state(4, dtype=np.uint32)
    torch.manual_seed((int(words[0]) << 32) | int(words[1]))  # also seeds every CUDA device
    # the legacy global generator, because that is the one user transforms reach for
    np.random.seed(int(words[2]))  # noqa: NPY002
    random.seed(int(words[3]))


def _parameter_groups(
    model: nn.Module, *, lr_backbone: float, lr_head: float
) -> list[dict[str, Any]]:
    """SGD parameter groups "backbone" and "head", each only when it has trainable parameters."""
    head = getattr(model, "head", None)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    head_params = [p for p in model.parameters() if p.requires_grad and id(p) in head_ids]
    backbone_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = []
    if backbone_params:
        groups.append({"params": backbone_params, "lr": lr_backbone, "name": "backbone"})
    if head_params:
        groups.append({"params": head_params, "lr": lr_head, "name": "head"})
    if not groups:
        raise ValueError("train_model: the model has no trainable parameter")
    return groups


def _group_lr(optimizer: torch.optim.Optimizer, name: str) -> float | None:
    """The current learning rate of the parameter group ``name`` (None without that group)."""
    for group in optimizer.param_groups:
        if group.get("name") == name:
            return float(group["lr"])
    return None


def _check_call(
    schedule: TrainingSchedule,
    checkpoint_path: str | os.PathLike[str] | None,
    resume: bool,
    eval_every_epochs: int,
    max_epochs_this_call: int | None,
) -> None:
    """Refuse :func:`train_model`'s bad arguments before anything runs.

    Raises:
        TypeError: ``schedule`` is not a :class:`TrainingSchedule`.
        ValueError: a value out of range, or ``resume`` without a checkpoint.
    """
    if not isinstance(schedule, TrainingSchedule):
        raise TypeError(
            f"train_model: schedule must be a TrainingSchedule, got {type(schedule).__name__}"
        )
    schedule.validate()
    if not eval_every_epochs >= 0:
        raise ValueError(f"train_model: eval_every_epochs={eval_every_epochs!r}, expected >= 0")
    if not (max_epochs_this_call is None or max_epochs_this_call >= 1):
        raise ValueError(
            f"train_model: max_epochs_this_call={max_epochs_this_call!r}, expected None or >= 1"
        )
    if resume and checkpoint_path is None:
        raise ValueError("train_model: resume=True needs a checkpoint_path")


def _check_sampler(loader: DataLoader) -> None:
    """Refuse under torch.distributed (warn otherwise) a loader whose order has no seed.

    Raises:
        ValueError: under torch.distributed, a sampler without ``set_epoch``.
    """
    if callable(getattr(loader.sampler, "set_epoch", None)):
        return
    if _distributed.is_distributed():
        raise ValueError(
            "train_model under torch.distributed needs a loader with a DistributedSampler: "
            "build it with openqpm.training.make_loader(..., train=True)"
        )
    _logger.warning(
        "the training loader's sampler has no set_epoch(): its order is not derived from the "
        "seed, so a resumed run will not repeat the same batches (use make_loader)"
    )


@dataclass
class _TrainingState:
    """What every epoch of one :func:`train_model` call uses; set up once, before the first."""

    model: QPMModel  # trained in place
    loss_module: nn.Module  # the model and its loss; in DistributedDataParallel under DDP
    optimizer: torch.optim.SGD  # groups "backbone" and "head" (those with trainable parameters)
    scheduler: torch.optim.lr_scheduler.StepLR  # stepped once per epoch
    scaler: torch.amp.GradScaler  # loss scaling; disabled unless AMP runs
    device: torch.device  # where the steps run
    use_amp: bool  # autocast + loss scaling: the schedule asks for AMP and training is on CUDA
    seed: int  # with the epoch and the rank, seeds every epoch
    checkpoint: Path | None  # rewritten after every epoch (rank 0); None for no checkpoint
    hyperparameters: dict[str, Any]  # recorded in the checkpoint; a resumed run must match them
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch


def _build_optimizer(
    model: nn.Module, schedule: TrainingSchedule, *, device: torch.device, use_amp: bool
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.StepLR, torch.amp.GradScaler]:
    """SGD over the backbone and head groups, its StepLR schedule and the AMP grad scaler.

    Raises:
        ValueError: the model has no trainable parameter.
    """
    optimizer = torch.optim.SGD(
        _parameter_groups(model, lr_backbone=schedule.lr_backbone, lr_head=schedule.lr_head),
        lr=schedule.lr_backbone,
        momentum=schedule.momentum,
        weight_decay=schedule.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=schedule.step_size_epochs, gamma=schedule.gamma
    )
    return optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=use_amp)


def _hyperparameters(
    model: nn.Module, schedule: TrainingSchedule, *, n_steps: int, use_amp: bool
) -> dict[str, Any]:
    """The settings a checkpoint records, which a resumed run must share (``epochs`` may grow)."""
    return {
        "lr_backbone": schedule.lr_backbone,
        "lr_head": schedule.lr_head,
        "momentum": schedule.momentum,
        "weight_decay": schedule.weight_decay,
        "step_size_epochs": schedule.step_size_epochs,
        "gamma": schedule.gamma,
        "diversity_beta": schedule.diversity_beta,
        "grounding_weight": schedule.grounding_weight,
        "grounding_epochs": schedule.grounding_epochs,
        "grounding_remaining_factor": schedule.grounding_remaining_factor,
        "seed": schedule.seed,
        "world_size": _distributed.world_size(),
        "n_steps_per_epoch": n_steps,
        "amp": use_amp,
        "is_qpm": bool(getattr(model, "is_qpm", False)),
    }


def _set_up(
    model: QPMModel,
    loader: DataLoader,
    schedule: TrainingSchedule,
    *,
    device: torch.device,
    checkpoint: Path | None,
) -> _TrainingState:
    """Move ``model`` to ``device`` and build the loss module, optimizer, scheduler and scaler.

    Raises:
        ValueError: the model has no trainable parameter, the loader yields no batch, or the
            schedule has a grounding weight and the model no QPM head.
    """
    loss_module = _LossModule(
        model,
        diversity_beta=schedule.diversity_beta,
        grounding_weight=schedule.grounding_weight,
        grounding_epochs=schedule.grounding_epochs,
        grounding_remaining_factor=schedule.grounding_remaining_factor,
    )
    use_amp = schedule.amp and device.type == "cuda"
    model.to(device)
    optimizer, scheduler, scaler = _build_optimizer(model, schedule, device=device, use_amp=use_amp)
    n_steps = len(loader)
    if n_steps == 0:
        raise ValueError("train_model: the training loader yields no batch")
    return _TrainingState(
        model=model,
        loss_module=loss_module,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        device=device,
        use_amp=use_amp,
        seed=schedule.seed,
        checkpoint=checkpoint,
        hyperparameters=_hyperparameters(model, schedule, n_steps=n_steps, use_amp=use_amp),
    )


def _start(state: _TrainingState, *, resume: bool, epochs: int) -> int:
    """The epochs already done: restored with the history from the checkpoint, or 0."""
    checkpoint = state.checkpoint
    if resume and checkpoint is not None and checkpoint.is_file():
        start_epoch, state.history = _restore(checkpoint, state, epochs=epochs)
        return start_epoch
    if resume:
        _logger.info("no checkpoint at %s: training from the start", checkpoint)
    elif checkpoint is not None and checkpoint.exists():
        _logger.warning("resume=False: the checkpoint %s will be overwritten", checkpoint)
    return 0


def _wrap_distributed(loss_module: nn.Module, device: torch.device) -> nn.Module:
    """``loss_module`` in DistributedDataParallel under torch.distributed, else as it is."""
    if not _distributed.is_distributed():
        return loss_module
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(loss_module, device_ids=device_ids)


@dataclass
class _ProgressClock:
    """Counts this call's steps and sends :class:`TrainingProgress` events with an ETA."""

    callback: Callable[[TrainingProgress], None] | None  # None: only count (and off rank 0)
    n_epochs: int  # epochs of the whole run
    end_epoch: int  # the epoch (0-based, exclusive) where this call stops
    n_steps: int  # steps per epoch
    start: float = field(default_factory=time.perf_counter)  # when this call's epochs began
    steps_done: int = 0  # steps done in this call

    def step_done(
        self,
        *,
        epoch: int,
        step: int,
        sums: np.ndarray,
        counts: np.ndarray,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """Count a step (``epoch`` 0-based, ``step`` 1-based) and report the epoch so far.

        ``sums`` holds the loss, cross-entropy, diversity and grounding terms summed over the
        epoch's images, ``counts`` is (correct, images) and the first parameter group's learning
        rate is reported.
        """
        self.steps_done += 1
        if self.callback is None:
            return
        elapsed_s = time.perf_counter() - self.start
        steps_left = (self.n_steps - step) + (self.end_epoch - epoch - 1) * self.n_steps
        self.callback(
            TrainingProgress(
                epoch=epoch + 1,
                n_epochs=self.n_epochs,
                step=step,
                n_steps=self.n_steps,
                loss=float(sums[0] / counts[1]),
                accuracy=float(counts[0] / counts[1]),
                lr=float(optimizer.param_groups[0]["lr"]),
                elapsed_s=elapsed_s,
                eta_s=elapsed_s / self.steps_done * steps_left,
                grounding_loss=float(sums[3] / counts[1]),
            )
        )


def _forward(
    state: _TrainingState, batch: Any
) -> tuple[torch.Tensor, tuple[float, float, float, float, int], int]:
    """The loss of one batch, its values on the host (loss, ce, diversity, grounding, correct),
    its size."""
    images, labels = unpack_batch(batch, name="the training loader")
    images = images.to(state.device, non_blocking=True)
    labels = labels.to(state.device, non_blocking=True).long()
    with torch.autocast(device_type=state.device.type, enabled=state.use_amp):
        loss, cross_entropy, regularisers, logits = state.loss_module(images, labels)
    # One host-device sync per step, for the NaN check and the running statistics together;
    # backward and the update then run without waiting for the host.
    values = _step_values(loss, cross_entropy, regularisers, logits, labels)
    return loss, values, int(labels.numel())


def _apply_step(state: _TrainingState, loss: torch.Tensor) -> None:
    """Backward and one optimizer update, through the grad scaler."""
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()


def _train_one_epoch(
    state: _TrainingState, loader: DataLoader, epoch: int, clock: _ProgressClock
) -> dict[str, Any]:
    """Train epoch ``epoch`` (0-based) over ``loader``, then step the learning-rate schedule.

    The epoch's randomness is seeded from ``(seed, epoch, rank)`` and the sampler set to the
    epoch first, so that a resumed run repeats the epoch exactly.

    Returns:
        The epoch's record without ``time_s`` and ``test_accuracy``: ``epoch`` (1-based), the
        mean ``loss``, ``cross_entropy``, ``diversity_loss``, ``grounding_loss`` and
        ``train_accuracy`` over all ranks, and the learning rates the epoch ran at.

    Raises:
        TrainingDivergedError: a non-finite loss (on any rank), before its step is applied.
    """
    _seed_epoch(state.seed, epoch, _distributed.rank())
    set_epoch = getattr(loader.sampler, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)
    _set_loss_epoch(state.loss_module, epoch)  # the grounding loss applies in early epochs only
    state.model.train()
    sums = np.zeros(4, dtype=np.float64)  # loss, ce, diversity, grounding: sums over images
    counts = np.zeros(2, dtype=np.int64)  # correct predictions, images
    for step, batch in enumerate(loader, start=1):
        loss, values, size = _forward(state, batch)
        loss_value, cross_entropy_value, diversity_value, grounding_value, n_correct = values
        if not math.isfinite(loss_value):
            raise _diverged(
                loss_value, epoch=epoch, step=step, n_steps=len(loader), checkpoint=state.checkpoint
            )
        _apply_step(state, loss)
        sums += (
            loss_value * size,
            cross_entropy_value * size,
            diversity_value * size,
            grounding_value * size,
        )
        counts += (n_correct, size)
        clock.step_done(epoch=epoch, step=step, sums=sums, counts=counts, optimizer=state.optimizer)
    lr_rates = {name: _group_lr(state.optimizer, name) for name in ("backbone", "head")}
    state.scheduler.step()
    totals = _distributed.all_reduce_arrays({"sums": sums, "counts": counts})
    n_images = max(int(totals["counts"][1]), 1)
    return {
        "epoch": epoch + 1,
        "loss": float(totals["sums"][0] / n_images),
        "cross_entropy": float(totals["sums"][1] / n_images),
        "diversity_loss": float(totals["sums"][2] / n_images),
        "grounding_loss": float(totals["sums"][3] / n_images),
        "train_accuracy": float(totals["counts"][0] / n_images),
        "lr_backbone": lr_rates["backbone"],
        "lr_head": lr_rates["head"],
    }


def _evaluate_if_due(
    state: _TrainingState, test_loader: DataLoader | None, *, epoch: int, epochs: int, every: int
) -> float | None:
    """Test accuracy after epoch ``epoch`` (0-based) every ``every`` epochs and after the last."""
    is_last = epoch + 1 == epochs
    if test_loader is None or not (is_last or (every > 0 and (epoch + 1) % every == 0)):
        return None
    accuracy = evaluate_accuracy(state.model, test_loader, device=state.device)
    state.model.train()
    return accuracy


def _log_epoch(record: dict[str, Any], *, epochs: int, grounding: bool = False) -> None:
    """One INFO line per finished epoch (with the grounding term when ``grounding``)."""
    test_accuracy = record["test_accuracy"]
    _logger.info(
        "epoch %d/%d: loss %.4f (ce %.4f, diversity %.4f%s), train accuracy %.2f%%%s, %.1f s",
        record["epoch"],
        epochs,
        record["loss"],
        record["cross_entropy"],
        record["diversity_loss"],
        f", grounding {record['grounding_loss']:.4f}" if grounding else "",
        100 * record["train_accuracy"],
        "" if test_accuracy is None else f", test accuracy {100 * test_accuracy:.2f}%",
        record["time_s"],
    )


def train_model(
    model: QPMModel,
    train_loader: DataLoader,
    schedule: TrainingSchedule,
    *,
    device: torch.device | str,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: Callable[[TrainingProgress], None] | None = None,
    test_loader: DataLoader | None = None,
    eval_every_epochs: int = 0,
    max_epochs_this_call: int | None = None,
) -> TrainingResult:
    """Train ``model`` in place with ``schedule``: dense training, or QPM fine-tuning.

    SGD over a backbone and a head group (a QPM head has no trainable parameter, so only the
    backbone moves), StepLR stepped once per epoch, loss = cross-entropy + the feature diversity
    loss (with a dense head's live weight, as the reference code) + for CHiQPM the weighted
    feature grounding loss in the schedule's first ``grounding_epochs`` epochs. A checkpoint
    after every epoch.

    Args:
        model: a :class:`openqpm.models.QPMModel` (dense or QPM head), moved to ``device``.
        train_loader: yields ``(images, labels)``; from :func:`make_loader` (``train=True``), its
            order derives from the seed and the epoch (exact resume; needed under DDP).
        schedule: epochs, learning rates, SGD and StepLR values, diversity beta, AMP, seed,
            grounding weight and epochs (a positive weight needs a QPM head).
        device: where to train.
        checkpoint_path: rewritten atomically after every epoch; None for no checkpoint.
        resume: go on from ``checkpoint_path`` when it exists (written with the same schedule;
            only ``epochs`` may be larger, to train longer).
        progress: called on rank 0 after every step; an exception it raises stops training.
        test_loader: evaluated every ``eval_every_epochs`` epochs and after the last epoch.
        eval_every_epochs: 0 = only after the last epoch.
        max_epochs_this_call: stop after this many epochs (call again with ``resume=True``).

    Returns:
        A :class:`TrainingResult`.

    Raises:
        TrainingDivergedError: the loss became NaN or infinite (the last good checkpoint stays).
        CheckpointError: ``resume`` with a checkpoint from other settings, or a corrupt one.
        ValueError: a bad argument, an empty loader, or one whose order cannot be reproduced
            under torch.distributed.
        TypeError: ``schedule`` is not a :class:`TrainingSchedule`.
    """
    _check_call(schedule, checkpoint_path, resume, eval_every_epochs, max_epochs_this_call)
    start_time, device = time.perf_counter(), torch.device(device)
    checkpoint = Path(checkpoint_path) if checkpoint_path is not None else None
    _check_sampler(train_loader)
    state = _set_up(model, train_loader, schedule, device=device, checkpoint=checkpoint)
    start_epoch = _start(state, resume=resume, epochs=schedule.epochs)
    state.loss_module = _wrap_distributed(state.loss_module, device)
    end_epoch = schedule.epochs
    if max_epochs_this_call is not None:
        end_epoch = min(end_epoch, start_epoch + int(max_epochs_this_call))
    callback = progress if is_main_process() else None
    clock = _ProgressClock(callback, schedule.epochs, end_epoch, n_steps=len(train_loader))
    for epoch in range(start_epoch, end_epoch):
        epoch_start = time.perf_counter()
        record = _train_one_epoch(state, train_loader, epoch, clock)
        test_accuracy = _evaluate_if_due(
            state, test_loader, epoch=epoch, epochs=schedule.epochs, every=eval_every_epochs
        )
        record.update(time_s=time.perf_counter() - epoch_start, test_accuracy=test_accuracy)
        state.history.append(record)
        _log_epoch(record, epochs=schedule.epochs, grounding=schedule.grounding_weight > 0)
        if checkpoint is not None and is_main_process():
            _save_checkpoint(checkpoint, state, epochs_completed=epoch + 1, epochs=schedule.epochs)
        _distributed.barrier()
    model.train()
    return TrainingResult(
        model=model,
        history=state.history,
        epochs_completed=len(state.history),
        start_epoch=start_epoch,
        checkpoint_path=checkpoint,
        elapsed_s=time.perf_counter() - start_time,
    )


def _diverged(
    loss_value: float, *, epoch: int, step: int, n_steps: int, checkpoint: Path | None
) -> TrainingDivergedError:
    """The error for a non-finite loss at ``step`` of epoch ``epoch`` (0-based)."""
    kept = checkpoint if checkpoint is not None and checkpoint.is_file() else None
    if kept is not None:
        # the checkpoint on disk is the one written after the previous epoch
        kept_text = f"the last good checkpoint {kept} (after epoch {epoch}) is kept"
    else:
        kept_text = "no checkpoint was written"
    return TrainingDivergedError(
        f"training diverged: the loss is {loss_value} at epoch {epoch + 1}, step {step}/{n_steps};"
        f" {kept_text}. Lower the learning rate or the diversity beta, or train without AMP.",
        epoch=epoch + 1,
        step=step,
        loss=loss_value,
        checkpoint_path=kept,
    )


def _step_values(
    loss: torch.Tensor,
    cross_entropy: torch.Tensor,
    regularisers: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[float, float, float, float, int]:
    """Loss, its three terms (cross-entropy, then ``regularisers``: diversity and grounding) and
    the number of correct predictions, fetched in one transfer.

    Under torch.distributed a NaN on any rank is made visible to every rank (a max over ranks
    of a non-finite flag), so that all stop together instead of waiting for each other forever.
    """
    n_correct = (logits.argmax(dim=1) == labels).sum()
    values = torch.cat(
        [
            loss.detach().float().reshape(1),
            cross_entropy.float().reshape(1),
            regularisers.float().reshape(2),
            n_correct.float().reshape(1),
        ]
    )  # (5,)
    if _distributed.is_distributed():
        non_finite = (~torch.isfinite(values[:1])).float().to(_distributed.communication_device())
        torch_distributed.all_reduce(non_finite, op=torch_distributed.ReduceOp.MAX)
        if non_finite.item() > 0:
            values[0] = float("nan")
    loss_value, cross_entropy_value, diversity_value, grounding_value, correct = values.tolist()
    return loss_value, cross_entropy_value, diversity_value, grounding_value, int(correct)
