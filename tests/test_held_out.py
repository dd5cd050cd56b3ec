"""The held-out test at the end of a run: scored like scikit-learn does, on images nothing chose on."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from conftest import metric_series, mlflow_runs, options, scheduler_option
from tunelab import data, prepare, run
from tunelab.callbacks.held_out_test import HeldOutTest

FAST = ["model=mobilenet_v3_small", "data=fake", "data.dataset.train_size=48", "data.dataset.val_size=16", "data.batch_size=8",
        "trainer.max_epochs=3", "trainer.limit_train_batches=null", "trainer.limit_val_batches=null"]


def test_test_metrics_and_artifacts_equal_scikit_learns_on_the_logged_model(small_cfg, tracking_uri, tmp_path, monkeypatch):
    import mlflow
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

    cfg = small_cfg("trainer.max_epochs=3", f"trainer.checkpoint_dir={tmp_path}", log_model=True)
    run.train(cfg)
    client, runs = mlflow_runs(tracking_uri)
    r = runs[-1]
    accs = [v for _, v in metric_series(client, r.info.run_id, "val/acc")]
    chosen = int(np.argmax(accs))
    assert metric_series(client, r.info.run_id, "test/acc")[0][0] == chosen  # logged once, at the chosen epoch
    splits = data.digits(32, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], seed=cfg.seed, split_seed=cfg.data.split_seed)
    x, y = splits.test.tensors
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)  # not mlflow.set_tracking_uri: it would outlast this test
    model = mlflow.pytorch.load_model(f"runs:/{r.info.run_id}/model")
    with torch.no_grad():
        predicted = model(x).argmax(1).numpy()
    m = r.data.metrics
    assert m["test/acc"] == pytest.approx(accuracy_score(y, predicted), abs=1e-9)
    assert m["test/balanced_acc"] == pytest.approx(balanced_accuracy_score(y, predicted), abs=1e-9)
    assert m["test/macro_f1"] == pytest.approx(f1_score(y, predicted, average="macro", zero_division=0), abs=1e-9)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "per_class.csv").read_text())))
    test_rows = [row for row in rows if row["split"] == "test"]
    assert sum(int(row["support"]) for row in test_rows) == len(y) == 360
    expected = confusion_matrix(y, predicted, labels=range(10))
    assert [int(row["support"]) for row in test_rows] == expected.sum(1).tolist()
    assert {"per_class.csv", "confusion_matrix.png", "top_losses.png"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 10_000 and (tmp_path / "top_losses.png").stat().st_size > 10_000


class _Guarded(Dataset):
    """A test split that raises when an image is read before the end of training."""

    open = False

    def __init__(self, inner: Dataset):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if not _Guarded.open:
            raise AssertionError("the test split was read before training ended")
        return self.inner[i]


@pytest.fixture
def guarded_test_split(monkeypatch):
    """The fake data's test split raises when read until the held-out test starts (after the last epoch)."""
    real_fake, real_end = data.fake, HeldOutTest.on_fit_end

    def fake(*args, **kwargs):
        splits = real_fake(*args, **kwargs)
        return data.Splits(splits.train, splits.val, splits.classes, _Guarded(splits.test))

    def on_fit_end(self, loop):
        _Guarded.open = True
        return real_end(self, loop)

    _Guarded.open = False
    monkeypatch.setattr(data, "fake", fake)
    monkeypatch.setattr(HeldOutTest, "on_fit_end", on_fit_end)
    yield
    _Guarded.open = False


CASES = [scheduler_option(name) for name in options("scheduler")] + [
    ["trainer.early_stopping.patience=1", "monitor=val/macro_f1"],
    ["optimizer.lr=auto", "lr_find.steps=10"],
    ["freeze.depth=-1", "freeze.unfreeze_every=1"],
]


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: " ".join(o))
def test_nothing_reads_the_test_split_before_training_ends(overrides, guarded_test_split, small_cfg, tracking_uri):
    run.train(small_cfg(*FAST, *overrides))
    client, runs = mlflow_runs(tracking_uri)
    metrics = runs[-1].data.metrics
    assert {"test/acc", "test/loss", "test/balanced_acc", "test/macro_f1"} <= set(metrics) and _Guarded.open


def test_balanced_accuracy_and_macro_f1_each_epoch_and_as_monitor(small_cfg, tracking_uri):
    run.train(small_cfg("monitor=val/balanced_acc", "trainer.early_stopping.monitor=val/macro_f1"))
    client, runs = mlflow_runs(tracking_uri)
    for key in ("val/balanced_acc", "val/macro_f1"):
        series = metric_series(client, runs[-1].info.run_id, key)
        assert [s for s, _ in series] == [0, 1] and all(0 <= v <= 1 for _, v in series)


def test_trainer_test_false_skips_the_test(small_cfg, tracking_uri):
    run.train(small_cfg("trainer.test=false"))
    client, runs = mlflow_runs(tracking_uri)
    assert not any(key.startswith("test/") for key in runs[-1].data.metrics)


def test_balanced_class_weights_are_scikit_learns(small_cfg):
    from sklearn.utils.class_weight import compute_class_weight

    cfg = small_cfg("loss.class_weights=balanced", "data.dataset.classes=[0,1,2]", "data.dataset.max_train_samples=40", "logger=none")
    built = prepare.prepare(cfg, torch.device("cpu"))
    labels = built.splits.train.tensors[1].numpy()
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    assert built.loss_fn.weight.numpy() == pytest.approx(expected, rel=1e-6)
