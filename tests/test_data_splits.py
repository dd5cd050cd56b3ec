"""Every data option has a held-out test split: disjoint, stratified, fixed by `data.split_seed`
alone; folders of images in either layout; the balanced sampler and the balanced class weights."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from conftest import compose_config
from tunelab import data
from tunelab.errors import ConfigError, build

PLAIN = dict(image_size=8, mean=[0.0] * 3, std=[1.0] * 3)  # digits at their own size, unnormalized: x = pixels / 16


@pytest.fixture(autouse=True, scope="module")
def split_cache(tmp_path_factory):
    """The cached splits go to a folder of this module's own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELAB_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _images(dataset: TensorDataset) -> Counter:
    """The images of a split as a multiset of their pixel bytes (digits has a few duplicate images)."""
    return Counter(x[0].numpy().tobytes() for x in dataset.tensors[0])


def test_the_digits_test_split_is_disjoint_stratified_and_the_same_for_every_seed():
    pixels, labels = data.digits_arrays()
    whole = Counter((torch.tensor(p, dtype=torch.float32) / 16.0).numpy().tobytes() for p in pixels)
    tests = []
    for seed in (0, 1, 2):
        splits = data.digits(**PLAIN, seed=seed)
        assert _images(splits.train) + _images(splits.val) + _images(splits.test) == whole  # a partition of all images
        assert len(splits.test) == 360 and len(splits.val) == 360 and len(splits.train) == 1797 - 720
        share = np.bincount(labels, minlength=10) / len(labels)
        within = torch.bincount(splits.test.tensors[1], minlength=10).numpy()
        assert np.all(np.abs(within - share * len(splits.test)) <= 1)  # each class's share, to one image
        tests.append(splits)
    assert all(torch.equal(s.test.tensors[0], tests[0].test.tensors[0]) for s in tests)
    assert not torch.equal(tests[1].val.tensors[0], tests[0].val.tensors[0])  # the seed draws val, not test
    other = data.digits(**PLAIN, seed=0, split_seed=1)
    assert _images(other.test) != _images(tests[0].test)


def test_folds_rotate_within_train_and_val_and_keep_the_test_split():
    splits = data.digits(**PLAIN, seed=0)
    pool = _images(splits.train) + _images(splits.val)
    for fold in range(5):
        rotated = data.kfold(splits, 5, fold, seed=0)
        assert torch.equal(rotated.test.tensors[0], splits.test.tensors[0])
        assert _images(rotated.train) + _images(rotated.val) == pool


def test_split_seed_is_a_data_key_that_the_dataset_follows():
    def test_images(*overrides):
        cfg = compose_config(["data.image_size=8", *overrides])
        return _images(build(cfg.data.dataset, "data", **PLAIN, seed=cfg.seed).test)

    assert test_images("seed=1") == test_images("seed=2")
    assert test_images("data.split_seed=1") != test_images()


@pytest.mark.parametrize("override, key", [
    ("data.dataset.test_fraction=0", "data.dataset.test_fraction"), ("data.dataset.test_fraction=1.0", "data.dataset.test_fraction"),
    ("data.dataset.val_fraction=-0.1", "data.dataset.val_fraction"), ("data.dataset.test_fraction=0.85", "val_fraction + test_fraction"),
])
def test_bad_fractions_are_config_errors_naming_the_key(override, key):
    cfg = compose_config([override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("+", r"\+")):
        build(cfg.data.dataset, "data", **PLAIN, seed=0)


def test_the_class_counts_of_every_split_are_logged(caplog):
    with caplog.at_level(logging.INFO, logger="tunelab"):
        data.digits(**PLAIN, seed=0, classes=[3, 5])
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Class counts"))
    assert "train {'3': " in line and "; val {'3': " in line and "; test {'3': " in line


def test_fake_data_has_a_test_split_fixed_by_split_seed():
    args = dict(image_size=8, mean=[0.5] * 3, std=[0.5] * 3, train_size=20, val_size=6, test_size=5)
    first, second = data.fake(**args, seed=0), data.fake(**args, seed=1)
    assert torch.equal(first.test.tensors[0], second.test.tensors[0]) and len(first.test) == 5
    assert not torch.equal(first.val.tensors[0], second.val.tensors[0])
    seen = [tuple(x.flatten()[:16].tolist()) for s in (first.train, first.val, first.test) for x in s.tensors[0]]
    assert len(set(seen)) == 31  # random images: every one distinct, each in one split
    assert not torch.equal(data.fake(**args, seed=0, split_seed=1).test.tensors[0], first.test.tensors[0])


def _photos(folder, classes=("cat", "dog", "owl"), per_class=10):
    from PIL import Image

    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (12, 12), (20 * i, 80 * c, 7)).save(folder / name / f"{i}.png")


FOLDER = dict(image_size=8, mean=[0.5] * 3, std=[0.5] * 3)


def test_a_root_of_class_folders_is_split_into_three_stratified_splits(tmp_path):
    _photos(tmp_path)
    splits = data.image_folder(str(tmp_path), **FOLDER, seed=0)
    files = {str(p) for p in tmp_path.rglob("*.png")}
    parts = [{p for p, _ in s.samples} for s in (splits.train, splits.val, splits.test)]
    assert set().union(*parts) == files and sum(map(len, parts)) == len(files) == 30  # a partition of the files
    assert [len(p) for p in parts] == [18, 6, 6] and splits.classes == ["cat", "dog", "owl"]
    assert Counter(splits.test.targets) == Counter(splits.val.targets) == {0: 2, 1: 2, 2: 2}
    assert all(Path(p).parent.name == splits.classes[t] for p, t in splits.test.samples)
    augmented = {type(t).__name__ for t in splits.train.transform.transforms}
    assert "RandomResizedCrop" in augmented and "RandomResizedCrop" not in {type(t).__name__ for t in splits.test.transform.transforms}
    again = data.image_folder(str(tmp_path), **FOLDER, seed=1)
    assert again.test.samples == splits.test.samples and again.val.samples != splits.val.samples
    assert data.train_size(compose_config(["data=folder", f"data.dataset.root={tmp_path}"]).data.dataset) == 18


def test_root_test_folder_is_the_test_split_and_its_absence_is_said(tmp_path, caplog):
    for split in ("train", "val", "test"):
        _photos(tmp_path / split, per_class=2)
    splits = data.image_folder(str(tmp_path), **FOLDER, seed=0)
    assert sorted(p for p, _ in splits.test.samples) == sorted(str(p) for p in (tmp_path / "test").rglob("*.png"))
    assert sorted(p for p, _ in splits.train.samples) == sorted(str(p) for p in (tmp_path / "train").rglob("*.png"))
    for png in (tmp_path / "test").rglob("*.png"):
        png.unlink()
    for folder in sorted((tmp_path / "test").glob("*")):
        folder.rmdir()
    (tmp_path / "test").rmdir()
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        splits = data.image_folder(str(tmp_path), **FOLDER, seed=0)
    assert splits.test is None
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "no held-out test split" in warning and "test/<class>/" in warning


def test_cifar10_keeps_its_official_test_set_and_cuts_val_from_train(monkeypatch):
    import torchvision.datasets

    class TinyCifar:  # the attributes of torchvision's CIFAR10 that tunelab uses
        def __init__(self, root, train, download, transform):
            n = 200 if train else 50
            self.data = np.arange(n * 4).reshape(n, 2, 2, 1) + (0 if train else 10_000)  # every image its own
            self.targets = [i % 10 for i in range(n)]
            self.classes = [str(c) for c in range(10)]
            self.transform, self.train = transform, train

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", TinyCifar)
    splits = data.cifar10("unused", **FOLDER, seed=0)
    assert splits.test.train is False and len(splits.test.data) == 50 and len(splits.val.data) == 20 and len(splits.train.data) == 180
    assert Counter(splits.val.targets) == {c: 2 for c in range(10)}
    rows = {r.tobytes() for r in splits.train.data} | {r.tobytes() for r in splits.val.data}
    assert len(rows) == 200
    assert data.kfold(splits, 4, 1, seed=0).test is splits.test


class Files(torch.utils.data.Dataset):
    """A file-backed set of `labels` (served through a DataLoader): each item is its index."""

    def __init__(self, labels):
        self.targets = list(labels)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.tensor(i), self.targets[i]


IMBALANCED = [0] * 1000 + [1] * 100  # 10:1


@pytest.mark.parametrize("dataset", [TensorDataset(torch.arange(1100), torch.tensor(IMBALANCED)), Files(IMBALANCED)],
                         ids=["in memory", "file-backed"])
def test_the_balanced_sampler_draws_classes_about_equally_and_resumes(dataset):
    def epoch(loader, n):
        loader.sampler.set_epoch(n)
        return [b[0].tolist() for b in loader]

    loader = data.make_loader(dataset, 100, True, seed=3, num_workers=0, sampler="balanced")
    for n in range(3):
        batches = epoch(loader, n)
        drawn = Counter(IMBALANCED[i] for b in batches for i in b)
        assert sum(drawn.values()) == 1100 and abs(drawn[0] - drawn[1]) <= 0.1 * 550, drawn
    again = data.make_loader(dataset, 100, True, seed=3, num_workers=0, sampler="balanced")
    assert epoch(again, 2) == batches  # the same seed and epoch: the same draws
    assert epoch(again, 1) != batches
    again.start_at(4)
    assert epoch(again, 2) == batches[4:]  # a run resumed at batch 4 of epoch 2
    shuffled = Counter(IMBALANCED[i] for b in epoch(data.make_loader(dataset, 100, True, seed=3, num_workers=0), 0) for i in b)
    assert shuffled == {0: 1000, 1: 100}  # without it, every image once


def test_an_unknown_sampler_is_a_config_error():
    with pytest.raises(ConfigError, match="data.sampler='uniform'"):
        data.make_loader(TensorDataset(torch.zeros(4), torch.zeros(4, dtype=torch.long)), 2, True, 0, sampler="uniform")


def test_balanced_class_weights_are_scikit_learns():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 50 + [1] * 5 + [2] * 20)
    weights = data.class_weights(TensorDataset(torch.zeros(75), torch.tensor(labels)))
    assert torch.allclose(weights, torch.tensor(compute_class_weight("balanced", classes=np.arange(3), y=labels), dtype=torch.float32))
    assert weights[1] > weights[2] > weights[0]
    with pytest.raises(ConfigError, match="no images of the classes \\[3\\]"):
        data.class_weights(TensorDataset(torch.zeros(75), torch.tensor(labels)), num_classes=4)
