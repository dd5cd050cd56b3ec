"""freeze=lp_ft: the head trains alone for freeze.probe_epochs (on cached features when allowed), then
everything, the body at freeze.finetune_lr_scale x the head's lr, in one run that resumes exactly."""

from __future__ import annotations

import pytest
import torch

from conftest import metric_series, mlflow_runs, stop_at_check
from tunelab import run
from tunelab.checks import check_config
from tunelab.errors import ConfigError
from tunelab.loop import Interrupted

SPE = 4
TINY = ["model=resnet18", "data=fake", "data.dataset.train_size=32", "data.dataset.val_size=16", "data.batch_size=8",
        "trainer.max_epochs=3", "trainer.limit_train_batches=null", "trainer.limit_val_batches=null", "trainer.deterministic=true",
        "trainer.checkpoint_min_interval_s=0", "freeze=lp_ft", "freeze.probe_epochs=1", "freeze.finetune_lr_scale=0.25"]


def _logged(uri: str, experiment: str) -> dict:
    client, runs = mlflow_runs(uri, experiment)
    run_id = runs[-1].info.run_id
    return {key: metric_series(client, run_id, key) for key in ("lr", "lr/all", "lr/body", "trainable_params", "val/acc", "val/loss")}


@pytest.mark.parametrize("cached", [True, False])
def test_the_head_probes_then_everything_trains_with_the_body_at_the_scaled_lr(cached, small_cfg, tracking_uri, tmp_path, caplog):
    caplog.set_level("INFO")
    run.train(small_cfg(*TINY, f"freeze.cache_features={str(cached).lower()}", f"trainer.checkpoint_dir={tmp_path}"))
    logged = _logged(tracking_uri, "tunelab")
    assert ("while probing" in caplog.text) is cached
    trainable = [v for _, v in logged["trainable_params"]]
    head = 512 * 10 + 10  # resnet18's new fc for the 10 classes of data=fake
    assert trainable[0] == head and trainable[1] == trainable[2] > 11_000_000
    lr = dict(logged["lr"])
    body = logged["lr/body"]
    assert [s for s, _ in body] == list(range(SPE, 3 * SPE))  # from the first step after the probe
    assert all(v == pytest.approx(0.25 * lr[s], rel=1e-9) for s, v in body)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert len(state["optimizer"]["param_groups"]) == 2


def test_a_probe_on_cached_features_trains_like_one_on_images(small_cfg, tracking_uri, tmp_path):
    for cached in (True, False):
        run.train(small_cfg(*TINY, f"freeze.cache_features={str(cached).lower()}", f"trainer.checkpoint_dir={tmp_path}/{cached}",
                            f"logger.experiment_name=c{cached}"))
    a, b = _logged(tracking_uri, "cTrue"), _logged(tracking_uri, "cFalse")
    assert [v for _, v in a["val/loss"]] == pytest.approx([v for _, v in b["val/loss"]], rel=1e-4)
    wa = torch.load(tmp_path / "True" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "False" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-3, atol=1e-5) for k in wa)


def test_resume_after_the_switch_equals_an_uninterrupted_run(small_cfg, tracking_uri, tmp_path, monkeypatch):
    run.train(small_cfg(*TINY, f"trainer.checkpoint_dir={tmp_path}/straight", "logger.experiment_name=straight"))
    with monkeypatch.context() as patch:
        stop_at_check(patch, 7)  # 4 steps and the end of epoch 1 (the probe), then 2 steps of the whole model
        with pytest.raises(Interrupted):
            run.train(small_cfg(*TINY, f"trainer.checkpoint_dir={tmp_path}/stopped", "logger.experiment_name=stopped"))
    stopped = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["loop"]
    assert stopped["epoch"] == 1 and stopped["batch"] == 2
    run.train(small_cfg(*TINY, f"trainer.checkpoint_dir={tmp_path}/stopped", "logger.experiment_name=stopped", "trainer.resume=auto"))
    wa = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _logged(tracking_uri, "straight")["lr/body"] == _logged(tracking_uri, "stopped")["lr/body"]


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["freeze=lp_ft", "freeze.probe_epochs=2"], "freeze.probe_epochs"),  # SMALL runs 2 epochs: nothing left to fine-tune
        (["freeze=lp_ft", "freeze.probe_epochs=0.5"], "freeze.probe_epochs"),
        (["freeze=lp_ft", "freeze.probe_epochs=1", "freeze.finetune_lr_scale=0"], "freeze.finetune_lr_scale"),
        (["freeze=lp_ft", "freeze.probe_epochs=1", "freeze.unfreeze_every=1"], "freeze.unfreeze_every"),
        (["freeze=lp_ft", "freeze.probe_epochs=1", "freeze.depth=0"], "freeze.depth"),
    ],
)
def test_bad_lp_ft_settings_name_the_key(overrides, key, small_cfg):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(small_cfg(*overrides))
