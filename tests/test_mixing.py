"""data.mixup / data.cutmix: soft targets that sum to 1, a logged loss that is their cross entropy,
no feature cache, and a resumed run that mixes as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from conftest import metric_series, mlflow_runs, stop_at_check
from tunelab import run
from tunelab.data import mixing
from tunelab.data.mixing import MixedBatches
from tunelab.errors import ConfigError
from tunelab.loop import Interrupted

TINY = ["model=resnet18", "data=fake", "data.dataset.train_size=32", "data.dataset.val_size=16", "data.batch_size=8",
        "trainer.limit_train_batches=null", "trainer.limit_val_batches=null", "trainer.deterministic=true", "trainer.checkpoint_min_interval_s=0"]


@pytest.mark.parametrize("mixup,cutmix", [(0.4, None), (None, 1.0), (0.4, 1.0)])
def test_mixed_targets_sum_to_one_per_image(mixup, cutmix):
    mix = mixing.mixer(mixup, cutmix, 5)
    x, y = torch.rand(16, 3, 8, 8), torch.arange(16) % 5
    torch.manual_seed(0)
    mixed = [mix(x, y) for _ in range(20)]
    for images, targets in mixed:
        assert images.shape == x.shape and targets.shape == (16, 5)
        assert torch.allclose(targets.sum(1), torch.ones(16))
        shares = targets.gather(1, y[:, None]).squeeze(1)  # the share of each image's own label
        assert bool((shares >= 0).all() and (shares <= 1).all())
    assert any(not torch.equal(images, x) for images, _ in mixed)  # the images really are mixed


def test_the_logged_loss_is_the_cross_entropy_with_the_soft_targets(small_cfg, tracking_uri, monkeypatch):
    seen = []
    real = MixedBatches.__iter__

    def record(self):
        for x, y in real(self):
            seen.append((x.clone(), y.clone()))
            yield x, y

    monkeypatch.setattr(MixedBatches, "__iter__", record)
    models = []
    from tunelab import loop

    real_fit = loop.Loop.run

    def keep_model(self):  # the weights as training starts, before any step
        import copy

        models.append(copy.deepcopy(self.model))
        return real_fit(self)

    monkeypatch.setattr(loop.Loop, "run", keep_model)
    run.train(small_cfg(*TINY, "data.mixup=0.4", "data.cutmix=1.0", "trainer.max_epochs=1", "optimizer.lr=1e-12", "optimizer.weight_decay=0"))
    client, runs = mlflow_runs(tracking_uri)
    logged = metric_series(client, runs[0].info.run_id, "train/loss")
    assert len(seen) == 4 and [s for s, _ in logged] == [0, 1, 2, 3]
    model = models[0].train()
    for (step, value), (x, y) in zip(logged, seen):
        assert torch.allclose(y.sum(1), torch.ones(len(y)))
        with torch.no_grad():
            expected = -(y * torch.log_softmax(model(x), 1)).sum(1).mean().item()  # the weights barely move at lr 1e-12
        assert value == pytest.approx(expected, rel=1e-4), step
        assert not torch.equal(y, torch.nn.functional.one_hot(y.argmax(1), y.shape[1]).float())  # soft, not one-hot


def test_mixing_turns_off_the_feature_cache(small_cfg, tracking_uri, caplog):
    caplog.set_level("INFO")
    run.train(small_cfg(*TINY, "freeze=head", "data.mixup=0.2", "trainer.max_epochs=1"))
    assert "Features are not cached: random augmentation" in caplog.text


def test_resume_mid_epoch_with_mixing_equals_an_uninterrupted_run(small_cfg, tracking_uri, tmp_path, monkeypatch):
    common = (*TINY, "data.mixup=0.4", "data.cutmix=1.0", "trainer.max_epochs=2")
    run.train(small_cfg(*common, f"trainer.checkpoint_dir={tmp_path}/straight", "logger.experiment_name=straight"))
    with monkeypatch.context() as patch:
        stop_at_check(patch, 7)  # 4 steps and the end of epoch 1, then 2 steps of epoch 2
        with pytest.raises(Interrupted):
            run.train(small_cfg(*common, f"trainer.checkpoint_dir={tmp_path}/stopped", "logger.experiment_name=stopped"))
    run.train(small_cfg(*common, f"trainer.checkpoint_dir={tmp_path}/stopped", "logger.experiment_name=stopped", "trainer.resume=auto"))
    wa = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("key", ["mixup", "cutmix"])
def test_a_bad_alpha_names_the_key(key):
    with pytest.raises(ConfigError, match=rf"data\.{key}"):
        mixing.mixer(0 if key == "mixup" else None, -1 if key == "cutmix" else None, 3)
