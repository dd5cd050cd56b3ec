"""One run end to end: what it leaves in MLflow, and how it ends when something goes wrong."""

from __future__ import annotations

import pytest
import torch

from conftest import SMALL, metric_series, mlflow_runs, run_train
from tunelab import loop, run


@pytest.mark.slow
def test_train_py_leaves_the_contracted_run(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*SMALL, "trainer.limit_train_batches=5", "scheduler=cosine", "model=resnet18", "optimizer.lr=0.02"]
    proc = run_train(args, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]

    client, runs = mlflow_runs(uri)
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    tags = r.data.tags
    assert {k: tags[k] for k in ("model", "scheduler", "optimizer", "freeze", "data")} == {
        "model": "resnet18", "scheduler": "cosine", "optimizer": "sgd", "freeze": "none", "data": "digits",
    }
    assert "optimizer.lr=0.02" in tags["overrides"]
    params = r.data.params
    assert params["optimizer.lr"] == "0.02" and params["freeze.depth"] == "0" and params["trainer.max_epochs"] == "2"

    lrs = metric_series(client, r.info.run_id, "lr")
    losses = metric_series(client, r.info.run_id, "train/loss")
    assert [s for s, _ in lrs] == list(range(10)) == [s for s, _ in losses]
    # The same schedule computed by torch itself on a plain optimizer.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    expected = []
    for _ in range(10):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [v for _, v in lrs] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    for key in ("train/acc", "val/loss", "val/acc", "trainable_params"):
        assert [s for s, _ in metric_series(client, r.info.run_id, key)] == [0, 1], key
    assert all(0.0 <= v <= 1.0 for _, v in metric_series(client, r.info.run_id, "val/acc"))
    assert metric_series(client, r.info.run_id, "trainable_params")[0][1] == sum(
        p.numel() for p in __import__("torchvision").models.resnet18(num_classes=10).parameters()
    )

    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config.yaml", "lr_curve.png"} <= artifacts
    import mlflow.pytorch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # not mlflow.set_tracking_uri: it would outlast this test
    model = mlflow.pytorch.load_model(f"runs:/{r.info.run_id}/model")
    scores = model(torch.randn(3, 3, 32, 32))
    assert scores.shape == (3, 10)
    assert (tmp_path / "outputs" / "runs").is_dir()


def _status(uri):
    _, runs = mlflow_runs(uri)
    assert len(runs) == 1
    return runs[0]


def test_a_run_that_raises_is_failed_and_keeps_its_metrics(small_cfg, tracking_uri, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("forced failure in validation")

    monkeypatch.setattr(loop, "evaluate", broken)
    with pytest.raises(RuntimeError, match="forced failure"):
        run.train(small_cfg())
    r = _status(tracking_uri)
    assert r.info.status == "FAILED"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    assert len(client.get_metric_history(r.info.run_id, "lr")) == 4  # the epoch's steps arrived
    assert "lr_curve.png" in {a.path for a in client.list_artifacts(r.info.run_id)}


def test_an_interrupted_run_is_killed(small_cfg, tracking_uri, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "evaluate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run.train(small_cfg())
    assert _status(tracking_uri).info.status == "KILLED"


def test_feature_extraction_trains_only_the_head(small_cfg, tracking_uri, monkeypatch):
    seen = {}
    real_fit = loop.fit

    def spy(model, train_loader, val_loader, optimizer, *args, **kwargs):
        seen["optimized"] = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        history = real_fit(model, train_loader, val_loader, optimizer, *args, **kwargs)
        seen["after"] = dict(model.named_parameters())
        return history

    monkeypatch.setattr(run, "fit", spy)
    run.train(small_cfg("freeze=head", "freeze.cache_features=false"))
    assert seen["optimized"] == 512 * 10 + 10
    changed = {n for n, p in seen["after"].items() if not torch.equal(p.detach(), seen["before"][n])}
    assert changed == {"fc.weight", "fc.bias"}


def test_logger_none_runs_without_mlflow(small_cfg, tracking_uri):
    best = run.train(small_cfg("logger=none"))
    assert 0.0 <= best <= 1.0
    assert mlflow_runs(tracking_uri)[1] == []


@pytest.mark.slow
def test_bad_value_is_a_short_message(tmp_path):
    proc = run_train([*SMALL, "optimizer.lr=-1"], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'db'}"})
    assert proc.returncode == 2
    assert "optimizer.lr=-1" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_unknown_option_lists_the_valid_ones(tmp_path):
    proc = run_train(["scheduler=nope"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "cosine" in proc.stderr and "Traceback" not in proc.stderr
