"""The small data options, held as tensors: scikit-learn's digits and torchvision's FakeData.

Each is made once, already resized and normalized for the model, so an epoch does no per-item
Python work; the three splits are index sets of the one whole.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from tunelab.data.splits import Splits, log_class_counts, stratified_split, three_way_split
from tunelab.errors import require


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def _tensor_splits(x: torch.Tensor, labels: torch.Tensor, names: list[str], *index) -> Splits:
    """Splits of the whole (`x`, `labels`) by the index sets of train, val and test; their class counts logged."""
    train, val, test = (torch.as_tensor(i) for i in index)
    splits = Splits(TensorDataset(x[train], labels[train]), TensorDataset(x[val], labels[val]), names,
                    TensorDataset(x[test], labels[test]))
    log_class_counts(splits)
    return splits


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


def _keep_digits(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]):
    """Only the digits `classes`, relabelled 0..k-1 in that order."""
    keep = [int(c) for c in classes]
    require(
        len(keep) > 1 and all(0 <= c <= 9 for c in keep) and len(set(keep)) == len(keep),
        f"data.dataset.classes must list at least two different digits 0-9, got {list(classes)}",
    )
    mask = torch.isin(labels, torch.tensor(keep))
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[torch.tensor(keep)] = torch.arange(len(keep))
    return images[mask], remap[labels[mask]], [str(c) for c in keep]


def digits(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    classes: Sequence[int] | None = None,
    max_train_samples: int | None = None,
) -> Splits:
    """scikit-learn's bundled digits (1,797 real 8x8 grey images, 10 classes), no download.

    Split stratified into train, val and test (fractions of the whole): the test split first, by
    `split_seed`, the same for every `seed`; then val from the rest by `seed`. Resized to
    `image_size` once, expanded to 3 channels and normalized with the model's statistics.
    `classes` keeps a subset of the digits (relabelled 0..k-1 in the given order) before any split;
    `max_train_samples` keeps a stratified subset of the training split.
    """
    pixels, targets = digits_arrays()
    images = torch.tensor(pixels, dtype=torch.float32) / 16.0
    labels = torch.tensor(targets, dtype=torch.long)
    names = [str(c) for c in range(10)]
    if classes is not None:
        images, labels, names = _keep_digits(images, labels, classes)
    train_idx, val_idx, test_idx = three_way_split(labels.numpy(), val_fraction, test_fraction, seed, split_seed)
    if max_train_samples is not None and max_train_samples < len(train_idx):
        require(max_train_samples >= len(names), f"data.dataset.max_train_samples must be at least the number of classes ({len(names)})")
        train_idx, _ = stratified_split(train_idx, labels.numpy()[train_idx], seed, train_size=max_train_samples)
    x = F.interpolate(images.unsqueeze(1), size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = _normalize(x.expand(-1, 3, -1, -1), mean, std).contiguous()
    return _tensor_splits(x, labels, names, train_idx, val_idx, test_idx)


def fake(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    train_size: int = 256,
    val_size: int = 64,
    test_size: int = 64,
    num_classes: int = 10,
    split_seed: int = 0,
) -> Splits:
    """torchvision's FakeData (random images, random labels), materialized once as tensors.

    One set of `train_size + val_size + test_size` images, the same for every seed: the test images
    are drawn from it by `split_seed`, then val and train from the rest by `seed`. The labels are
    random, so the splits are plain random draws (a stratified one would forbid a split smaller than
    the number of classes).
    """
    from torchvision.datasets import FakeData
    from torchvision.transforms.functional import pil_to_tensor

    for key, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
        require(isinstance(value, int) and value > 0, f"data.dataset.{key} must be a positive integer, got {value!r}")
    size = train_size + val_size + test_size
    ds = FakeData(size=size, image_size=(3, image_size, image_size), num_classes=num_classes)
    images, labels = zip(*(ds[i] for i in range(size)))
    x = _normalize(torch.stack([pil_to_tensor(im) for im in images]).float() / 255.0, mean, std)
    whole = torch.randperm(size, generator=torch.Generator().manual_seed(split_seed))
    test, rest = whole[:test_size], whole[test_size:]
    rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))]
    return _tensor_splits(x, torch.tensor(labels, dtype=torch.long), [str(c) for c in range(num_classes)],
                          rest[val_size:], rest[:val_size], test)
