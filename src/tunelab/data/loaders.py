"""Loaders: batches in a resumable, seeded order, in memory or through a torch DataLoader.

Small sets held as tensors are batched by indexing, so an epoch does no per-item Python work;
file-backed sets go through a DataLoader with workers. Every loader has `sampler.set_epoch(epoch)`
and `start_at(batch)`, so a resumed run sees the very batches it would have seen.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, WeightedRandomSampler

from tunelab.data.cached import CachedImages, normalize
from tunelab.data.splits import labels_of
from tunelab.errors import require

log = logging.getLogger(__name__)

#: The ways a training loader may order its images (`data.sampler`): null is a shuffle of all.
SAMPLERS = (None, "balanced")


class EpochSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch), so a resumed run sees the same order.

    With `weights` (one per image) it draws `size` images with replacement in proportion to them
    instead, by torch's WeightedRandomSampler with that same generator (`data.sampler=balanced`).
    In a data-parallel run it is the distributed sampler: every process draws the same order and
    takes every `world_size`-th index from its `rank` on. With `pad=True` (training) the order is
    first padded with its own start so that all processes get the same number of batches (they step
    together); without (validation) every image is seen exactly once over all processes.
    """

    def __init__(self, size: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1, pad: bool = True,
                 weights: torch.Tensor | None = None):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0
        self.rank, self.world_size, self.pad, self.weights = rank, world_size, pad, weights
        self.skip = 0  # leading indices the next iteration leaves out (a run resumed mid-epoch)
        self.keyed = False  # yield (index, seed of its random draws) for CachedImages

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            order = torch.tensor(list(WeightedRandomSampler(self.weights, self.size, replacement=True, generator=gen)))
        elif self.shuffle:
            order = torch.randperm(self.size, generator=gen)
        else:
            order = torch.arange(self.size)
        if self.world_size == 1:
            return order
        if self.pad and self.size % self.world_size:
            extra = self.world_size - self.size % self.world_size
            order = torch.cat([order, order.repeat(extra // max(self.size, 1) + 1)[:extra]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator:
        skip, self.skip = self.skip, 0
        order = self.order().tolist()
        if not self.keyed:
            return iter(order[skip:])
        # each position of each epoch its own seed: the same draws however the epoch is resumed or read
        base = (self.seed, self.epoch, self.rank)
        return ((i, hash((*base, p)) & 0xFFFF_FFFF_FFFF) for p, i in enumerate(order) if p >= skip)

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.size
        if self.pad:
            return -(-self.size // self.world_size)
        return len(range(self.rank, self.size, self.world_size))


def balanced_weights(dataset: Dataset) -> torch.Tensor:
    """One weight per image, 1 / (images of its class): classes drawn about equally (`data.sampler=balanced`)."""
    labels = labels_of(dataset, "data.sampler")
    return 1.0 / torch.bincount(labels).double()[labels]


class TensorBatches:
    """Batches of an in-memory TensorDataset by indexing: no per-item work, no workers needed.

    Tensors on a GPU (see `to_device`) are indexed there, so a batch never crosses the bus; CPU
    tensors bound for a GPU (`pin_memory`) are gathered into page-locked memory, so the copy to the
    device can overlap the previous step.
    """

    def __init__(self, dataset: TensorDataset, batch_size: int, sampler: EpochSampler, limit: int | None = None,
                 pin_memory: bool = False):
        self.tensors, self.batch_size, self.sampler, self.limit = dataset.tensors, batch_size, sampler, limit
        self.pin_memory = pin_memory and self.tensors[0].device.type == "cpu" and torch.cuda.is_available()
        self._start = 0

    def __len__(self) -> int:
        n = -(-len(self.sampler) // self.batch_size)
        return n if self.limit is None else min(n, self.limit)

    def start_at(self, batch: int) -> None:
        """Begin the next iteration at batch `batch` of the epoch (a run resumed mid-epoch)."""
        self._start = batch

    def __iter__(self):
        start, self._start = self._start, 0
        order = self.sampler.order().to(self.tensors[0].device)
        for i in range(start, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            batch = tuple(t[idx] for t in self.tensors)
            yield tuple(t.pin_memory() for t in batch) if self.pin_memory else batch


#: Share of the GPU's free memory an in-memory data set may take when it is moved there whole.
DEVICE_DATA_SHARE = 0.25


def to_device(dataset: Dataset, device: torch.device, share: float = DEVICE_DATA_SHARE) -> Dataset:
    """An in-memory set moved whole onto a GPU when it takes at most `share` of the free memory
    there (batches are then indexed on the device, no copy per step); anything else as it is."""
    if isinstance(dataset, CachedImages) and device.type == "cuda":
        return dataset.on(device)
    if device.type != "cuda" or not isinstance(dataset, TensorDataset):
        return dataset
    size = sum(t.numel() * t.element_size() for t in dataset.tensors)
    free, _ = torch.cuda.mem_get_info(device)
    if size > share * free:
        log.info("In-memory data (%.0f MB) stays in host memory: more than %d%% of the GPU's free %.0f MB",
                 size / 2**20, share * 100, free / 2**20)
        return dataset
    return TensorDataset(*(t.to(device) for t in dataset.tensors))


class _LimitedLoader:
    """A DataLoader cut to its first `limit` batches."""

    def __init__(self, loader: DataLoader, limit: int | None):
        self.loader, self.limit, self.sampler = loader, limit, loader.sampler
        self._start = 0

    def __len__(self) -> int:
        return len(self.loader) if self.limit is None else min(len(self.loader), self.limit)

    def start_at(self, batch: int) -> None:
        """Begin the next iteration at batch `batch` of the epoch without reading the ones before
        it: a resumed run then neither loads them nor draws their random augmentations."""
        self._start = batch
        self.sampler.skip = batch * self.loader.batch_size

    def __iter__(self):
        stop, self._start = len(self) - self._start, 0
        for i, batch in enumerate(self.loader):
            if i >= stop:
                break
            yield batch


class _Normalized:
    """A loader of uint8 batches (CachedImages) giving them as float, scaled to [0, 1] and normalized,
    on the device the dataset names (the model's: a GPU then receives uint8), else on the CPU."""

    def __init__(self, loader: _LimitedLoader, dataset: CachedImages):
        self.loader, self.dataset = loader, dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __iter__(self):
        device = self.dataset.device
        for x, y in self.loader:
            x = x.to(device, non_blocking=True) if device is not None else x
            yield normalize(x, self.dataset.mean, self.dataset.std), y


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int | None = None,
    pin_memory: bool = False,
    limit_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    sampler: str | None = None,
):
    """A loader with `sampler.set_epoch(epoch)` and `start_at(batch)`: TensorBatches for tensors, a
    DataLoader otherwise.

    `num_workers=None` picks min(4, cores - 1) for file-backed sets. In a data-parallel run each
    process gets its shard (`rank` of `world_size`): padded to equal length when shuffled
    (training), every image once when not (validation). `sampler` (`data.sampler`, training only):
    None shuffles all images once per epoch; "balanced" draws len(dataset) images with replacement,
    each with weight 1 / (images of its class), so every class comes about equally often.
    """
    require(batch_size > 0, f"data.batch_size must be a positive integer, got {batch_size}")
    require(sampler in SAMPLERS, f"data.sampler={sampler!r} is not one of null (shuffle every image once per epoch) or balanced")
    if sampler is not None and not shuffle:
        raise ValueError(f"sampler={sampler!r} orders a training loader; a loader that is not shuffled reads every image once")
    weights = balanced_weights(dataset) if sampler == "balanced" else None
    order = EpochSampler(len(dataset), seed, shuffle, rank, world_size, pad=shuffle, weights=weights)
    if isinstance(dataset, TensorDataset):
        return TensorBatches(dataset, batch_size, order, limit_batches, pin_memory)
    if num_workers is None:
        num_workers = max(0, min(4, (os.cpu_count() or 1) - 1))
    cached = isinstance(dataset, CachedImages)
    order.keyed = cached
    loader = DataLoader(
        dataset.batched() if cached else dataset,
        batch_size=batch_size,
        sampler=order,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # its own generator for the workers' base seed: each new iterator would otherwise draw it
        # from the global RNG, which a resumed run restores to the middle of the epoch
        generator=torch.Generator().manual_seed(seed),
    )
    return _Normalized(_LimitedLoader(loader, limit_batches), dataset) if cached else _LimitedLoader(loader, limit_batches)
