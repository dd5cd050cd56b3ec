"""How many training images a data option yields, told from its config without loading an image."""

from __future__ import annotations

import math
import os
from pathlib import Path

from tunelab.data.csv_files import csv_rows
from tunelab.data.splits import split_counts
from tunelab.data.tensors import digits_arrays

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


def _images_under(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)


def train_size(dataset_cfg) -> int | None:
    """Number of training images a data option will yield, without loading any image.

    Used where only the schedule's length matters (the LR preview); None when it cannot be known.
    """
    target = dataset_cfg.get("_target_", "")
    fractions = dataset_cfg.get("val_fraction", 0.2), dataset_cfg.get("test_fraction", 0.2)
    if target == "tunelab.data.digits":
        labels = digits_arrays()[1]
        classes = dataset_cfg.get("classes")
        n = int(sum(1 for y in labels if classes is None or int(y) in {int(c) for c in classes}))
        n_train = split_counts(n, *fractions)[0]
        cap = dataset_cfg.get("max_train_samples")
        return n_train if cap is None else min(n_train, cap)
    if target == "tunelab.data.fake":
        return int(dataset_cfg.get("train_size", 256))
    if target == "tunelab.data.cifar10":
        return 50_000 - math.ceil(dataset_cfg.get("val_fraction", 0.1) * 50_000)
    if target == "tunelab.data.image_folder" and dataset_cfg.get("root"):
        root = Path(os.path.expanduser(str(dataset_cfg.root)))
        if (root / "train").is_dir():
            return _images_under(root / "train")
        if root.is_dir():
            return split_counts(_images_under(root), *fractions)[0]
    if target == "tunelab.data.csv_images" and dataset_cfg.get("path"):
        rows = csv_rows(dataset_cfg.path)
        if rows[0].split is not None:
            return sum(1 for row in rows if row.split == "train")
        return split_counts(len(rows), *fractions)[0]
    return None
