"""Training past one process: torchrun's environment, rank-0-only work, and the global-batch sampler.

`compress run --nproc-per-node N` (or `torchrun ... -m compressor.cli run`) starts N copies of the same
run. Each calls `init_from_env()`, which joins the process group torchrun describes in the environment
(gloo on CPU, nccl on GPU). Without torchrun every helper here is the single-process identity.

The recipe's `data.batch_size` is the *global* batch: `GlobalBatchSampler` draws the same shuffled
batches whatever the number of processes and gives rank r the r-th slice of each. One step therefore
sees the same samples with 1 or N processes, gradients averaged by DistributedDataParallel equal the
single-process gradient (up to float summation order and per-rank BatchNorm statistics), and a run
checkpointed with N processes resumes with M on exactly the batches it would have seen.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from compressor.errors import CompressorError

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: str = "cpu") -> bool:
    """Join torchrun's process group (idempotent). Returns True when running distributed."""
    if not launched_by_torchrun() or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return is_distributed()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def main_first(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result (or its one-line error) to every rank.

    For work that must happen once (creating directories, writing files): the other ranks wait, and a
    CompressorError on rank 0 is raised on every rank instead of leaving them stuck at a barrier.
    """
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except BaseException as exc:
            code = exc.exit_code if isinstance(exc, CompressorError) else 1
            box[0] = ("error", (str(exc) or type(exc).__name__, code))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        message, code = value
        error = CompressorError(message)
        error.exit_code = code
        raise error
    return value


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a list of numbers over all ranks (float64, so counts stay exact)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def weighted_mean(metrics: dict[str, float], count: int) -> dict[str, float]:
    """Per-rank averages over `count` samples → the average over every rank's samples."""
    if not is_distributed():
        return dict(metrics)
    keys = sorted(metrics)
    sums = all_sum([metrics[k] * count for k in keys] + [float(count)])
    total = max(sums[-1], 1.0)
    return {k: sums[i] / total for i, k in enumerate(keys)}


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, the same for any number of processes; this rank's slice of each.

    Epoch e shuffles with a generator seeded from (seed, e), cuts the permutation into global batches of
    `batch_size` and yields `tensor_split(batch, world)[rank]`. A last batch with fewer samples than
    processes is dropped (every rank must take part in every step).
    """

    def __init__(
        self, num_items: int, batch_size: int, *, shuffle: bool, seed: int = 0,
        rank: int = 0, world: int = 1, drop_last: bool = False,
    ):  # fmt: skip
        if batch_size < world:
            raise CompressorError(
                f"data.batch_size {batch_size} is smaller than the {world} processes; "
                f"use a batch size of at least {world} (it is the global batch)"
            )
        self.num_items, self.batch_size, self.shuffle, self.seed = num_items, batch_size, shuffle, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[torch.Tensor]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.arange(self.num_items)
        batches = list(order.split(self.batch_size))
        if batches and (
            len(batches[-1]) < self.world or (self.drop_last and len(batches[-1]) < self.batch_size)
        ):
            batches.pop()
        return batches

    def global_size(self, step: int) -> int:
        """Samples in global batch `step` over all ranks (the last batch may be short)."""
        full, rest = divmod(self.num_items, self.batch_size)
        return self.batch_size if step < full or not rest else rest

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield torch.tensor_split(batch, self.world)[self.rank].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.num_items, self.batch_size)
        keep_rest = rest >= self.world and not (self.drop_last and rest)
        return full + (1 if rest and keep_rest else 0)


class IndexedBatches:
    """Wraps a loader so every batch is `(inputs, target, indices)`: the teacher cache and PS-KD need them."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.batch_sampler = loader.batch_sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Any, Any, torch.Tensor]]:
        for index, (inputs, target) in self.loader:
            yield inputs, target, index


class WithIndex(Dataset):
    """Items as `(index, item)`: the teacher cache and per-sample bookkeeping need each sample's index."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


def indexed_collate(collate: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
    def collate_fn(items: list[tuple[int, Any]]) -> tuple[torch.Tensor, Any]:
        return torch.tensor([i for i, _ in items]), collate([item for _, item in items])

    return collate_fn


def training_loader(loader: DataLoader, seed: int, *, indexed: bool = False):
    """The loader the training loop iterates: global batches sharded over the ranks, optionally indexed.

    Plain shuffled or sequential loaders over a map-style dataset are rebuilt with `GlobalBatchSampler`
    (also in one process, so 1 and N processes see the same batches). A loader with its own sampler is
    kept as it is in one process; it cannot be sharded and is an error under DDP.
    """
    sampler = getattr(loader, "sampler", None)
    dataset = getattr(loader, "dataset", None)
    standard = (
        isinstance(sampler, RandomSampler | SequentialSampler)
        and isinstance(getattr(loader, "batch_sampler", None), BatchSampler)
        and hasattr(dataset, "__len__")
    )
    if not standard:
        if is_distributed():
            raise CompressorError(
                f"the training data loader uses a {type(sampler).__name__}, which cannot be sharded across "
                "processes; return a DataLoader with shuffle=True/False (no custom sampler) from data.source"
            )
        if not indexed:
            return loader
        rebuilt = DataLoader(
            WithIndex(dataset),
            batch_sampler=loader.batch_sampler,
            collate_fn=indexed_collate(loader.collate_fn),
            num_workers=loader.num_workers,
        )
        return IndexedBatches(rebuilt)
    batch_sampler = GlobalBatchSampler(
        len(dataset), loader.batch_size or 1, shuffle=isinstance(sampler, RandomSampler), seed=seed,
        rank=rank(), world=world_size(), drop_last=loader.drop_last,
    )  # fmt: skip
    base = WithIndex(dataset) if indexed else dataset
    collate = indexed_collate(loader.collate_fn) if indexed else loader.collate_fn
    rebuilt = DataLoader(
        base, batch_sampler=batch_sampler, collate_fn=collate, num_workers=loader.num_workers
    )
    return IndexedBatches(rebuilt) if indexed else rebuilt


def shard_loader(loader: DataLoader) -> tuple[DataLoader, int]:
    """This rank's contiguous share of an evaluation loader (no shuffling, no padding) and its size.

    In one process the loader is returned as it is (any iterable of batches) with size 0 (unused then).
    """
    if not is_distributed():
        return loader, 0
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise CompressorError(
            "the validation data cannot be split across processes: return a DataLoader over a map-style dataset"
        )
    n = len(dataset)
    share = torch.tensor_split(torch.arange(n), world_size())[rank()].tolist()
    subset = torch.utils.data.Subset(dataset, share)
    return DataLoader(subset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn), len(
        share
    )


__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "launched_by_torchrun",
    "init_from_env",
    "barrier",
    "main_first",
    "all_sum",
    "all_sum_",
    "weighted_mean",
    "GlobalBatchSampler",
    "IndexedBatches",
    "training_loader",
    "shard_loader",
]
