"""Train, val and test splits: how they are drawn, remembered, rotated into folds and counted.

The test split is drawn first, from the whole set, with its own seed (`data.split_seed`), so it is
the same for every `seed` and every `data.fold`; the validation split is drawn from the rest with
the run's `seed`, and cross-validation rotates folds within train + val only.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from tunelab.errors import ConfigError, require

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """A training, a validation and a held-out test set with the class names they share.

    `test` is None only for a folder of images with train/ and val/ but no test/.
    """

    train: Dataset
    val: Dataset
    classes: list[str]
    test: Dataset | None = None


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


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Both fractions in (0, 1), leaving images to train on."""
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value < 1.0
        require(ok, f"data.dataset.{key} must be a fraction in (0, 1), got {value!r}")
    require(val_fraction + test_fraction < 1.0,
            f"data.dataset.val_fraction + test_fraction must be below 1 (got {val_fraction} + {test_fraction}): nothing would be left to train on")


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """Images in train, val and test when `n` are split by the two fractions (each of the whole)."""
    n_test, n_val = math.ceil(test_fraction * n), math.ceil(val_fraction * n)
    return n - n_val - n_test, n_val, n_test


def three_way_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                    split_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of train, val and test, stratified: test drawn first from all by `split_seed`, then
    val from the rest by `seed`; each fraction is of the whole set."""
    check_fractions(val_fraction, test_fraction)
    n_train, n_val, n_test = split_counts(len(labels), val_fraction, test_fraction)
    idx = np.arange(len(labels))
    try:
        rest, test = stratified_split(idx, labels, split_seed, test_size=n_test)
        train, val = stratified_split(rest, labels[rest], seed, test_size=n_val)
    except ValueError as err:  # scikit-learn: a class too small, or a split smaller than the classes
        raise ConfigError(
            f"data.dataset.val_fraction={val_fraction}, test_fraction={test_fraction}: cannot split {len(labels)} images of "
            f"{len(np.unique(labels))} classes stratified into {n_train} train / {n_val} val / {n_test} test ({err}). "
            "Every class needs at least 3 images, and val and test at least one image per class."
        ) from None
    return train, val, test


def labels_of(dataset: Dataset, key: str = "data.folds") -> torch.Tensor:
    """The class index of every item of `dataset` (on the CPU), without loading an image."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].cpu()
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets)
    raise ConfigError(f"{key}: {type(dataset).__name__} exposes no labels")


def select(template: Dataset, parts: Sequence[Dataset], index: torch.Tensor) -> Dataset:
    """The items `index` of `parts` pooled (in that order), with `template`'s transform.

    A shallow copy: the originals are not changed and file-backed sets decode nothing here.
    """
    if isinstance(template, TensorDataset):
        return TensorDataset(*(torch.cat(tensors)[index] for tensors in zip(*(p.tensors for p in parts))))
    subset = copy.copy(template)
    if hasattr(template, "samples"):  # ImageFolder
        samples = [s for p in parts for s in p.samples]
        subset.samples = subset.imgs = [samples[i] for i in index.tolist()]
        subset.targets = [t for _, t in subset.samples]
    elif hasattr(template, "data"):  # CIFAR-10: an array of images and a list of labels
        subset.data = np.concatenate([p.data for p in parts])[index.numpy()]
        subset.targets = [int(t) for t in torch.cat([labels_of(p) for p in parts])[index]]
    else:
        raise ConfigError(f"data.folds: cannot split {type(template).__name__} into folds")
    return subset


def kfold(splits: Splits, folds: int, fold: int, seed: int) -> Splits:
    """Fold `fold` of a stratified `folds`-fold split of the train and val images pooled.

    The validation set is that fold, the training set the other folds; the same seed gives the same
    folds, and the K validation folds partition the pooled images. The test split is passed on
    unchanged. File-backed sets keep their transforms (the training folds augmented, the validation
    fold not).
    """
    from sklearn.model_selection import StratifiedKFold

    ok = isinstance(folds, int) and not isinstance(folds, bool) and folds >= 2
    require(ok, f"data.folds={folds!r} must be an integer >= 2 (or null for the data option's own split)")
    require(isinstance(fold, int) and 0 <= fold < folds, f"data.fold={fold!r} must be one of 0..{folds - 1} (data.folds={folds})")
    labels = torch.cat([labels_of(splits.train), labels_of(splits.val)])
    counts = torch.bincount(labels)
    smallest = int(counts[counts > 0].min())
    require(smallest >= folds, f"data.folds={folds}: a class has only {smallest} images; use at most {smallest} folds")
    parts = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32).split(labels.numpy(), labels.numpy())
    train_idx, val_idx = next(part for i, part in enumerate(parts) if i == fold)
    pool = [splits.train, splits.val]
    rotated = Splits(select(splits.train, pool, torch.as_tensor(train_idx)), select(splits.val, pool, torch.as_tensor(val_idx)),
                     splits.classes, splits.test)
    log_class_counts(rotated, f"Class counts of fold {fold}")
    return rotated


def log_class_counts(splits: Splits, title: str = "Class counts") -> None:
    """One log line with the images per class of each split: "Class counts: train {...}; val {...}; test {...}"."""

    def counts(dataset: Dataset) -> dict[str, int]:
        per_class = torch.bincount(labels_of(dataset), minlength=len(splits.classes)).tolist()
        return dict(zip(splits.classes, per_class))

    parts = [("train", splits.train), ("val", splits.val), ("test", splits.test)]
    log.info("%s: %s", title, "; ".join(f"{name} {counts(ds) if ds is not None else 'none'}" for name, ds in parts))


def class_weights(dataset: Dataset, num_classes: int | None = None) -> torch.Tensor:
    """scikit-learn's `compute_class_weight("balanced", ...)` of the labels of `dataset`: n / (k * count
    of the class), for CrossEntropyLoss's `weight` (`loss.class_weights=balanced`)."""
    from sklearn.utils.class_weight import compute_class_weight

    labels = labels_of(dataset, "loss.class_weights").numpy()
    classes = np.arange(num_classes if num_classes is not None else int(labels.max()) + 1)
    missing = sorted(set(classes.tolist()) - set(labels.tolist()))
    require(not missing, f"loss.class_weights=balanced: the training split has no images of the classes {missing}")
    return torch.tensor(compute_class_weight("balanced", classes=classes, y=labels), dtype=torch.float32)
