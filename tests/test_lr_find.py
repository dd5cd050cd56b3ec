"""The LR range test: a suggestion inside the swept range, a stop on divergence, the model untouched."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import metric_series, mlflow_runs
from tunelab import environment, lr_find, prepare, range_test, run


def _prepared(cfg):
    environment.seed_everything(cfg.seed, False)
    return prepare.prepare(cfg, torch.device("cpu"))


def test_range_test_suggests_inside_the_range_stops_on_divergence_and_leaves_the_model(small_cfg):
    cfg = small_cfg("lr_find.steps=40", "lr_find.min_lr=1e-5", "lr_find.max_lr=100", "logger=none")
    prepared = _prepared(cfg)
    before = {k: v.clone() for k, v in prepared.model.state_dict().items()}
    rng_before = torch.get_rng_state()

    result = range_test.for_config(cfg, prepared, torch.device("cpu"))

    assert 1e-5 <= result.suggestion <= 100
    assert result.lrs[0] == pytest.approx(1e-5) and result.lrs == sorted(result.lrs)
    assert "diverged" in result.stopped or "the loss is" in result.stopped
    assert len(result.lrs) < 40  # it stopped before reaching lr 100
    assert result.rule
    after = prepared.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_suggestion_rules():
    lrs = [10 ** (-6 + i * 0.25) for i in range(20)]
    falling = [3.0 - (0.5 * i if 6 <= i <= 12 else 0.05 * i) for i in range(20)]
    falling = [v if i < 14 else 10.0 for i, v in enumerate(falling)]
    lr, rule = range_test.suggest(lrs, falling)
    assert lrs[6] <= lr <= lrs[12] and "steepest" in rule
    # A curve whose minimum is at its start: fall back to the minimum's lr / 10
    lr, rule = range_test.suggest(lrs, [1.0 + i for i in range(20)])
    assert lr == lrs[0] and "/ 10" in rule  # never outside the swept range
    lr, rule = range_test.suggest(lrs, [5.0 - i if i < 8 else 0.0 for i in range(20)][:9] + [9.0] * 11)
    assert lrs[0] <= lr <= lrs[8]


def test_lr_auto_logs_the_lr_it_used_and_trains_from_the_original_weights(small_cfg, tracking_uri):
    run.train(small_cfg("optimizer.lr=auto", "lr_find.steps=12", "trainer.deterministic=true"))
    client, runs = mlflow_runs(tracking_uri)
    auto = runs[-1]
    used = float(auto.data.params["optimizer.lr_used"])
    assert auto.data.params["optimizer.lr"] == "auto"
    assert 1e-6 <= used <= 1.0
    assert metric_series(client, auto.info.run_id, "lr")[0][1] == pytest.approx(used)
    artifacts = {a.path for a in client.list_artifacts(auto.info.run_id)}
    assert "lr_find.png" in artifacts
    # The same run with that lr given by hand trains identically: the test moved nothing that training uses.
    run.train(small_cfg(f"optimizer.lr={used!r}", "trainer.deterministic=true"))
    client, runs = mlflow_runs(tracking_uri)
    manual = runs[-1]
    for key in ("train/loss", "val/acc", "val/loss"):
        assert metric_series(client, auto.info.run_id, key) == metric_series(client, manual.info.run_id, key), key


def test_lr_find_command_writes_plot_csv_and_an_mlflow_run(tmp_path, tracking_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    out = tmp_path / "lr"
    code = lr_find.main([
        "trainer.device=cpu", "trainer.progress=false", "data.batch_size=16", "freeze=head",
        "lr_find.steps=20", "lr_find.max_lr=50", "--out", str(out),
    ])
    assert code == 0
    assert (out / "lr_find.png").stat().st_size > 10_000
    rows = (out / "lr_find.csv").read_text().splitlines()
    assert rows[0] == "step,lr,loss,smoothed_loss" and 2 <= len(rows) - 1 <= 20
    client, runs = mlflow_runs(tracking_uri)
    assert len(runs) == 1 and runs[0].data.tags["tunelab.kind"] == "lr_find"
    suggested = metric_series(client, runs[0].info.run_id, "lr_find/suggested_lr")[0][1]
    assert 1e-6 <= suggested <= 50 and math.isfinite(suggested)
    assert "lr_find.png" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}


def test_lr_find_bad_range_is_a_clear_error(tmp_path, capsys):
    code = lr_find.main(["lr_find.min_lr=1", "lr_find.max_lr=0.1", "logger=none", "trainer.device=cpu", "--out", str(tmp_path)])
    assert code == 2
    assert "lr_find.min_lr=1" in capsys.readouterr().err
