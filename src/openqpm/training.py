"""Dense training and QPM fine-tuning: one loop, checkpoints at every epoch, exact resume, AMP, DDP.

The loop follows the reference recipe (paper App. C, reference code): SGD with momentum and weight
decay, one learning rate for the backbone and one for the head, a StepLR schedule stepped once per
epoch, and the loss cross-entropy + feature diversity loss. The same function fine-tunes a QPM:
its head has no trainable parameter (the binary assignment, the mean and the std are frozen), so
only the backbone moves.

Exact resume: at the end of every epoch a checkpoint is written atomically (one safetensors file:
model, optimizer and grad-scaler tensors, with the epoch, the schedule, the hyperparameters and the
history as JSON in its header; no pickle). The randomness of an epoch (data order, dropout,
augmentation, worker seeds) is derived from ``(seed, epoch, rank)`` when the epoch starts, so an
interrupted run resumed from its checkpoint ends with the same weights as an uninterrupted one on
the CPU, whatever happened to the process's random state in between.

Multi-GPU: when ``torch.distributed`` is initialised (``torchrun``) the model is wrapped in
``DistributedDataParallel``, each rank reads its shard (``make_loader`` builds the right sampler),
only rank 0 writes checkpoints and reports progress.

Example:
    >>> loader = make_loader(train_set, batch_size=16, train=True, seed=0)
    >>> result = train_model(model, loader, epochs=150, lr_backbone=5e-3, lr_head=1e-2,
    ...                      momentum=0.9, weight_decay=5e-4, step_size_epochs=30, gamma=0.4,
    ...                      diversity_beta=0.196, device="cuda", checkpoint_path="dense.ckpt")
    >>> evaluate_accuracy(model, test_loader, device="cuda")
    0.866
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as torch_distributed
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from openqpm import distributed as _distributed
from openqpm.losses import feature_diversity_loss

if TYPE_CHECKING:  # pragma: no cover - annotations only; models import torchvision
    from openqpm.models.model import QPMModel

__all__ = [
    "CheckpointError",
    "TrainingDivergedError",
    "TrainingProgress",
    "TrainingResult",
    "evaluate_accuracy",
    "make_loader",
    "read_checkpoint_info",
    "train_model",
]

_logger = logging.getLogger(__name__)

_CHECKPOINT_FORMAT = "openqpm.training_checkpoint"
_CHECKPOINT_VERSION = 1
_METADATA_KEY = "openqpm_checkpoint"


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
        loss: mean training loss over this epoch so far (cross-entropy + diversity).
        accuracy: training accuracy over this epoch so far, a fraction (dropout active).
        lr: the backbone's current learning rate (the head's when the backbone is frozen).
        elapsed_s: seconds since this call started.
        eta_s: estimated seconds until the run's last epoch ends.
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


@dataclass
class TrainingResult:
    """What :func:`train_model` did.

    Attributes:
        model: the trained model (the object passed in, trained in place), in train mode.
        history: one dict per finished epoch (including epochs restored from a checkpoint):
            ``epoch`` (1-based), ``loss``, ``cross_entropy``, ``diversity_loss``,
            ``train_accuracy`` (fraction), ``lr_backbone``, ``lr_head``, ``time_s``,
            ``test_accuracy`` (fraction, or None when not evaluated).
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

    @property
    def final_loss(self) -> float | None:
        """The mean training loss of the last finished epoch (None before any)."""
        return float(self.history[-1]["loss"]) if self.history else None


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
        num_workers: worker processes (not persistent: every epoch's workers are seeded anew).
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


def _unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], torch.as_tensor(batch[1])
    raise ValueError(f"the loader must yield (images, labels) batches, got {type(batch).__name__}")


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
        ValueError: the loader yielded no image.
    """
    device = torch.device(device)
    loader = _distributed.shard_loader(loader)
    was_training = model.training
    model.to(device)
    model.eval()
    counts = np.zeros(2, dtype=np.int64)  # correct, total
    try:
        for batch in loader:
            images, labels = _unpack_batch(batch)
            logits = model(images.to(device, non_blocking=True))  # (B, n_c)
            predictions = logits.argmax(dim=1).cpu()
            counts[0] += int((predictions == labels.cpu()).sum())
            counts[1] += int(labels.numel())
    finally:
        model.train(was_training)
    correct, total = _distributed.all_reduce_arrays({"counts": counts})["counts"]
    if total == 0:
        raise ValueError("evaluate_accuracy: the loader yielded no image")
    return float(correct) / float(total)


# ----------------------------------------------------------------------------- the loss


class _LossModule(nn.Module):
    """Forward pass and loss in one module, so that DistributedDataParallel sees the whole step."""

    def __init__(self, model: QPMModel, *, diversity_beta: float) -> None:
        super().__init__()
        self.model = model
        self.diversity_beta = diversity_beta

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        feature_maps = self.model.forward_features(images)  # (B, n_f, h, w)
        logits = self.model.forward_head(feature_maps)  # (B, n_c)
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
        return loss, cross_entropy.detach(), diversity.detach(), logits.detach()


# ----------------------------------------------------------------------------- checkpoints


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temp_path, metadata=metadata)
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


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
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, _, param_index, name = key.split(".", 3)
        state.setdefault(int(param_index), {})[name] = value
    for param_index, values in description["state"].items():
        state.setdefault(int(param_index), {}).update(values)
    return {"state": state, "param_groups": description["param_groups"]}


def _write_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    info: dict[str, Any],
) -> None:
    tensors = {
        f"model.{key}": value.detach().to("cpu", copy=True).contiguous()
        for key, value in model.state_dict().items()
    }
    optimizer_tensors, optimizer_description = _optimizer_to_parts(optimizer)
    for key, value in optimizer_tensors.items():
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
    document = {
        **info,
        "format": _CHECKPOINT_FORMAT,
        "format_version": _CHECKPOINT_VERSION,
        "optimizer": optimizer_description,
        "scheduler": scheduler.state_dict(),
        "grad_scaler": scaler.state_dict(),
    }
    _atomic_save(path, tensors, {_METADATA_KEY: json.dumps(document)})


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
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a safetensors file: {error}") from None
    if _METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} is not an openqpm training checkpoint (no {_METADATA_KEY})")
    try:
        document = json.loads(metadata[_METADATA_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: the checkpoint's JSON header is corrupt: {error}") from None
    if document.get("format") != _CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format {document.get('format')!r} is not a checkpoint")
    if document.get("format_version") != _CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {document.get('format_version')!r}; this openqpm "
            f"reads {_CHECKPOINT_VERSION}"
        )
    return dict(document)


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    document = read_checkpoint_info(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return document, tensors


def _check_compatible(path: Path, document: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint written with other settings; name every difference."""
    stored = document.get("hyperparameters", {})
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
    for group in optimizer.param_groups:
        if group.get("name") == name:
            return float(group["lr"])
    return None


def _check_arguments(
    *,
    epochs: int,
    lr_backbone: float,
    lr_head: float,
    momentum: float,
    weight_decay: float,
    step_size_epochs: int,
    gamma: float,
    diversity_beta: float,
    seed: int,
    eval_every_epochs: int,
    max_epochs_this_call: int | None,
) -> None:
    checks = [
        (isinstance(epochs, int) and epochs >= 0, "epochs", epochs, "an integer >= 0"),
        (lr_backbone >= 0, "lr_backbone", lr_backbone, ">= 0"),
        (lr_head >= 0, "lr_head", lr_head, ">= 0"),
        (0 <= momentum < 1, "momentum", momentum, "in [0, 1)"),
        (weight_decay >= 0, "weight_decay", weight_decay, ">= 0"),
        (step_size_epochs >= 1, "step_size_epochs", step_size_epochs, ">= 1"),
        (gamma > 0, "gamma", gamma, "> 0"),
        (math.isfinite(diversity_beta), "diversity_beta", diversity_beta, "finite"),
        (isinstance(seed, int) and seed >= 0, "seed", seed, "an integer >= 0"),
        (eval_every_epochs >= 0, "eval_every_epochs", eval_every_epochs, ">= 0"),
        (
            max_epochs_this_call is None or max_epochs_this_call >= 1,
            "max_epochs_this_call",
            max_epochs_this_call,
            "None or >= 1",
        ),
    ]
    for ok, name, value, expected in checks:
        if not ok:
            raise ValueError(f"train_model: {name}={value!r}, expected {expected}")


def train_model(
    model: QPMModel,
    train_loader: DataLoader,
    *,
    epochs: int,
    lr_backbone: float,
    lr_head: float,
    momentum: float,
    weight_decay: float,
    step_size_epochs: int,
    gamma: float,
    diversity_beta: float,
    device: torch.device | str,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    amp: bool = True,
    progress: Callable[[TrainingProgress], None] | None = None,
    seed: int = 0,
    test_loader: DataLoader | None = None,
    eval_every_epochs: int = 0,
    max_epochs_this_call: int | None = None,
) -> TrainingResult:
    """Train ``model`` in place: dense training, or QPM fine-tuning with the assignment fixed.

    SGD (momentum, weight decay) over two parameter groups, the backbone at ``lr_backbone`` and
    the head at ``lr_head`` (a QPM head has no trainable parameter, so only the backbone group
    exists), StepLR stepped once per epoch. Loss: cross-entropy + the feature diversity loss on
    the maps the head reads, with the head's class weights (for a dense head the live weight, so
    the loss's gradient reaches it, as the reference code does).

    Args:
        model: a :class:`openqpm.models.QPMModel` (dense or QPM head).
        train_loader: yields ``(images, labels)`` with training transforms; build it with
            :func:`make_loader` (``train=True``) so that the data order is a function of the seed
            and the epoch (required for exact resume and under torch.distributed).
        epochs: total epochs of the run (including those a resumed checkpoint already did).
        lr_backbone: learning rate of every backbone parameter.
        lr_head: learning rate of the head's parameters (unused by a QPM head).
        momentum: SGD momentum.
        weight_decay: SGD weight decay (all parameters, as the reference code).
        step_size_epochs: StepLR step, in epochs.
        gamma: StepLR factor.
        diversity_beta: weight of the feature diversity loss; 0 trains with cross-entropy only.
        device: where to train; the model is moved there.
        checkpoint_path: the checkpoint file, rewritten atomically after every epoch; None for no
            checkpoints.
        resume: continue from ``checkpoint_path`` when it exists (it must have been written with
            the same settings; ``epochs`` may be larger, to train longer).
        amp: mixed precision (autocast + GradScaler); used on CUDA only.
        progress: called on rank 0 after every step with a :class:`TrainingProgress`. An exception
            it raises stops training (the checkpoint of the last finished epoch is kept).
        seed: derives the randomness of every epoch (with the epoch and the rank).
        test_loader: evaluated every ``eval_every_epochs`` epochs and after the last epoch.
        eval_every_epochs: 0 = never evaluate during training.
        max_epochs_this_call: stop after this many epochs in this call (for time-sliced jobs;
            call again with ``resume=True`` to go on).

    Returns:
        A :class:`TrainingResult`.

    Raises:
        TrainingDivergedError: the loss became NaN or infinite (the last good checkpoint stays).
        CheckpointError: ``resume`` with a checkpoint from other settings, or a corrupt one.
        ValueError: a bad argument, or a loader whose order cannot be reproduced under
            torch.distributed.
    """
    _check_arguments(
        epochs=epochs,
        lr_backbone=lr_backbone,
        lr_head=lr_head,
        momentum=momentum,
        weight_decay=weight_decay,
        step_size_epochs=step_size_epochs,
        gamma=gamma,
        diversity_beta=diversity_beta,
        seed=seed,
        eval_every_epochs=eval_every_epochs,
        max_epochs_this_call=max_epochs_this_call,
    )
    start_time = time.perf_counter()
    device = torch.device(device)
    checkpoint = Path(checkpoint_path) if checkpoint_path is not None else None
    if resume and checkpoint is None:
        raise ValueError("train_model: resume=True needs a checkpoint_path")
    rank, n_ranks = _distributed.rank(), _distributed.world_size()
    sampler = train_loader.sampler
    if not callable(getattr(sampler, "set_epoch", None)):
        if _distributed.is_distributed():
            raise ValueError(
                "train_model under torch.distributed needs a loader with a DistributedSampler: "
                "build it with openqpm.training.make_loader(..., train=True)"
            )
        _logger.warning(
            "the training loader's sampler has no set_epoch(): its order is not derived from the "
            "seed, so a resumed run will not repeat the same batches (use make_loader)"
        )
    use_amp = amp and device.type == "cuda"
    model.to(device)

    optimizer = torch.optim.SGD(
        _parameter_groups(model, lr_backbone=lr_backbone, lr_head=lr_head),
        lr=lr_backbone,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size_epochs, gamma=gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    n_steps = len(train_loader)
    if n_steps == 0:
        raise ValueError("train_model: the training loader yields no batch")
    hyperparameters = {
        "lr_backbone": lr_backbone,
        "lr_head": lr_head,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "step_size_epochs": step_size_epochs,
        "gamma": gamma,
        "diversity_beta": diversity_beta,
        "seed": seed,
        "world_size": n_ranks,
        "n_steps_per_epoch": n_steps,
        "amp": use_amp,
        "is_qpm": bool(getattr(model, "is_qpm", False)),
    }

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume and checkpoint is not None and checkpoint.is_file():
        document, tensors = _read_checkpoint(checkpoint)
        _check_compatible(checkpoint, document, hyperparameters)
        start_epoch = int(document["epochs_completed"])
        if start_epoch > epochs:
            raise CheckpointError(
                f"{checkpoint} already holds {start_epoch} epochs, more than epochs={epochs}"
            )
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            model.load_state_dict(model_state, strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"{checkpoint} does not fit this model: {error}") from None
        optimizer.load_state_dict(
            _optimizer_from_parts(
                {k: v for k, v in tensors.items() if k.startswith("optimizer.")},
                document["optimizer"],
            )
        )
        scheduler.load_state_dict(document["scheduler"])
        if document.get("grad_scaler"):
            scaler.load_state_dict(document["grad_scaler"])
        history = list(document.get("history", []))
        _logger.info("resuming from %s after epoch %d of %d", checkpoint, start_epoch, epochs)
    elif resume:
        _logger.info("no checkpoint at %s: training from the start", checkpoint)
    elif checkpoint is not None and checkpoint.exists():
        _logger.warning("resume=False: the checkpoint %s will be overwritten", checkpoint)

    loss_module: nn.Module = _LossModule(model, diversity_beta=diversity_beta)
    if _distributed.is_distributed():
        loss_module = DistributedDataParallel(
            loss_module,
            device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else None,
        )

    end_epoch = (
        epochs
        if max_epochs_this_call is None
        else min(epochs, start_epoch + int(max_epochs_this_call))
    )
    call_start = time.perf_counter()
    steps_done_this_call = 0
    for epoch in range(start_epoch, end_epoch):
        epoch_start = time.perf_counter()
        _seed_epoch(seed, epoch, rank)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        model.train()
        # loss, cross-entropy, diversity (sums over batches), correct, images
        sums = np.zeros(3, dtype=np.float64)
        counts = np.zeros(2, dtype=np.int64)
        for step, batch in enumerate(train_loader, start=1):
            images, labels = _unpack_batch(batch)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True).long()
            with torch.autocast(device_type=device.type, enabled=use_amp):
                loss, cross_entropy, diversity, logits = loss_module(images, labels)
            # One host-device sync per step, for the NaN check and the running statistics
            # together; backward and the update then run without waiting for the host.
            loss_value, cross_entropy_value, diversity_value, n_correct = _step_values(
                loss, cross_entropy, diversity, logits, labels
            )
            if not math.isfinite(loss_value):
                raise _diverged(
                    loss_value, epoch=epoch, step=step, n_steps=n_steps, checkpoint=checkpoint
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            batch_size = int(labels.numel())
            sums += (
                loss_value * batch_size,
                cross_entropy_value * batch_size,
                diversity_value * batch_size,
            )
            counts += (n_correct, batch_size)
            steps_done_this_call += 1
            if progress is not None and rank == 0:
                elapsed_s = time.perf_counter() - call_start
                steps_left = (n_steps - step) + (end_epoch - epoch - 1) * n_steps
                progress(
                    TrainingProgress(
                        epoch=epoch + 1,
                        n_epochs=epochs,
                        step=step,
                        n_steps=n_steps,
                        loss=sums[0] / counts[1],
                        accuracy=counts[0] / counts[1],
                        lr=float(optimizer.param_groups[0]["lr"]),
                        elapsed_s=elapsed_s,
                        eta_s=elapsed_s / steps_done_this_call * steps_left,
                    )
                )
        lr_backbone_now = _group_lr(optimizer, "backbone")
        lr_head_now = _group_lr(optimizer, "head")
        scheduler.step()
        totals = _distributed.all_reduce_arrays({"sums": sums, "counts": counts})
        n_images = max(int(totals["counts"][1]), 1)
        test_accuracy = None
        is_last = epoch + 1 == epochs
        if test_loader is not None and (
            is_last or (eval_every_epochs > 0 and (epoch + 1) % eval_every_epochs == 0)
        ):
            test_accuracy = evaluate_accuracy(model, test_loader, device=device)
            model.train()
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": float(totals["sums"][0] / n_images),
            "cross_entropy": float(totals["sums"][1] / n_images),
            "diversity_loss": float(totals["sums"][2] / n_images),
            "train_accuracy": float(totals["counts"][0] / n_images),
            "lr_backbone": lr_backbone_now,
            "lr_head": lr_head_now,
            "time_s": time.perf_counter() - epoch_start,
            "test_accuracy": test_accuracy,
        }
        history.append(record)
        _logger.info(
            "epoch %d/%d: loss %.4f (ce %.4f, diversity %.4f), train accuracy %.2f%%%s, %.1f s",
            epoch + 1,
            epochs,
            record["loss"],
            record["cross_entropy"],
            record["diversity_loss"],
            100 * record["train_accuracy"],
            "" if test_accuracy is None else f", test accuracy {100 * test_accuracy:.2f}%",
            record["time_s"],
        )
        if checkpoint is not None and rank == 0:
            _write_checkpoint(
                checkpoint,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                info={
                    "epochs_completed": epoch + 1,
                    "epochs": epochs,
                    "seed": seed,
                    "hyperparameters": hyperparameters,
                    "history": history,
                },
            )
        _distributed.barrier()
    model.train()
    return TrainingResult(
        model=model,
        history=history,
        epochs_completed=len(history),
        start_epoch=start_epoch,
        checkpoint_path=checkpoint,
        elapsed_s=time.perf_counter() - start_time,
    )


def _diverged(
    loss_value: float, *, epoch: int, step: int, n_steps: int, checkpoint: Path | None
) -> TrainingDivergedError:
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
    diversity: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[float, float, float, int]:
    """Loss, its two terms and the number of correct predictions, fetched in one transfer.

    Under torch.distributed a NaN on any rank is made visible to every rank (a max over ranks
    of a non-finite flag), so that all stop together instead of waiting for each other forever.
    """
    n_correct = (logits.argmax(dim=1) == labels).sum()
    values = torch.stack(
        [loss.detach().float(), cross_entropy.float(), diversity.float(), n_correct.float()]
    )  # (4,)
    if _distributed.is_distributed():
        non_finite = (~torch.isfinite(values[:1])).float().to(_distributed.communication_device())
        torch_distributed.all_reduce(non_finite, op=torch_distributed.ReduceOp.MAX)
        if non_finite.item() > 0:
            values[0] = float("nan")
    loss_value, cross_entropy_value, diversity_value, correct = values.tolist()
    return loss_value, cross_entropy_value, diversity_value, int(correct)
