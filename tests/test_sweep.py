"""Sweeps: one MLflow parent per sweep, nested children, and a comparison equal to their metrics."""

from __future__ import annotations

import csv
import math

import pytest

from conftest import compose_config, metric_series, mlflow_runs, run_train

TINY_SWEEP = [
    "trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "data.batch_size=16",
    "trainer.device=cpu", "trainer.progress=false", "logger.log_model=false",
]


def _sweep(tmp_path, *args, code: int = 0):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_train(["-m", *args, *TINY_SWEEP], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == code, proc.stderr[-3000:]  # 1 when a job failed, after the whole sweep
    client, runs = mlflow_runs(uri)
    parents = [r for r in runs if r.data.tags.get("tunelab.sweep") == "true"]
    assert len(parents) == 1
    parent = parents[0]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(kids) == len(runs) - 1
    sweep_dir = tmp_path / parent.data.tags["tunelab.sweep_dir"]
    return client, parent, kids, sweep_dir, proc


def _table(sweep_dir):
    """The comparison's per-run table."""
    with open(sweep_dir / "comparison_runs.csv") as f:
        return list(csv.DictReader(f))


def _check_table_matches_children(client, kids, table):
    assert len(table) == len(kids)
    by_id = {row["run_id"]: row for row in table}
    for kid in kids:
        row = by_id[kid.info.run_id]
        assert row["status"] == kid.info.status
        if kid.info.status != "FINISHED":
            continue
        accs = [v for _, v in metric_series(client, kid.info.run_id, "val/acc")]
        assert float(row["best val/acc"]) == pytest.approx(max(accs), abs=5e-5)
        assert float(row["final val/acc"]) == pytest.approx(accs[-1], abs=5e-5)
        assert int(row["epochs"]) == len(accs)


@pytest.mark.slow
def test_sweep_groups_children_under_one_parent_with_a_comparison(tmp_path):
    client, parent, kids, sweep_dir, proc = _sweep(tmp_path, "scheduler=step,cosine", "freeze.depth=0,-1")
    assert len(kids) == 4 and parent.info.status == "FINISHED"
    combos = {(k.data.tags["scheduler"], k.data.params["freeze.depth"]) for k in kids}
    assert combos == {("step", "0"), ("step", "-1"), ("cosine", "0"), ("cosine", "-1")}
    assert all(k.info.status == "FINISHED" and "scheduler=" in k.data.tags["overrides"] for k in kids)
    table = _table(sweep_dir)
    assert [c for c in table[0] if c in ("scheduler", "freeze.depth")] == ["scheduler", "freeze.depth"]
    _check_table_matches_children(client, kids, table)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.png", "comparison.csv", "comparison_runs.csv", "comparison.md"} <= artifacts
    assert (sweep_dir / "comparison.png").stat().st_size > 20_000
    assert "Winner:" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout
    assert f"#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}?workflowType=machine_learning" in proc.stdout
    _check_champion(client, parent, kids)


def _check_champion(client, parent, kids):
    """The winner is registered (its best.pt logged, as the jobs logged no model), alias champion:
    `models:/tunelab@champion` computes what the winner's best.pt does."""
    import torch

    from tunelab import trained

    version = client.get_model_version_by_alias("tunelab", "champion")
    winner = next(k for k in kids if k.info.run_id == version.run_id)
    best = max(v for _, v in metric_series(client, winner.info.run_id, "val/acc"))
    assert version.tags["tunelab.sweep_run"] == parent.info.run_id
    assert float(version.tags["best val/acc"]) == pytest.approx(best, abs=1e-6)
    winner_label = client.get_run(parent.info.run_id).data.tags["tunelab.winner"]
    assert version.tags["tunelab.configuration"] == winner_label
    assert float(version.tags["test/acc"]) == pytest.approx(winner.data.metrics["test/acc"], abs=1e-6)
    champion = trained.from_uri("models:/tunelab@champion", torch.device("cpu"), client).classifier
    checkpoint = trained.from_checkpoint(f"{winner.data.tags['tunelab.job_dir']}/best.pt", torch.device("cpu")).classifier
    x = torch.randn(3, 3, champion.info.image_size, champion.info.image_size)
    assert torch.allclose(champion.probabilities(x), checkpoint.probabilities(x), atol=1e-6)


@pytest.mark.slow
def test_joblib_sweep_is_grouped_too_and_a_failed_job_is_listed(tmp_path):
    client, parent, kids, sweep_dir, _ = _sweep(
        tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "scheduler=step,cosine", "optimizer.lr=0.05,-1", code=1
    )
    assert len(kids) == 4
    failed = [k for k in kids if k.info.status == "FAILED"]
    assert len(failed) == 2 and all("optimizer.lr=-1" in k.data.tags["tunelab.error"] for k in failed)
    table = _table(sweep_dir)
    _check_table_matches_children(client, kids, table)
    bad = [row for row in table if row["status"] == "FAILED"]
    assert len(bad) == 2 and all("optimizer.lr" in row["error"] and row["rank"] == "" for row in bad)
    assert "2 of 4 runs failed" in (sweep_dir / "comparison.md").read_text()


@pytest.mark.slow
def test_a_job_failing_mid_training_does_not_stop_the_sweep(tmp_path):
    # lr=1e6 blows the loss up to NaN during training: the job's run is FAILED, the next job runs
    client, parent, kids, sweep_dir, _ = _sweep(tmp_path, "optimizer.lr=1e6,0.05", "optimizer.momentum=0", code=1)
    statuses = {k.data.params["optimizer.lr"]: k.info.status for k in kids}
    assert statuses == {"1000000.0": "FAILED", "0.05": "FINISHED"}
    nan_run = next(k for k in kids if k.info.status == "FAILED")
    assert "training loss is" in nan_run.data.tags["tunelab.error"]
    _check_table_matches_children(client, kids, _table(sweep_dir))


def test_compare_on_demand(tmp_path, small_cfg, tracking_uri, monkeypatch):
    from tunelab import compare, run

    for lr in (0.05, 0.01):
        run.train(small_cfg(f"optimizer.lr={lr}"))
    out = tmp_path / "cmp"
    assert compare.main(["--tracking-uri", tracking_uri, "--all", "--out", str(out)]) == 0
    rows = _table(out)
    assert sorted(r["optimizer.lr"] for r in rows) == ["0.01", "0.05"]
    client, runs = mlflow_runs(tracking_uri)
    _check_table_matches_children(client, runs, rows)
    assert compare.main(["--tracking-uri", tracking_uri, "--out", str(out)]) == 2  # no sweep to compare


def test_optuna_search_config_composes():
    cfg = compose_config(["+hparams_search=optuna"])
    assert cfg.monitor == "val/acc"


@pytest.mark.slow
def test_optuna_search_runs_as_a_grouped_sweep(tmp_path):
    client, parent, kids, sweep_dir, _ = _sweep(tmp_path, "+hparams_search=optuna", "hydra.sweeper.n_trials=2")
    assert len(kids) == 2 and all(not math.isnan(float(r["best val/acc"])) for r in _table(sweep_dir))
