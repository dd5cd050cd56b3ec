"""data.augment: the random crop and flip, plus RandAugment or TrivialAugmentWide, on files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import mlflow_runs
from tunelab import run
from tunelab.data.files import folder_transforms
from tunelab.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photo(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (50, 70, 3), dtype=np.uint8))


def test_the_plain_transform_is_unchanged_bit_for_bit():
    """Validation, test and served images: resize, centre crop, scale to [0, 1], normalize, as before."""
    from torchvision import transforms as T

    before = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize(MEAN, STD)])
    image = _photo()
    assert torch.equal(folder_transforms(32, MEAN, STD, False)(image), before(image))


@pytest.mark.parametrize("augment", [True, "randaugment", "trivialaugment"])
def test_augmented_images_differ_between_draws(augment):
    transform = folder_transforms(32, MEAN, STD, augment)
    image = _photo()
    torch.manual_seed(0)
    draws = [transform(image) for _ in range(6)]
    assert all(d.shape == (3, 32, 32) and d.dtype == torch.float32 for d in draws)
    assert len({d.sum().item() for d in draws}) > 1


def test_an_unknown_policy_names_the_key():
    with pytest.raises(ConfigError, match=r"data\.augment=autoaugment"):
        folder_transforms(32, MEAN, STD, "autoaugment")


@pytest.mark.parametrize("overrides, message", [
    (["data.augment=true"], r"data\.augment=true: data=digits holds its images as tensors"),
    (["data=fake", "data.augment=randaugment"], r"data\.augment=randaugment: data=fake"),
    (["data=folder", "data.dataset.root=.", "data.augment=sometimes"], r"data\.augment=sometimes must be true, false, randaugment"),
])
def test_data_augment_is_checked_before_any_work(small_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run.train(small_cfg(*overrides))


def test_a_folder_trains_with_trivialaugment(small_cfg, tracking_uri, tmp_path):
    for label in ("a", "b"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for k in range(10):
            _photo(k + (100 if label == "b" else 0)).save(tmp_path / "photos" / label / f"{k}.png")
    run.train(small_cfg("data=folder", f"data.dataset.root={tmp_path / 'photos'}", "data.augment=trivialaugment", "data.image_size=32",
                        "data.batch_size=4", "data.num_workers=0", "model=mobilenet_v3_small", "trainer.max_epochs=1"))
    finished = mlflow_runs(tracking_uri)[1][0]
    assert finished.info.status == "FINISHED" and finished.data.params["data.dataset.augment"] == "trivialaugment"
