"""Data sets and loaders.

Every data option is a function built by `hydra.utils.instantiate(cfg.data.dataset, ...)`; the run
supplies what only it knows (the input size the model needs, the model's normalization, the seed).
Small sets are turned into tensors once and batched by indexing, so an epoch does no per-item
Python work; file-backed sets go through a torch DataLoader with workers.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from tunelab.errors import ConfigError, require

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """A training and a validation set with the class names they share."""

    train: Dataset
    val: Dataset
    classes: list[str]
    test: Dataset | None = None


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: images (n, 8, 8) with values 0-16, and labels.

    Read from the CSV file inside the installed scikit-learn package, because importing
    scikit-learn itself takes over a second of every run's start-up.
    """
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / "datasets" / "data" / "digits.csv.gz" if locations else None
    if path is None or not path.is_file():  # another layout: let scikit-learn find it
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def cache_dir() -> Path:
    """Where tunelab keeps small derived files: $TUNELAB_CACHE, else $XDG_CACHE_HOME/tunelab, else ~/.cache/tunelab."""
    if os.environ.get("TUNELAB_CACHE"):
        return Path(os.environ["TUNELAB_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "tunelab"


def stratified_split(idx: np.ndarray, labels: np.ndarray, seed: int, *, test_size: float | None = None,
                     train_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's stratified `train_test_split` of `idx`, remembered in `cache_dir()`.

    The file is named by a hash of everything the split depends on (scikit-learn's version, the
    indices, the labels, the sizes, the seed), so a later run with the same inputs reads the split
    instead of importing scikit-learn. An unreadable or unwritable cache only costs that import.
    """
    from importlib.metadata import version

    key = repr((version("scikit-learn"), idx.tolist(), labels.tolist(), test_size, train_size, seed))
    path = cache_dir() / f"split-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
    try:
        with np.load(path) as saved:
            return saved["train"], saved["test"]
    except Exception:  # absent, or written by something else: compute it again
        pass
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(idx, test_size=test_size, train_size=train_size, random_state=seed, stratify=labels)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, train=train, test=test)
        os.replace(tmp, path)  # atomic: jobs of a parallel sweep may write the same split
    except OSError as err:
        log.debug("could not cache the data split in %s: %s", path.parent, err)
    return train, test


def digits(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    val_fraction: float = 0.2,
    classes: Sequence[int] | None = None,
    max_train_samples: int | None = None,
) -> Splits:
    """scikit-learn's bundled digits (1,797 real 8x8 grey images, 10 classes), no download.

    Split train/val stratified and deterministic for a seed, resized to `image_size` once,
    expanded to 3 channels and normalized with the model's statistics.
    `classes` keeps a subset of the digits (relabelled 0..k-1 in the given order);
    `max_train_samples` keeps a stratified subset of the training split.
    """
    require(0.0 < val_fraction < 1.0, f"data.dataset.val_fraction must be in (0, 1), got {val_fraction}")
    pixels, targets = digits_arrays()
    images = torch.tensor(pixels, dtype=torch.float32) / 16.0
    labels = torch.tensor(targets, dtype=torch.long)
    names = [str(c) for c in range(10)]
    if classes is not None:
        keep = [int(c) for c in classes]
        require(
            len(keep) > 1 and all(0 <= c <= 9 for c in keep) and len(set(keep)) == len(keep),
            f"data.dataset.classes must list at least two different digits 0-9, got {list(classes)}",
        )
        mask = torch.isin(labels, torch.tensor(keep))
        images, labels = images[mask], labels[mask]
        remap = torch.full((10,), -1, dtype=torch.long)
        remap[torch.tensor(keep)] = torch.arange(len(keep))
        labels = remap[labels]
        names = [str(c) for c in keep]
    idx = torch.arange(len(labels)).numpy()
    train_idx, val_idx = stratified_split(idx, labels.numpy(), seed, test_size=val_fraction)
    if max_train_samples is not None and max_train_samples < len(train_idx):
        require(max_train_samples >= len(names), f"data.dataset.max_train_samples must be at least the number of classes ({len(names)})")
        train_idx, _ = stratified_split(train_idx, labels.numpy()[train_idx], seed, train_size=max_train_samples)
    x = F.interpolate(images.unsqueeze(1), size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = _normalize(x.expand(-1, 3, -1, -1), mean, std).contiguous()
    train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
    return Splits(TensorDataset(x[train_idx], labels[train_idx]), TensorDataset(x[val_idx], labels[val_idx]), names)


def fake(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    train_size: int = 256,
    val_size: int = 64,
    num_classes: int = 10,
) -> Splits:
    """torchvision's FakeData (random images, random labels), materialized once as tensors."""
    from torchvision.datasets import FakeData
    from torchvision.transforms.functional import pil_to_tensor

    require(train_size > 0 and val_size > 0, "data.dataset.train_size and val_size must be positive")

    def materialize(size: int, offset: int) -> TensorDataset:
        ds = FakeData(size=size, image_size=(3, image_size, image_size), num_classes=num_classes, random_offset=offset)
        images, labels = zip(*(ds[i] for i in range(size)))
        x = torch.stack([pil_to_tensor(im) for im in images]).float() / 255.0
        return TensorDataset(_normalize(x, mean, std), torch.tensor(labels, dtype=torch.long))

    return Splits(materialize(train_size, seed), materialize(val_size, seed + train_size + 1), [str(c) for c in range(num_classes)])


def _folder_transforms(image_size: int, mean, std, augment: bool):
    from torchvision import transforms as T

    if augment:
        steps = [T.RandomResizedCrop(image_size, scale=(0.6, 1.0)), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(image_size), T.CenterCrop(image_size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def _check_image_root(root: str | None, key: str = "data.dataset.root") -> Path:
    require(root is not None, f"{key} is required: give the folder that holds train/ and val/, e.g. {key}=/data/photos")
    path = Path(os.path.expanduser(str(root)))
    require(path.is_dir(), f"{key}={root}: no such folder (it must hold train/ and val/ with one sub-folder per class)")
    for split in ("train", "val"):
        require((path / split).is_dir(), f"{key}={root}: missing {split}/ (expected {path / split} with one sub-folder per class)")
    return path


def _drop_unreadable(dataset, skip: bool) -> int:
    """Open every image once (header and integrity check); name the first bad file, or drop them all."""
    from PIL import Image

    good, bad = [], []
    for path, target in dataset.samples:
        try:
            with Image.open(path) as image:
                image.verify()
            good.append((path, target))
        except Exception as err:
            bad.append((path, err))
    if bad and not skip:
        path, err = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ConfigError(f"data.dataset.root: cannot read image {path}{more}: {err}. Remove it, or skip such files with data.dataset.skip_bad_files=true")
    if bad:
        log.warning("Skipped %d unreadable images (data.dataset.skip_bad_files=true), e.g. %s", len(bad), bad[0][0])
        dataset.samples = dataset.imgs = good
        dataset.targets = [t for _, t in good]
    return len(bad)


def image_folder(
    root: str | None,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    augment: bool = True,
    skip_bad_files: bool = False,
) -> Splits:
    """Your own photos: `root/train/<class>/*.jpg` and `root/val/<class>/*.jpg` (torchvision ImageFolder).

    Every file is checked once up front: an unreadable image is named in the error, or skipped and
    counted with `skip_bad_files=True`.
    """
    from torchvision.datasets import ImageFolder

    path = _check_image_root(root)
    try:
        train = ImageFolder(path / "train", transform=_folder_transforms(image_size, mean, std, augment))
        val = ImageFolder(path / "val", transform=_folder_transforms(image_size, mean, std, False))
    except FileNotFoundError as err:
        raise ConfigError(f"data.dataset.root={root}: {err}") from None
    skipped = _drop_unreadable(train, skip_bad_files) + _drop_unreadable(val, skip_bad_files)
    for split, ds in (("train", train), ("val", val)):
        empty = sorted(set(ds.classes) - {ds.classes[t] for t in ds.targets})
        require(not empty, f"data.dataset.root={root}: {split}/ has no readable images for the classes {', '.join(empty)}" + (f" ({skipped} skipped)" if skipped else ""))
    require(
        train.classes == val.classes,
        f"data.dataset.root={root}: train/ and val/ must hold the same class folders "
        f"(train: {train.classes}, val: {val.classes})",
    )
    return Splits(train, val, list(train.classes))


def cifar10(
    root: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    download: bool = False,
    augment: bool = True,
) -> Splits:
    """CIFAR-10 from torchvision (50,000 + 10,000 32x32 images); `download=true` fetches it."""
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(root, train=True, download=download, transform=_folder_transforms(image_size, mean, std, augment))
        val = CIFAR10(root, train=False, download=download, transform=_folder_transforms(image_size, mean, std, False))
    except RuntimeError:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise ConfigError(
            f"data.dataset.root={root}: no intact CIFAR-10 there. Put the extracted cifar-10-batches-py/ there, "
            "or set data.dataset.download=true on a machine with a network."
        ) from None
    return Splits(train, val, list(train.classes))


def _labels(dataset: Dataset) -> torch.Tensor:
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets)
    raise ConfigError(f"data.folds: cannot split {type(dataset).__name__} into folds (it exposes no labels)")


def _take(template: Dataset, splits: Splits, index: torch.Tensor) -> Dataset:
    """The images `index` of train + val pooled (in that order), with `template`'s transform."""
    train, val = splits.train, splits.val
    if isinstance(template, TensorDataset):
        return TensorDataset(*(torch.cat([a, b])[index] for a, b in zip(train.tensors, val.tensors)))
    subset = copy.copy(template)
    if hasattr(template, "samples"):  # ImageFolder
        samples = [*train.samples, *val.samples]
        subset.samples = subset.imgs = [samples[i] for i in index.tolist()]
        subset.targets = [t for _, t in subset.samples]
    elif hasattr(template, "data"):  # CIFAR-10: an array of images and a list of labels
        subset.data = np.concatenate([train.data, val.data])[index.numpy()]
        subset.targets = [int(t) for t in torch.cat([_labels(train), _labels(val)])[index]]
    else:
        raise ConfigError(f"data.folds: cannot split {type(template).__name__} into folds")
    return subset


def kfold(splits: Splits, folds: int, fold: int, seed: int) -> Splits:
    """Fold `fold` of a stratified `folds`-fold split of the train and val images pooled.

    The validation set is that fold, the training set the other folds; the same seed gives the same
    folds, and the K validation folds partition the pooled images. File-backed sets keep their
    transforms (the training folds augmented, the validation fold not).
    """
    from sklearn.model_selection import StratifiedKFold

    ok = isinstance(folds, int) and not isinstance(folds, bool) and folds >= 2
    require(ok, f"data.folds={folds!r} must be an integer >= 2 (or null for the data option's own split)")
    require(isinstance(fold, int) and 0 <= fold < folds, f"data.fold={fold!r} must be one of 0..{folds - 1} (data.folds={folds})")
    labels = torch.cat([_labels(splits.train), _labels(splits.val)])
    counts = torch.bincount(labels)
    smallest = int(counts[counts > 0].min())
    require(smallest >= folds, f"data.folds={folds}: a class has only {smallest} images; use at most {smallest} folds")
    parts = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32).split(labels.numpy(), labels.numpy())
    train_idx, val_idx = next(part for i, part in enumerate(parts) if i == fold)
    train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
    return Splits(_take(splits.train, splits, train_idx), _take(splits.val, splits, val_idx), splits.classes)


class EpochSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch), so a resumed run sees the same order.

    In a data-parallel run it is the distributed sampler: every process draws the same order and
    takes every `world_size`-th index from its `rank` on. With `pad=True` (training) the order is
    first padded with its own start so that all processes get the same number of batches (they step
    together); without (validation) every image is seen exactly once over all processes.
    """

    def __init__(self, size: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1, pad: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.skip = 0  # leading indices the next iteration leaves out (a run resumed mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            order = torch.arange(self.size)
        else:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=gen)
        if self.world_size == 1:
            return order
        if self.pad and self.size % self.world_size:
            extra = self.world_size - self.size % self.world_size
            order = torch.cat([order, order.repeat(extra // max(self.size, 1) + 1)[:extra]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(self.order().tolist()[skip:])

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.size
        if self.pad:
            return -(-self.size // self.world_size)
        return len(range(self.rank, self.size, self.world_size))


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
):
    """A loader with `sampler.set_epoch(epoch)` and `start_at(batch)`: TensorBatches for tensors, a
    DataLoader otherwise.

    `num_workers=None` picks min(4, cores - 1) for file-backed sets. In a data-parallel run each
    process gets its shard (`rank` of `world_size`): padded to equal length when shuffled
    (training), every image once when not (validation).
    """
    require(batch_size > 0, f"data.batch_size must be a positive integer, got {batch_size}")
    sampler = EpochSampler(len(dataset), seed, shuffle, rank, world_size, pad=shuffle)
    if isinstance(dataset, TensorDataset):
        return TensorBatches(dataset, batch_size, sampler, limit_batches, pin_memory)
    if num_workers is None:
        num_workers = max(0, min(4, (os.cpu_count() or 1) - 1))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # its own generator for the workers' base seed: each new iterator would otherwise draw it
        # from the global RNG, which a resumed run restores to the middle of the epoch
        generator=torch.Generator().manual_seed(seed),
    )
    return _LimitedLoader(loader, limit_batches)


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


def train_size(dataset_cfg) -> int | None:
    """Number of training images a data option will yield, without loading any image.

    Used where only the schedule's length matters (the LR preview); None when it cannot be known.
    """
    target = dataset_cfg.get("_target_", "")
    if target == "tunelab.data.digits":
        labels = digits_arrays()[1]
        classes = dataset_cfg.get("classes")
        n = int(sum(1 for y in labels if classes is None or int(y) in {int(c) for c in classes}))
        n_train = n - math.ceil(dataset_cfg.get("val_fraction", 0.2) * n)
        cap = dataset_cfg.get("max_train_samples")
        return n_train if cap is None else min(n_train, cap)
    if target == "tunelab.data.fake":
        return int(dataset_cfg.get("train_size", 256))
    if target == "tunelab.data.cifar10":
        return 50_000
    if target == "tunelab.data.image_folder" and dataset_cfg.get("root"):
        root = Path(os.path.expanduser(str(dataset_cfg.root))) / "train"
        if root.is_dir():
            return sum(1 for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    return None
