"""Every scheduler option logs exactly the lr series torch computes, with and without warmup."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_config, metric_series, mlflow_runs, options
from tunelab import run
from tunelab.errors import ConfigError
from tunelab.preview import lr_series, steps_per_epoch
from tunelab.schedules import Schedule

SPE, EPOCHS, LR, WARMUP = 4, 4, 0.1, 1.5
TINY = [
    "model=mobilenet_v3_small", "data=fake", "data.dataset.train_size=32", "data.dataset.val_size=8",
    "data.batch_size=8", f"trainer.max_epochs={EPOCHS}", "trainer.device=cpu", "trainer.progress=false",
    "logger.log_model=false", "optimizer=sgd", f"optimizer.lr={LR}",
]
#: Per-option overrides that make a decay visible within the tiny run.
VISIBLE = {"step": ["scheduler.step_size=1"], "plateau": ["scheduler.patience=0"], "step_decay": ["scheduler.lr_lambda.every=1"]}
CASES = [
    (name, warmup, interval)
    for name in options("scheduler")
    if name not in ("sequential", "chained")  # compositions: test_composition_logs_torchs_composition
    for warmup in (0.0, WARMUP)
    for interval in ("step", "epoch")
    if not (name == "plateau" and interval == "step")
]


@pytest.fixture(scope="module")
def shared_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('sched') / 'mlflow.db'}"


def torch_reference(name: str, sched_cfg, warmup_steps: int, interval: str, val_losses: list[float]) -> list[float]:
    """The lr per optimizer step from torch's own scheduler on a plain optimizer, plus the documented
    warmup: W steps rising linearly from start_factor x (the scheduler's first lr), then the
    scheduler from its step 0; an epoch scheduler steps at the end of each epoch it was active in."""
    total = SPE * EPOCHS
    per = SPE if interval == "step" else 1
    units = total - warmup_steps if interval == "step" else EPOCHS - warmup_steps // SPE
    kw = {k: v for k, v in OmegaConf.to_container(sched_cfg, resolve=True).items()
          if k not in ("interval", "warmup_epochs", "warmup_start_factor", "monitor") and not k.startswith("_")}
    if "lr_lambda" in kw:
        kw["lr_lambda"] = instantiate(sched_cfg.lr_lambda)
    if name == "step_decay":  # its `every` counts epochs: with interval=step, that many epochs of steps
        kw["lr_lambda"] = instantiate(sched_cfg.lr_lambda, every=sched_cfg.lr_lambda.every * per)
    extra = {
        "cosine": {"T_max": units},
        "onecycle": {"max_lr": LR, "total_steps": units},
        "cyclic": {"base_lr": LR / 10, "max_lr": LR, "step_size_up": max(1, units // 4)},
        "cosine_restarts": {"T_0": max(1, units // 3)},
        "polynomial": {"total_iters": units},
        "linear": {"total_iters": units},
        "step": {"step_size": kw.get("step_size", 1) * per},
        "multistep": {"milestones": [EPOCHS // 2 * per, 3 * EPOCHS // 4 * per]},
    }.get(name, {})
    kw.update(extra)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR, momentum=0.9)
    sched = getattr(torch.optim.lr_scheduler, sched_cfg._target_.rsplit(".", 1)[-1])(opt, **kw)
    main = []
    n_main = units
    for k in range(n_main):
        main.append(opt.param_groups[0]["lr"])
        opt.step()
        if name == "plateau":  # its k-th step follows the k-th epoch it was active in, after the warmup's epochs
            done = k + warmup_steps // SPE
            sched.step(val_losses[done] if done < len(val_losses) else 0.0)
        else:
            sched.step()
    return _with_warmup(main, sched_cfg.warmup_start_factor, warmup_steps, interval)


def _with_warmup(main: list[float], f: float, warmup_steps: int, interval: str) -> list[float]:
    """The lr per optimizer step of the whole run, from the schedule's own lr per scheduler step."""
    first = main[0]
    expected = []
    for s in range(SPE * EPOCHS):
        if s < warmup_steps:
            expected.append(first * (f + (1 - f) * s / warmup_steps))
        elif interval == "step":
            expected.append(main[s - warmup_steps])
        else:
            active_epochs_done = sum(1 for e in range(s // SPE) if (e + 1) * SPE > warmup_steps)
            expected.append(main[active_epochs_done])
    return expected


@pytest.mark.parametrize("name,warmup,interval", CASES)
def test_logged_lr_equals_torch(name, warmup, interval, shared_uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment = f"{name}-{warmup}-{interval}"
    overrides = [*TINY, f"scheduler={name}", f"scheduler.warmup_epochs={warmup}", f"scheduler.interval={interval}",
                 f"logger.experiment_name={experiment}", *VISIBLE.get(name, [])]
    cfg = compose_config(overrides, shared_uri)
    run.train(cfg)
    client, runs = mlflow_runs(shared_uri, experiment)
    run_id = runs[-1].info.run_id
    logged = metric_series(client, run_id, "lr")
    assert [s for s, _ in logged] == list(range(SPE * EPOCHS))
    val_losses = [v for _, v in metric_series(client, run_id, "val/loss")]
    w = int(round(warmup * SPE))
    expected = torch_reference(name, cfg.scheduler, w, interval, val_losses)
    assert [v for _, v in logged] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    if name != "plateau":  # the preview steps the same schedule without data or model
        assert lr_series(cfg, steps_per_epoch(cfg)) == pytest.approx([v for _, v in logged], rel=1e-12)


def test_gradient_accumulation_counts_optimizer_steps(small_cfg, tracking_uri):
    cfg = small_cfg("trainer.accumulate_grad_batches=3", "trainer.limit_train_batches=7", "scheduler=cosine")
    run.train(cfg)
    client, runs = mlflow_runs(tracking_uri)
    logged = metric_series(client, runs[0].info.run_id, "lr")
    steps = math.ceil(7 / 3) * 2
    assert [s for s, _ in logged] == list(range(steps))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    expected = []
    for _ in range(steps):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [v for _, v in logged] == pytest.approx(expected, rel=1e-9)


def test_every_group_lr_is_logged_under_stable_names(small_cfg, tracking_uri):
    run.train(small_cfg("optimizer.layer_decay=0.5", "freeze.depth=3", "scheduler=onecycle"))
    client, runs = mlflow_runs(tracking_uri)
    run_id = runs[0].info.run_id
    base = [v for _, v in metric_series(client, run_id, "lr")]
    for k, stage in enumerate(["head", "layer4", "layer3"]):
        series = metric_series(client, run_id, f"lr/{stage}")
        assert [s for s, _ in series] == list(range(len(base)))
        assert [v for _, v in series] == pytest.approx([b * 0.5**k for b in base], rel=1e-9)
    assert not client.get_metric_history(run_id, "lr/layer2")


def _plateau(metrics: list[float], patience: int = 2) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1, patience=patience, threshold=0.0)
    schedule = Schedule(opt, sched, "epoch", monitor="val/loss")
    lrs = []
    for value in metrics:
        schedule.after_optimizer_step()
        schedule.after_epoch({"val/loss": value, "val/acc": 0.0})
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_plateau_reduces_only_after_a_plateau():
    # improving for 4 epochs: no cut; then flat: cut after patience+1 flat epochs, and only once per plateau
    lrs = _plateau([5, 4, 3, 2, 2, 2, 2, 1.5, 1.0])
    assert lrs == pytest.approx([1, 1, 1, 1, 1, 1, 0.1, 0.1, 0.1])


def test_cyclic_with_adam_does_not_cycle_momentum(small_cfg, tracking_uri):
    run.train(small_cfg("scheduler=cyclic", "optimizer=adam"))
    _, runs = mlflow_runs(tracking_uri)
    assert runs[0].info.status == "FINISHED"


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["optimizer.lr=-0.1"], "optimizer.lr"),
        (["optimizer.lr=0"], "optimizer.lr"),
        (["scheduler=step", "scheduler.step_size=null"], "scheduler.step_size"),
        (["scheduler.warmup_epochs=5"], "scheduler.warmup_epochs"),
        (["scheduler=plateau", "scheduler.monitor=val/f1"], "scheduler.monitor"),
        (["scheduler=plateau", "scheduler.monitor=val/acc"], "scheduler.mode"),
        (["scheduler=cosine", "scheduler.interval=batch"], "scheduler.interval"),
        (["scheduler=cosine", "+scheduler.not_a_key=1"], "scheduler"),
        (["scheduler=step", "scheduler.step_size=0"], "scheduler.step_size"),
        (["scheduler=step", "scheduler.gamma=-1"], "scheduler.gamma"),
        (["scheduler=exponential", "scheduler.gamma=0"], "scheduler.gamma"),
        (["scheduler=step_decay", "scheduler.lr_lambda.every=0"], "scheduler.lr_lambda.every"),
    ],
)
def test_bad_scheduler_input_names_the_key_before_training(overrides, key, small_cfg, tracking_uri):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run.train(small_cfg(*overrides))
    assert mlflow_runs(tracking_uri)[1] == []  # nothing started


@pytest.mark.slow
def test_preview_cli_draws_several_schedulers(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "preview"
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab.preview", "scheduler=step,cosine,onecycle,cosine_restarts", "trainer.max_epochs=90", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.with_suffix(".png").stat().st_size > 10_000
    header, *rows = out.with_suffix(".csv").read_text().splitlines()
    assert header.split(",") == ["step", "epoch", "lr step", "lr cosine", "lr onecycle", "lr cosine_restarts"]
    assert len(rows) == 90 * 17  # 1,077 training images (after the test and val splits) in batches of 64


def test_multistep_default_milestones_decay_once_each_in_a_short_run():
    cfg = compose_config(["scheduler=multistep", "trainer.max_epochs=2", f"optimizer.lr={LR}"], "sqlite://")
    assert lr_series(cfg, SPE) == pytest.approx([LR] * SPE + [LR * 0.1] * SPE)  # one milestone, at epoch 1, not two


def test_step_decay_counts_epochs_with_either_interval():
    for interval in ("epoch", "step"):
        cfg = compose_config(["scheduler=step_decay", "scheduler.lr_lambda.every=2", f"scheduler.interval={interval}",
                              "trainer.max_epochs=5", f"optimizer.lr={LR}"], "sqlite://")
        per_epoch = [lr_series(cfg, SPE)[e * SPE] for e in range(5)]
        assert per_epoch == pytest.approx([LR, LR, LR * 0.1, LR * 0.1, LR * 0.01]), interval


def _rebuilt_lrs(params: dict[str, str], lr: float) -> list[float]:
    """The lr per optimizer step of a schedule rebuilt from nothing but a run's `resolved.*` params."""
    import ast

    prefix = "resolved.scheduler."
    args = {k[len(prefix):]: ast.literal_eval(v) if v[:1] in "[0123456789-" or v in ("True", "False") else v
            for k, v in params.items() if k.startswith(prefix)}
    target, interval = args.pop("_target_"), args.pop("interval")
    warmup, start_factor = args.pop("warmup_steps"), args.pop("warmup_start_factor")
    steps, per_epoch = int(params["resolved.trainer.total_steps"]), int(params["resolved.steps_per_epoch"])
    assert float(params["resolved.optimizer.lr"]) == lr
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    sched = getattr(torch.optim.lr_scheduler, target.rsplit(".", 1)[-1])(opt, **args)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor, 1.0, total_iters=warmup) if warmup else None  # from its first lr
    lrs = []
    for s in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if s < warmup:
            warm.step()
        elif interval == "step" or (s + 1) % per_epoch == 0:
            sched.step()
    return lrs


@pytest.mark.parametrize("name,interval,warmup", [("onecycle", "step", 1.5), ("cosine", "step", 0.0), ("multistep", "epoch", 1.0)])
def test_resolved_params_rebuild_the_logged_schedule(name, interval, warmup, shared_uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment = f"resolved-{name}"
    cfg = compose_config([*TINY, f"scheduler={name}", f"scheduler.interval={interval}", f"scheduler.warmup_epochs={warmup}",
                          f"logger.experiment_name={experiment}"], shared_uri)
    run.train(cfg)
    client, runs = mlflow_runs(shared_uri, experiment)
    params = runs[-1].data.params
    filled = {"onecycle": ("max_lr", "total_steps"), "cosine": ("T_max",), "multistep": ("milestones",)}[name]
    for key in filled:
        assert params[f"scheduler.{key}"] == "None"  # the config param stays as given ...
        assert params[f"resolved.scheduler.{key}"] != "None"  # ... and the value used is on record
    assert params["resolved.steps_per_epoch"] == str(SPE) and params["resolved.data.global_batch_size"] == "8"
    assert int(params["resolved.data.image_size"]) >= cfg.data.image_size
    logged = [v for _, v in metric_series(client, runs[-1].info.run_id, "lr")]
    assert logged == pytest.approx(_rebuilt_lrs(params, LR), rel=1e-9)
