"""Folds for cross-validation, the EMA of the weights, and early stopping."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from conftest import metric_series, mlflow_runs, options, scheduler_option
from tunelab import data, run
from tunelab.callbacks.early_stopping import EarlyStopping
from tunelab.callbacks.ema import WeightEMA
from tunelab.checks import check_config
from tunelab.errors import ConfigError


def _ids_splits(n_train: int = 90, n_val: int = 30, classes: int = 3) -> data.Splits:
    """Splits whose images are their own ids (so folds can be checked by id) with unbalanced labels."""
    ids = torch.arange(n_train + n_val, dtype=torch.float32).view(-1, 1)
    labels = torch.tensor([0 if i % 4 == 0 else 1 + i % classes % 2 for i in range(n_train + n_val)])
    return data.Splits(
        TensorDataset(ids[:n_train], labels[:n_train]), TensorDataset(ids[n_train:], labels[n_train:]), [str(c) for c in range(classes)]
    )


def _val_ids(split: data.Splits) -> set[int]:
    return {int(v) for v in split.val.tensors[0].flatten()}


def test_folds_partition_the_data_are_stratified_and_fixed_by_the_seed():
    splits = _ids_splits()
    labels = torch.cat([splits.train.tensors[1], splits.val.tensors[1]])
    folds = [data.kfold(splits, 4, i, seed=7) for i in range(4)]
    vals = [_val_ids(f) for f in folds]
    assert set().union(*vals) == set(range(120)) and sum(len(v) for v in vals) == 120  # a partition
    for fold, val in zip(folds, vals):
        train_ids = {int(v) for v in fold.train.tensors[0].flatten()}
        assert train_ids == set(range(120)) - val
        overall = torch.bincount(labels, minlength=3).float() / len(labels)
        within = torch.bincount(fold.val.tensors[1], minlength=3).float() / len(val)
        assert torch.allclose(within, overall, atol=1 / 30 + 1e-6)  # stratified: each class's share kept
        assert all(labels[i] == y for i, y in zip(fold.val.tensors[0].flatten().long().tolist(), fold.val.tensors[1].tolist()))
    assert [_val_ids(data.kfold(splits, 4, i, seed=7)) for i in range(4)] == vals  # same seed, same folds
    assert [_val_ids(data.kfold(splits, 4, i, seed=8)) for i in range(4)] != vals


def test_folds_of_a_file_backed_set_keep_their_transforms():
    class Files:
        def __init__(self, samples, transform):
            self.samples = self.imgs = samples
            self.targets = [t for _, t in samples]
            self.transform = transform

    train = Files([(f"train/{i}.png", i % 2) for i in range(10)], "augment")
    val = Files([(f"val/{i}.png", i % 2) for i in range(4)], "plain")
    fold = data.kfold(data.Splits(train, val, ["a", "b"]), 2, 1, seed=0)
    assert fold.train.transform == "augment" and fold.val.transform == "plain"
    assert sorted(p for p, _ in fold.train.samples + fold.val.samples) == sorted(p for p, _ in train.samples + val.samples)
    assert len(train.samples) == 10  # the originals are not changed


@pytest.mark.parametrize("folds, fold, message", [(1, 0, "data.folds=1"), (3, 3, "data.fold=3"), (50, 0, "at most")])
def test_bad_folds_are_named(folds, fold, message):
    with pytest.raises(ConfigError, match=message):
        data.kfold(_ids_splits(), folds, fold, seed=0)


def test_ema_with_decay_zero_equals_the_raw_weights_and_follows_the_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)  # frozen: averaged as itself
    raw, half = WeightEMA(model, 0.0), WeightEMA(model, 0.5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        model(torch.randn(16, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        raw.update()
        half.update()
        for key, value in model.state_dict().items():
            expected[key] = 0.5 * expected[key] + 0.5 * value if value.is_floating_point() and "running" not in key else value.clone()
    for key, value in model.state_dict().items():
        assert torch.equal(raw.state_dict()[key], value), key
        assert torch.allclose(half.state_dict()[key].float(), expected[key].float()), key


def test_ema_run_logs_val_acc_ema_and_saves_it(small_cfg, tracking_uri, tmp_path):
    run.train(small_cfg("trainer.ema_decay=0", f"trainer.checkpoint_dir={tmp_path / 'ckpt'}"))
    client, runs = mlflow_runs(tracking_uri)
    run_id = runs[-1].info.run_id
    # decay 0: the average is the raw model, so its accuracy is the raw accuracy
    assert metric_series(client, run_id, "val/acc_ema") == metric_series(client, run_id, "val/acc")
    assert len(metric_series(client, run_id, "val/loss_ema")) == 2
    saved = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert saved["ema"].keys() == saved["model"].keys()


def test_early_stopping_counts_epochs_without_improvement():
    stopper = EarlyStopping(patience=2, monitor="val/acc", min_delta=0.01)
    series = [0.50, 0.60, 0.605, 0.61, 0.70, 0.70, 0.70]
    reasons = [stopper.update({"val/acc": v}, epoch) for epoch, v in enumerate(series)]
    assert reasons[:3] == [None, None, None]  # 0.605 is not better by more than 0.01
    assert reasons[3] is not None and "best 0.6000 at epoch 2" in reasons[3]
    losses = EarlyStopping(patience=1, monitor="val/loss")
    assert losses.mode == "min"
    assert [losses.update({"val/loss": v}, e) is not None for e, v in enumerate([1.0, 0.9, 0.95])] == [False, False, True]
    with pytest.raises(ConfigError, match="patience"):
        EarlyStopping(patience=0)


@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_early_stopping_ends_a_plateaued_run_finished_with_the_reason(small_cfg, tracking_uri, scheduler):
    # lr 1e-12 on the head alone: the weights do not move, so val/acc is the same every epoch
    cfg = small_cfg(*scheduler_option(scheduler), "freeze=head", "optimizer.lr=1e-12", "trainer.max_epochs=6",
                    "trainer.early_stopping.patience=2")
    run.train(cfg)
    client, runs = mlflow_runs(tracking_uri)
    r = runs[-1]
    assert r.info.status == "FINISHED"
    assert [s for s, _ in metric_series(client, r.info.run_id, "val/acc")] == [0, 1, 2]  # best at 0, then 2 epochs without
    assert "did not improve" in r.data.tags[run.EARLY_STOP_TAG]


def test_resuming_an_early_stopped_run_trains_no_further(small_cfg, tracking_uri, tmp_path, caplog):
    overrides = ("freeze=head", "optimizer.lr=1e-12", "trainer.max_epochs=6", "trainer.early_stopping.patience=2",
                 f"trainer.checkpoint_dir={tmp_path}")
    run.train(small_cfg(*overrides))
    run.train(small_cfg(*overrides, "trainer.resume=auto"))
    client, runs = mlflow_runs(tracking_uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [s for s, _ in metric_series(client, runs[0].info.run_id, "val/acc")] == [0, 1, 2]
    assert "had finished training (3 epochs, " in caplog.text


def test_ema_monitor_without_ema_is_a_config_error(small_cfg):
    with pytest.raises(ConfigError, match="trainer.ema_decay"):
        check_config(small_cfg("trainer.early_stopping.monitor=val/acc_ema"))
