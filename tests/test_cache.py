"""data.cache: files decoded once into a shared store, then augmented as uint8 tensors."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as F

from conftest import ROOT, SMALL, mlflow_runs
from tunelab import run
from tunelab.data import cached_splits, image_folder, make_loader
from tunelab.data.cached import draw_box, normalize
from tunelab.data.decoded import open_store, shorter_side, store_key
from tunelab.data.files import folder_transforms
from tunelab.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photo(seed: int, size=(70, 50)) -> Image.Image:
    """A smooth picture with noise (JPEG-like content), `size` = (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(xx * rng.uniform(2, 8) + c) * np.cos(yy * rng.uniform(2, 8)) for c in range(3)], -1)
    return Image.fromarray((base * 80 + 128 + rng.normal(0, 10, (h, w, 3))).clip(0, 255).astype(np.uint8))


def _folder(root, per_class: int = 6, classes=("a", "b")):
    for c, label in enumerate(classes):
        (root / label).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            image = _photo(100 * c + k, (70 + 7 * k, 50))
            image.save(root / label / (f"{k}.jpg" if k % 2 else f"{k}.png"), **({"quality": 90} if k % 2 else {}))
    return root


def _fresh(path, side: int) -> torch.Tensor:
    """The file decoded and resized here, without the store."""
    return F.resize(decode_image(read_file(str(path)), mode=ImageReadMode.RGB), [side], antialias=True)


def _splits(root, augment=True, image_size=32, mode="auto", scale=256 / 224):
    splits = image_folder(str(root), image_size, MEAN, STD, seed=0, augment=augment, val_fraction=0.25, test_fraction=0.25)
    return cached_splits(splits, mode, scale, image_size, MEAN, STD, augment)


def test_a_cached_validation_image_equals_the_file_decoded_and_resized_fresh(tmp_path):
    root = _folder(tmp_path / "photos")
    (splits, side) = _splits(root)
    assert side == shorter_side(32, 256 / 224) == 37
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for dataset in (splits.val, splits.test):
        for i, (path, target) in enumerate(dataset.samples):
            stored = dataset.pixels[dataset.index[i]]
            assert torch.equal(stored, _fresh(path, side)), path  # bit for bit, JPEG and PNG
            image, label = dataset[i]
            expected = (F.center_crop(_fresh(path, side), [32]).float() / 255 - mean) / std
            assert label == target and image.shape == (3, 32, 32)
            torch.testing.assert_close(image, expected, rtol=0, atol=1e-6)  # the same pixels; float rounding of one multiply-add


def test_changing_or_adding_a_file_decodes_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "photos", per_class=3)
    paths = sorted(str(p) for p in root.rglob("*.*"))
    first, key = open_store(paths, 20), store_key(paths, 20)
    changed = paths[1]
    _photo(999, (60, 60)).save(changed, format="PNG" if changed.endswith(".png") else "JPEG")
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert store_key(paths, 20) != key
    second = open_store(paths, 20)
    assert torch.equal(second[1], _fresh(changed, 20)) and not torch.equal(first[1], second[1])
    assert all(torch.equal(first[i], second[i]) for i in (0, 2, 3))
    _photo(1000).save(root / "a" / "new.png")
    third = open_store(sorted(str(p) for p in root.rglob("*.*")), 20)
    assert len(third) == len(paths) + 1
    assert len(list((tmp_path / "cache" / "decoded").glob("*.u8"))) == 3


def test_a_store_is_reused_and_its_files_are_complete(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "photos")
    _splits(root)
    with caplog.at_level("INFO", logger="tunelab.data"):
        _splits(root)  # another run: reads the store
    assert "Decoding" not in caplog.text and "files decoded once" in caplog.text
    files = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "cache" / "decoded").iterdir())
    assert files == ["lock", "npz", "u8"]  # no temporary file left


def test_the_draws_are_the_same_for_any_number_of_workers_and_differ_between_epochs(tmp_path):
    root = _folder(tmp_path / "photos")
    train = _splits(root)[0].train

    def epoch(workers: int, number: int) -> list[torch.Tensor]:
        loader = make_loader(train, batch_size=2, shuffle=True, seed=3, num_workers=workers)
        loader.sampler.set_epoch(number)
        return [x for x, _ in loader]

    state = torch.get_rng_state()
    one, two = epoch(0, 1), epoch(2, 1)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is not drawn from
    assert all(torch.equal(a, b) for a, b in zip(one, two)) and one[0].dtype == torch.float32
    assert not all(torch.equal(a, b) for a, b in zip(one, epoch(0, 2)))


def test_a_batch_is_normalized_as_its_images_one_by_one():
    images = torch.randint(0, 256, (5, 3, 20, 30), dtype=torch.uint8)
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in (MEAN, STD))
    batch = normalize(images, mean, std)
    assert batch.dtype == torch.float32 and batch.is_contiguous()
    assert torch.equal(batch, torch.stack([normalize(image, mean, std) for image in images]))
    assert torch.equal(batch, normalize(images.contiguous(memory_format=torch.channels_last), mean, std))
    torch.testing.assert_close(batch, (images.float() / 255 - mean) / std, rtol=0, atol=1e-6)


@pytest.mark.parametrize("height, width", [(256, 341), (100, 400), (1, 1000), (1000, 1)])
def test_crop_boxes_are_drawn_as_torchvision_draws_them(height, width):
    """draw_box against RandomResizedCrop.get_params: the same boxes where every try fails (the
    central crop), the same distribution of sizes and places otherwise."""
    from torchvision.transforms import RandomResizedCrop

    scale, ratio, n = (0.08, 1.0), (3 / 4, 4 / 3), 10_000
    torch.manual_seed(0)
    ours = np.array([draw_box(height, width, scale, ratio, torch.rand(10, 4, dtype=torch.float64).tolist()) for _ in range(n)])
    theirs = np.array([RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(ratio)) for _ in range(n)])
    assert (ours[:, :2] + ours[:, 2:] <= [height, width]).all() and (ours >= 0).all() and (ours[:, 2:] > 0).all()
    if min(height, width) == 1:
        assert (ours == theirs).all()
    else:  # (top, left, h, w): means within 1%, spreads within 3%, of the image's sides
        for side, start, size in ((height, 0, 2), (width, 1, 3)):  # a box shorter than the side may touch its far edge
            shorter = ours[:, size] < side
            assert (ours[shorter, start] + ours[shorter, size] == side).any()
        sides = np.array([height, width, height, width])
        np.testing.assert_allclose(ours.mean(0) / sides, theirs.mean(0) / sides, atol=0.01)
        np.testing.assert_allclose(ours.std(0) / sides, theirs.std(0) / sides, atol=0.03)
        np.testing.assert_allclose(np.percentile(ours[:, 2] * ours[:, 3], [10, 50, 90]) / (height * width),
                                   np.percentile(theirs[:, 2] * theirs[:, 3], [10, 50, 90]) / (height * width), atol=0.02)


def test_cache_off_keeps_the_per_image_path(tmp_path, caplog):
    root = _folder(tmp_path / "photos")
    plain = image_folder(str(root), 32, MEAN, STD, seed=0, val_fraction=0.25, test_fraction=0.25)
    with caplog.at_level("INFO", logger="tunelab.data"):
        splits, side = cached_splits(plain, "off", 256 / 224, 32, MEAN, STD, True)
    assert splits is plain and side is None and "data.cache=off" in caplog.text


@pytest.mark.parametrize("key, value", [("data.cache", "sometimes"), ("data.cache_scale", 0.5), ("data.cache_scale", "big")])
def test_bad_cache_values_name_the_key(tmp_path, key, value):
    root = _folder(tmp_path / "photos")
    mode, scale = (value, 1.0) if key == "data.cache" else ("auto", value)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _splits(root, mode=mode, scale=scale)


def test_cifar_arrays_are_augmented_as_tensors_and_validated_as_before():
    class Arrays:  # CIFAR-10's shape: an NHWC uint8 array, targets and classes
        def __init__(self, n, seed):
            self.data = np.random.default_rng(seed).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
            self.targets, self.classes = [k % 2 for k in range(n)], ["a", "b"]

    from tunelab.data import Splits

    given = Splits(Arrays(6, 0), Arrays(4, 1), ["a", "b"], Arrays(4, 2))
    splits, side = cached_splits(given, "auto", 256 / 224, 32, MEAN, STD, True)
    before = folder_transforms(32, MEAN, STD, False)
    assert side is None
    for i in range(4):
        torch.testing.assert_close(splits.val[i][0], before(Image.fromarray(given.val.data[i])), rtol=0, atol=1e-6)
    assert splits.train[0][0].shape == (3, 32, 32)


def test_served_preprocessing_follows_the_cached_validation(small_cfg, tracking_uri, tmp_path):
    from tunelab import trained

    root = _folder(tmp_path / "photos")
    common = ("data=folder", f"data.dataset.root={root}", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
              "model=mobilenet_v3_small", "trainer.max_epochs=1", f"trainer.checkpoint_dir={tmp_path}/ckpt")
    run.train(small_cfg(*common))
    info = trained.from_checkpoint(tmp_path / "ckpt" / "best.pt", torch.device("cpu")).classifier.info
    assert info.resize_to == 37
    image = Image.open(next(root.rglob("*.png")))
    assert torch.equal(info.transform(image), folder_transforms(32, MEAN, STD, False, 37)(image))
    run.train(small_cfg(*common, "data.cache=off", f"trainer.checkpoint_dir={tmp_path}/off"))
    assert trained.from_checkpoint(tmp_path / "off" / "best.pt", torch.device("cpu")).classifier.info.resize_to is None


@pytest.mark.slow
def test_two_runs_that_start_together_decode_once_and_both_train(tmp_path):
    """Both wait while the store's lock is held; then one decodes, the other reads what it wrote."""
    root = _folder(tmp_path / "photos", per_class=8)
    cache = tmp_path / "cache"
    paths = sorted(str(p) for p in root.rglob("*.*"))
    lock = cache / "decoded" / f"{store_key(paths, shorter_side(32, 1.0))}.lock"
    lock.parent.mkdir(parents=True)
    env = {**os.environ, "TUNELAB_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    procs, logs = [], []
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        for k in range(2):
            logs.append(tmp_path / f"run{k}" / "train.log")
            args = [*SMALL, "data=folder", f"data.dataset.root={root}", "data.image_size=32", "data.cache_scale=1.0", "data.num_workers=0",
                    "data.batch_size=4", "model=mobilenet_v3_small", "trainer.max_epochs=1", "logger.log_model=false",
                    f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow{k}.db", f"hydra.run.dir={tmp_path}/run{k}"]
            procs.append(subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        deadline = time.time() + 240
        while time.time() < deadline and not all(p.exists() and "waiting for it" in p.read_text() for p in logs):
            assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs]
            time.sleep(0.5)
        assert all("waiting for it" in p.read_text() for p in logs)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]
    assert sum("Decoding 16 images once" in p.read_text() for p in logs) == 1
    assert sorted(p.suffix for p in (cache / "decoded").iterdir()) == [".lock", ".npz", ".u8"]
    for k in range(2):
        assert mlflow_runs(f"sqlite:///{tmp_path}/mlflow{k}.db")[1][0].info.status == "FINISHED"
