"""Small helpers around ``torch.distributed``: who am I, how many are we, and array reductions.

Everything here works unchanged in a single process (no process group initialised): the rank is
0, the world size is 1, and the reductions return their input. Under ``torchrun`` the process group
is created by the caller (``torch.distributed.init_process_group``); openqpm never creates or
destroys it.

The collectives move numpy arrays through torch tensors on the device the backend needs (CUDA for
NCCL, the CPU for gloo), so the features pass and the metrics can reduce their accumulators
without caring about the backend.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.distributed as torch_distributed
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "ShardSampler",
    "all_gather_arrays",
    "all_gather_rows",
    "all_reduce_arrays",
    "barrier",
    "communication_device",
    "is_distributed",
    "rank",
    "shard_loader",
    "world_size",
]

_logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised in this process.

    Returns:
        True under ``torchrun`` (or any initialised process group), False otherwise.
    """
    return torch_distributed.is_available() and torch_distributed.is_initialized()


def rank() -> int:
    """This process's rank in the default process group; 0 when not distributed."""
    return torch_distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes in the default process group; 1 when not distributed."""
    return torch_distributed.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for every rank; does nothing when not distributed."""
    if is_distributed():
        torch_distributed.barrier()


def communication_device() -> torch.device:
    """The device the collectives of the default process group need their tensors on.

    NCCL only moves CUDA tensors (on this process's current CUDA device); gloo and the rest
    move CPU tensors.

    Returns:
        ``cuda:<current device>`` for NCCL, otherwise ``cpu``.
    """
    if is_distributed() and torch_distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# numpy dtypes that every backend can reduce; others are widened first and narrowed after.
_WIDENED_DTYPES: dict[np.dtype, np.dtype] = {
    np.dtype(np.bool_): np.dtype(np.int64),
    np.dtype(np.int8): np.dtype(np.int64),
    np.dtype(np.int16): np.dtype(np.int64),
    np.dtype(np.uint8): np.dtype(np.int64),
    np.dtype(np.uint16): np.dtype(np.int64),
    np.dtype(np.uint32): np.dtype(np.int64),
    np.dtype(np.float16): np.dtype(np.float64),
}


def _to_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    wide = np.ascontiguousarray(array, dtype=_WIDENED_DTYPES.get(array.dtype, array.dtype))
    return torch.from_numpy(wide.copy()).to(device)


def _check_numeric(arrays: Mapping[str, np.ndarray], caller: str) -> None:
    for name, array in arrays.items():
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
            raise TypeError(
                f"{caller}: {name!r} must be a numeric numpy array, "
                f"got {type(array).__name__} {getattr(array, 'dtype', '')}"
            )


def all_reduce_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sum every array element-wise across ranks.

    Every rank must pass the same keys with the same shapes (the collective is issued once per
    key, in sorted key order, so that all ranks call the collectives in the same order).

    Args:
        arrays: the local arrays, by name.

    Returns:
        A new dict with the element-wise sums over all ranks, each with its input's dtype
        (booleans are summed as integers and then cast back, i.e. a logical or). In a single
        process: copies of the inputs.

    Raises:
        TypeError: an entry is not a numeric numpy array.
    """
    _check_numeric(arrays, "all_reduce_arrays")
    if not is_distributed():
        return {name: array.copy() for name, array in arrays.items()}
    device = communication_device()
    reduced: dict[str, np.ndarray] = {}
    for name in sorted(arrays):
        array = arrays[name]
        tensor = _to_tensor(array, device)
        torch_distributed.all_reduce(tensor, op=torch_distributed.ReduceOp.SUM)
        reduced[name] = tensor.cpu().numpy().astype(array.dtype, copy=False).reshape(array.shape)
    return {name: reduced[name] for name in arrays}


def all_gather_arrays(arrays: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Collect every rank's arrays (same keys and shapes on every rank), in rank order.

    Use it for accumulators whose arrays are not all plain sums (a map size, say), to merge
    them with their own ``merge`` method; for plain sums :func:`all_reduce_arrays` is cheaper.

    Args:
        arrays: the local arrays, by name.

    Returns:
        One dict per rank, each with the input's keys and dtypes (in a single process: a copy of
        the input).

    Raises:
        TypeError: an entry is not a numeric numpy array.
    """
    _check_numeric(arrays, "all_gather_arrays")
    if not is_distributed():
        return [{name: array.copy() for name, array in arrays.items()}]
    device = communication_device()
    per_rank: list[dict[str, np.ndarray]] = [{} for _ in range(world_size())]
    for name in sorted(arrays):
        array = arrays[name]
        tensor = _to_tensor(array, device)
        gathered = [torch.empty_like(tensor) for _ in range(world_size())]
        torch_distributed.all_gather(gathered, tensor)
        for rank_index, part in enumerate(gathered):
            per_rank[rank_index][name] = part.cpu().numpy().astype(array.dtype).reshape(array.shape)
    return [{name: part[name] for name in arrays} for part in per_rank]


def all_gather_rows(rows: np.ndarray) -> list[np.ndarray]:
    """Collect every rank's 2-D (or 1-D) array; ranks may hold different numbers of rows.

    Args:
        rows: this rank's array, shape (n_rows, ...) with the same trailing shape and dtype on
            every rank.

    Returns:
        One array per rank, in rank order (in a single process: ``[rows]``).
    """
    if not is_distributed():
        return [rows]
    device = communication_device()
    n_ranks = world_size()
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(n_ranks)]
    torch_distributed.all_gather(counts, count)
    n_rows_per_rank = [int(c.item()) for c in counts]
    max_rows = max(n_rows_per_rank)
    # all_gather needs equal shapes: pad every rank's rows to the longest, cut after.
    local = _to_tensor(rows, device)
    padded = torch.zeros((max_rows, *rows.shape[1:]), dtype=local.dtype, device=device)
    padded[: rows.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(n_ranks)]
    torch_distributed.all_gather(gathered, padded)
    return [
        tensor[:n].cpu().numpy().astype(rows.dtype, copy=False)
        for tensor, n in zip(gathered, n_rows_per_rank)
    ]


class ShardSampler(Sampler[int]):
    """Dataset order, split across ranks without padding: rank r reads items r, r + W, r + 2W, ...

    Unlike ``DistributedSampler``, no item is repeated to even out the shards, so statistics
    summed over ranks count every item exactly once; ranks may get one item fewer than others.
    The features pass and the evaluation use it; training uses ``DistributedSampler``, whose equal
    shards keep DDP's gradient all-reduce in step.

    Args:
        dataset: anything with ``len``.
        num_replicas: the world size; default: the current one.
        rank: this process's rank; default: the current one.

    Example:
        >>> list(ShardSampler(range(5), num_replicas=2, rank=1))
        [1, 3]
    """

    def __init__(
        self,
        dataset: Dataset | range | list,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.n_items = len(dataset)  # type: ignore[arg-type]
        self.num_replicas = world_size() if num_replicas is None else int(num_replicas)
        if rank is None:  # the argument shadows the module's rank()
            rank = torch_distributed.get_rank() if is_distributed() else 0
        self.rank = int(rank)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(
                f"ShardSampler: rank {self.rank} is not in [0, num_replicas={self.num_replicas})"
            )

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n_items, self.num_replicas))

    def __len__(self) -> int:
        return max(0, math.ceil((self.n_items - self.rank) / self.num_replicas))


def shard_loader(loader: DataLoader) -> DataLoader:
    """The loader itself, or under torch.distributed a copy that reads only this rank's shard.

    A loader that already uses a :class:`ShardSampler` is returned as it is; any other loader is
    rebuilt over the same data set (same batch size, workers, collate function) with one, so that
    passes whose results are summed over ranks see every item exactly once.

    Args:
        loader: an evaluation loader (its own order and sampler are replaced).

    Returns:
        A loader over this rank's shard, in data set order.
    """
    if not is_distributed() or isinstance(loader.sampler, ShardSampler):
        return loader
    _logger.info(
        "rebuilding a loader with a ShardSampler so that each rank reads a disjoint part of the "
        "data set (build it with openqpm.training.make_loader to avoid this)"
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=ShardSampler(loader.dataset),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=False,
    )
