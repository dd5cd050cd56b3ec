"""Stochastic Weight Averaging (trainer.swa.*): off when it starts after the run, the average torch's
swa_utils make of the epochs' weights, continued by a resumed run, and chosen by monitor=val/acc_swa."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, update_bn

from conftest import metric_series, mlflow_runs, stop_at_check
from tunelab import run
from tunelab.callbacks.swa import SWA
from tunelab.checks import check_config
from tunelab.errors import ConfigError
from tunelab.loop import Interrupted
from tunelab.prepare import prepare

#: One optimizer step per epoch (the whole training set in one batch), so BatchNorm statistics
#: recomputed by update_bn do not depend on the order of the batches.
TINY = ["model=mobilenet_v3_small", "data=fake", "data.dataset.train_size=24", "data.dataset.val_size=16", "data.batch_size=24",
        "trainer.max_epochs=4", "trainer.limit_train_batches=null", "trainer.limit_val_batches=null", "trainer.deterministic=true",
        "trainer.checkpoint_min_interval_s=0", "optimizer.lr=0.05"]
SERIES = ("lr", "train/loss", "val/loss", "val/acc")


def _series(uri: str, experiment: str) -> dict:
    client, runs = mlflow_runs(uri, experiment)
    run_id = runs[-1].info.run_id
    return {key: metric_series(client, run_id, key) for key in (*SERIES, "val/acc_swa", "val/loss_swa", "test/acc")}


def test_swa_starting_after_the_run_changes_nothing(small_cfg, tracking_uri, tmp_path):
    run.train(small_cfg(*TINY, f"trainer.checkpoint_dir={tmp_path}/plain", "logger.experiment_name=plain"))
    run.train(small_cfg(*TINY, f"trainer.checkpoint_dir={tmp_path}/late", "logger.experiment_name=late", "trainer.swa.start_epoch=4"))
    plain, late = _series(tracking_uri, "plain"), _series(tracking_uri, "late")
    assert all(plain[key] == late[key] for key in SERIES) and plain["lr"]
    assert late["val/acc_swa"] == []
    wa = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "late" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_val_acc_swa_is_the_accuracy_of_the_averaged_model_after_update_bn(small_cfg, tracking_uri, monkeypatch):
    seen = []
    real = SWA.on_validation_end

    def record(self, loop, metrics):  # the weights each SWA epoch ends with: what the test averages itself
        if loop.state.epoch >= self.start:
            seen.append(copy.deepcopy(self.trained.state_dict()))
        real(self, loop, metrics)

    monkeypatch.setattr(SWA, "on_validation_end", record)
    cfg = small_cfg(*TINY, "trainer.swa.start_epoch=0.5", "trainer.swa.lr=0.01", "trainer.swa.anneal_epochs=1",
                    "monitor=val/acc_swa", "logger.experiment_name=swa")
    run.train(cfg)
    logged = _series(tracking_uri, "swa")
    assert [s for s, _ in logged["val/acc_swa"]] == [2, 3] and len(seen) == 2  # start_epoch 0.5 of 4 epochs: epochs 2 and 3
    lrs = [v for _, v in logged["lr"]]
    assert lrs[3] == pytest.approx(0.01, rel=1e-12)  # SWALR reached trainer.swa.lr after its one anneal epoch
    assert lrs[2] == pytest.approx(0.025, rel=1e-12)  # the first SWA epoch trains at the lr the cosine had reached (half-way)

    prepared = prepare(cfg, torch.device("cpu"))
    model = prepared.trained
    average = AveragedModel(copy.deepcopy(model))
    x_train = torch.cat([x for x, _ in prepared.fit_train])
    x_val, y_val = (torch.cat(t) for t in zip(*prepared.fit_val))
    for k, weights in enumerate(seen):
        model.load_state_dict(weights)
        average.update_parameters(model)
        update_bn([x_train], average)
        average.eval()
        with torch.no_grad():
            logits = average(x_val)
        acc = (logits.argmax(1) == y_val).float().mean().item()
        loss = torch.nn.functional.cross_entropy(logits, y_val).item()
        assert logged["val/acc_swa"][k][1] == pytest.approx(acc, abs=1e-9)
        assert logged["val/loss_swa"][k][1] == pytest.approx(loss, rel=1e-5)
    assert logged["test/acc"] and logged["test/acc"][0][0] in (2, 3)  # the test scored an SWA epoch's average


def test_resume_mid_epoch_keeps_the_average(small_cfg, tracking_uri, tmp_path, monkeypatch):
    common = (*TINY, "data.batch_size=8", "trainer.swa.start_epoch=1", "trainer.swa.anneal_epochs=2", "trainer.swa.lr=0.02")
    run.train(small_cfg(*common, f"trainer.checkpoint_dir={tmp_path}/straight", "logger.experiment_name=straight"))
    with monkeypatch.context() as patch:
        stop_at_check(patch, 10)  # 3 steps and the end of epochs 1 and 2, then 2 steps of epoch 3
        with pytest.raises(Interrupted):
            run.train(small_cfg(*common, f"trainer.checkpoint_dir={tmp_path}/stopped", "logger.experiment_name=stopped"))
    stopped = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    assert stopped["loop"]["epoch"] == 2 and stopped["loop"]["batch"] == 2 and stopped["swa"]["scheduler"] is not None
    run.train(small_cfg(*common, f"trainer.checkpoint_dir={tmp_path}/stopped", "logger.experiment_name=stopped", "trainer.resume=auto"))
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    for key in ("model",):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert all(torch.equal(a["swa"]["average"][k], b["swa"]["average"][k]) for k in a["swa"]["average"])
    straight, resumed = _series(tracking_uri, "straight"), _series(tracking_uri, "stopped")
    assert straight["val/acc_swa"] == resumed["val/acc_swa"] and straight["lr"] == resumed["lr"]
    assert len(straight["val/acc_swa"]) == 3


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["monitor=val/acc_swa"], "trainer.swa.start_epoch"),
        (["monitor=val/acc_swa", "trainer.swa.start_epoch=5"], "trainer.swa.start_epoch"),
        (["trainer.swa.start_epoch=1.5"], "trainer.swa.start_epoch"),
        (["trainer.swa.start_epoch=1", "trainer.swa.lr=0"], "trainer.swa.lr"),
        (["trainer.swa.start_epoch=1", "trainer.swa.anneal_strategy=step"], "trainer.swa.anneal_strategy"),
        (["trainer.swa.start_epoch=1", "monitor=val/acc_swa", "trainer.early_stopping.patience=2"], "trainer.early_stopping.monitor"),
        (["trainer.swa.start_epoch=1", "scheduler=plateau", "scheduler.monitor=val/loss_swa"], "scheduler.monitor"),
    ],
)
def test_bad_swa_settings_name_the_key(overrides, key, small_cfg):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(small_cfg(*overrides))
