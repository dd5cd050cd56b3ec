"""The file-backed data options: your own images (torchvision ImageFolder) and CIFAR-10.

A split is a list of files (or, for CIFAR-10, rows of its array) with the transform of its use:
augmented for training, plain otherwise. With `data.cache=off` the loader's workers decode and
transform every image each epoch; otherwise `data.cached` reads them from pixels decoded once.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tunelab.choices import AUGMENT
from tunelab.data.splits import Splits, log_class_counts, select, stratified_split, three_way_split
from tunelab.errors import ConfigError, require

log = logging.getLogger(__name__)

SPLIT_FOLDERS = ("train", "val", "test")


def augment_steps(image_size: int, augment: bool | str) -> list:
    """The random steps of a training image (torchvision.transforms.v2, for PIL images and uint8
    tensors alike): random resized crop and flip, then RandAugment or TrivialAugmentWide when
    `augment` names one; none when `augment` is false."""
    from torchvision.transforms import v2

    require(augment in AUGMENT, f"data.augment={augment} must be true, false, randaugment or trivialaugment")
    if not augment:
        return []
    policy = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide}.get(augment)
    return [v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip(), *([policy()] if policy else [])]


def folder_transforms(image_size: int, mean, std, augment: bool | str, resize_to: int | None = None):
    """One image's transform: when augmenting, `augment_steps`, else the shorter side resized to
    `resize_to` (default `image_size`) and the centre `image_size` square cropped; then the tensor,
    scaled to [0, 1] and normalized (the same conversion as served images)."""
    from torchvision import transforms as T

    steps = augment_steps(image_size, augment) or [T.Resize(resize_to or image_size), T.CenterCrop(image_size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def with_transform(dataset, transform):
    """A shallow copy of `dataset` that applies `transform` (the same files, nothing decoded)."""
    other = copy.copy(dataset)
    other.transform = transform
    return other


def _check_image_root(root: str | None, key: str = "data.dataset.root") -> Path:
    layouts = "train/ and val/ (and test/) with one sub-folder per class, or one sub-folder per class"
    require(root is not None, f"{key} is required: give the folder of your images, e.g. {key}=/data/photos. It holds {layouts}")
    path = Path(os.path.expanduser(str(root)))
    require(path.is_dir(), f"{key}={root}: no such folder (it must hold {layouts})")
    if any((path / split).is_dir() for split in SPLIT_FOLDERS):
        for split in ("train", "val"):
            require((path / split).is_dir(), f"{key}={root}: missing {split}/ (expected {path / split} with one sub-folder per class)")
    return path


def drop_unreadable(dataset, skip: bool, key: str = "data.dataset.root", lines: dict[str, int] | None = None) -> int:
    """Open every image once (header and integrity check); name the first bad file, or drop them all.

    The error starts with `key`, and with the file's line in a CSV when `lines` maps files to lines.
    """
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
        at = f", line {lines[path]}" if lines else ""
        raise ConfigError(f"{key}{at}: cannot read image {path}{more}: {err}. Remove it, or skip such files with data.dataset.skip_bad_files=true")
    if bad:
        log.warning("Skipped %d unreadable images (data.dataset.skip_bad_files=true), e.g. %s", len(bad), bad[0][0])
        dataset.samples = dataset.imgs = good
        dataset.targets = [t for _, t in good]
    return len(bad)


def _image_folder(path: Path, root, transform, skip_bad_files: bool, where: str):
    """torchvision's ImageFolder of `path`, its unreadable files named or dropped, every class non-empty."""
    from torchvision.datasets import ImageFolder

    try:
        dataset = ImageFolder(path, transform=transform)
    except FileNotFoundError as err:
        raise ConfigError(f"data.dataset.root={root}: {err}") from None
    skipped = drop_unreadable(dataset, skip_bad_files)
    empty = sorted(set(dataset.classes) - {dataset.classes[t] for t in dataset.targets})
    require(not empty, f"data.dataset.root={root}: {where} has no readable images for the classes {', '.join(empty)}"
            + (f" ({skipped} skipped)" if skipped else ""))
    return dataset


def _split_folders(path: Path, root, train_tf, plain_tf, skip_bad_files: bool) -> Splits:
    """root/train/, root/val/ and, when present, root/test/, each with one sub-folder per class."""
    sets = {split: _image_folder(path / split, root, train_tf if split == "train" else plain_tf, skip_bad_files, f"{split}/")
            for split in SPLIT_FOLDERS if (path / split).is_dir()}
    names = {split: ds.classes for split, ds in sets.items()}
    require(all(c == names["train"] for c in names.values()),
            f"data.dataset.root={root}: {', '.join(f'{s}/' for s in names)} must hold the same class folders ({names})")
    if "test" not in sets:
        log.warning("data.dataset.root=%s has train/ and val/ but no test/: there is no held-out test split. Add one as "
                    "%s/<class>/, or give a root of class folders only and tunelab splits it (data.dataset.test_fraction)",
                    root, path / "test")
    return Splits(sets["train"], sets["val"], list(sets["train"].classes), sets.get("test"))


def split_whole(whole, plain, val_fraction: float, test_fraction: float, seed: int, split_seed: int) -> Splits:
    """A file-backed set split stratified into train, val and test (`three_way_split`: the test files
    drawn first by `split_seed`); `plain` is `whole` with the transform of val and test."""
    train_idx, val_idx, test_idx = (torch.as_tensor(i) for i in three_way_split(
        np.asarray(whole.targets), val_fraction, test_fraction, seed, split_seed))
    return Splits(select(whole, [whole], train_idx), select(plain, [whole], val_idx), list(whole.classes),
                  select(plain, [whole], test_idx))


def image_folder(
    root: str | None,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    augment: bool | str = True,
    skip_bad_files: bool = False,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> Splits:
    """Your own photos (torchvision ImageFolder), in one of two layouts.

    - `root/train/<class>/*.jpg`, `root/val/<class>/*.jpg` and, optionally, `root/test/<class>/*.jpg`:
      the splits you made (without test/ there is no test split, and the log says so);
    - `root/<class>/*.jpg`: split stratified into train, val and test by `val_fraction` and
      `test_fraction` (of the whole), the test files drawn first by `split_seed`, the same for
      every `seed`; the split is cached like the digits split.

    Every file is checked once up front: an unreadable image is named in the error, or skipped and
    counted with `skip_bad_files=True`. Only training images are augmented.
    """
    path = _check_image_root(root)
    train_tf = folder_transforms(image_size, mean, std, augment)
    plain_tf = folder_transforms(image_size, mean, std, False)
    if (path / "train").is_dir():
        splits = _split_folders(path, root, train_tf, plain_tf, skip_bad_files)
    else:
        whole = _image_folder(path, root, train_tf, skip_bad_files, "the folder")
        splits = split_whole(whole, with_transform(whole, plain_tf), val_fraction, test_fraction, seed, split_seed)
    log_class_counts(splits)
    return splits


def cifar10(
    root: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    download: bool = False,
    augment: bool | str = True,
    val_fraction: float = 0.1,
) -> Splits:
    """CIFAR-10 from torchvision (50,000 + 10,000 32x32 images); `download=true` fetches it.

    The official 10,000 test images are the test split; val is a stratified `val_fraction` of the
    50,000 training images, drawn by `seed`.
    """
    from torchvision.datasets import CIFAR10

    ok = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool) and 0.0 < val_fraction < 1.0
    require(ok, f"data.dataset.val_fraction must be a fraction in (0, 1), got {val_fraction!r}")
    plain_tf = folder_transforms(image_size, mean, std, False)
    try:
        whole = CIFAR10(root, train=True, download=download, transform=folder_transforms(image_size, mean, std, augment))
        test = CIFAR10(root, train=False, download=download, transform=plain_tf)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise ConfigError(
            f"data.dataset.root={root}: no intact CIFAR-10 there. Put the extracted cifar-10-batches-py/ there, "
            "or set data.dataset.download=true on a machine with a network."
        ) from None
    labels = np.asarray(whole.targets)
    train_idx, val_idx = stratified_split(np.arange(len(labels)), labels, seed, test_size=val_fraction)
    splits = Splits(select(whole, [whole], torch.as_tensor(train_idx)),
                    select(with_transform(whole, plain_tf), [whole], torch.as_tensor(val_idx)), list(whole.classes), test)
    log_class_counts(splits)
    return splits
