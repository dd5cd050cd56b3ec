"""Freezing in a real run: frozen weights and statistics stay put, unfreezing and caching behave."""

from __future__ import annotations

import pytest
import torch

from conftest import metric_series, mlflow_runs
from tunelab import freezing, loop, models, run


def _spy_model(monkeypatch):
    """Capture the model a run trains, before and after."""
    seen = {}
    real_fit = loop.fit

    def spy(model, *args, **kwargs):
        seen["model"] = model
        seen["before"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(run, "fit", spy)
    return seen


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_frozen_weights_and_bn_statistics(bn, small_cfg, tracking_uri, monkeypatch):
    seen = _spy_model(monkeypatch)
    run.train(small_cfg("freeze.depth=2", f"freeze.bn={bn}"))
    after = seen["model"].state_dict()
    frozen = [k for k in after if k.split(".")[0] in ("conv1", "bn1", "layer1")]
    trainable = [k for k in after if k.split(".")[0] in ("layer2", "layer3", "layer4", "fc")]
    stats = [k for k in frozen if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in frozen if k not in stats and not k.endswith("num_batches_tracked")]
    assert weights and stats
    assert all(torch.equal(after[k], seen["before"][k]) for k in weights)
    stats_equal = all(torch.equal(after[k], seen["before"][k]) for k in stats)
    assert stats_equal == (bn == "eval")
    assert any(not torch.equal(after[k], seen["before"][k]) for k in trainable if k.endswith("weight"))


def test_run_logs_stage_table_and_frozen_names(small_cfg, tracking_uri):
    run.train(small_cfg("freeze.depth=2"))
    client, runs = mlflow_runs(tracking_uri)
    r = runs[0]
    assert r.data.params["freeze.frozen_stages"] == "stem,layer1"
    table = client.download_artifacts(r.info.run_id, "stages.txt")
    text = open(table).read()
    assert "stem" in text and "frozen" in text and "layer4" in text and "trainable" in text
    trainable = sum(p.numel() for n, p in models.torchvision_model("resnet18", 10).named_parameters() if n.split(".")[0] in ("layer2", "layer3", "layer4", "fc"))
    assert [v for _, v in metric_series(client, r.info.run_id, "trainable_params")] == [trainable, trainable]


def test_gradual_unfreezing_adds_groups_at_the_right_epochs(small_cfg, tracking_uri):
    run.train(small_cfg("freeze.depth=-1", "freeze.unfreeze_every=1", "optimizer.layer_decay=0.5",
                        "trainer.max_epochs=3", "scheduler=cosine", "freeze.cache_features=false"))
    client, runs = mlflow_runs(tracking_uri)
    rid = runs[0].info.run_id
    base = dict(metric_series(client, rid, "lr"))
    assert sorted(base) == list(range(12))
    layer4 = dict(metric_series(client, rid, "lr/layer4"))
    layer3 = dict(metric_series(client, rid, "lr/layer3"))
    assert sorted(layer4) == list(range(4, 12)) and sorted(layer3) == list(range(8, 12))
    assert all(layer4[s] == pytest.approx(base[s] * 0.5, rel=1e-9) for s in layer4)
    assert all(layer3[s] == pytest.approx(base[s] * 0.25, rel=1e-9) for s in layer3)
    assert dict(metric_series(client, rid, "lr/head")) == pytest.approx({s: base[s] for s in range(4, 12)})
    counts = [v for _, v in metric_series(client, rid, "trainable_params")]
    model = models.torchvision_model("resnet18", 10)
    numel = {k: sum(p.numel() for n, p in model.named_parameters() if n.startswith(k + ".")) for k in ("fc", "layer4", "layer3")}
    assert counts == [numel["fc"], numel["fc"] + numel["layer4"], numel["fc"] + numel["layer4"] + numel["layer3"]]


def test_lr_figure_draws_a_later_stage_from_the_step_it_joined():
    from tunelab import plots

    curves = {"head": [0.1] * 9, "layer4": [0.05] * 6, "layer3": [0.025] * 3}

    def starts(fig):
        return {line.get_label(): line.get_xdata()[0] for line in fig.axes[0].lines if not line.get_label().startswith("_")}

    assert starts(plots.lr_curves(curves, 3, end_together=True)) == {"head": 0, "layer4": 3, "layer3": 6}  # a run's groups
    assert starts(plots.lr_curves(curves, 3)) == {"head": 0, "layer4": 0, "layer3": 0}  # a preview's schedules


def test_unfreezing_follows_onecycle_and_plateau(small_cfg, tracking_uri):
    for scheduler in ("onecycle", "plateau", "cyclic"):
        run.train(small_cfg("freeze.depth=-1", "freeze.unfreeze_every=1", f"scheduler={scheduler}",
                            f"logger.experiment_name={scheduler}", "trainer.max_epochs=2"))
        client, runs = mlflow_runs(tracking_uri, scheduler)
        rid = runs[0].info.run_id
        base = dict(metric_series(client, rid, "lr"))
        assert dict(metric_series(client, rid, "lr/layer4")) == pytest.approx({s: base[s] for s in range(4, 8)})


def test_cached_features_train_the_head_exactly_as_without(small_cfg, tracking_uri):
    results = {}
    for cache in ("true", "false"):
        run.train(small_cfg("freeze=head", f"freeze.cache_features={cache}", f"logger.experiment_name=cache-{cache}"))
        client, runs = mlflow_runs(tracking_uri, f"cache-{cache}")
        rid = runs[0].info.run_id
        results[cache] = [v for _, v in metric_series(client, rid, "train/loss")] + [v for _, v in metric_series(client, rid, "val/loss")]
    assert results["true"] == pytest.approx(results["false"], rel=1e-4)


def test_feature_cache_is_off_where_it_would_be_wrong():
    def blocker(name="resnet18", depth=-1, bn="eval", deterministic=True, unfreeze=0):
        model = models.torchvision_model(name, 4)
        return freezing.feature_cache_blocker(model, freezing.freeze(model, depth, bn), deterministic, unfreeze)

    assert blocker() is None
    assert "augmentation" in blocker(deterministic=False)
    assert "BatchNorm" in blocker(bn="train")
    assert "unfreezing" in blocker(unfreeze=1)
    assert "head" in blocker(depth=2)
    assert "dropout" in blocker(name="mobilenet_v3_small")
    assert "auxiliary" in blocker(name="googlenet")
