"""scheduler=sequential and scheduler=chained log what torch's own SequentialLR and ChainedScheduler
compute from the same parts; a composition torch cannot run is refused before training."""

from __future__ import annotations

import pytest
import torch
from torch.optim.lr_scheduler import (ChainedScheduler, ConstantLR, CosineAnnealingLR, ExponentialLR, LinearLR,
                                      ReduceLROnPlateau, SequentialLR, StepLR)

from conftest import compose_config, metric_series, mlflow_runs
from test_schedules import EPOCHS, LR, SPE, TINY, WARMUP, _with_warmup
from tunelab import run
from tunelab.errors import ConfigError
from tunelab.preview import lr_series
from tunelab.schedules import build_schedule

#: Milestones (epochs) that fit the tiny run with either interval, warmup or not.
MILESTONES = {"step": [0.5, 1.5], "epoch": [1, 2]}


def _reference(name: str, warmup_steps: int, interval: str) -> list[float]:
    """torch's own composition of the parts, on a plain optimizer, plus the documented warmup."""
    per = SPE if interval == "step" else 1
    units = SPE * EPOCHS - warmup_steps if interval == "step" else EPOCHS - warmup_steps // SPE
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR, momentum=0.9)
    if name == "sequential":  # linear warmup -> cosine -> constant tail, each part the length of its segment
        m = [int(round(e * per)) for e in MILESTONES[interval]]
        parts = [LinearLR(opt, 0.1, 1.0, total_iters=m[0]), CosineAnnealingLR(opt, T_max=m[1] - m[0]),
                 ConstantLR(opt, factor=0.01, total_iters=units - m[1])]
        sched = SequentialLR(opt, parts, milestones=m)
    else:  # step decay every epoch (x0.5) chained with an exponential decay (x0.9 per interval)
        sched = ChainedScheduler([StepLR(opt, step_size=per, gamma=0.5), ExponentialLR(opt, gamma=0.9)], optimizer=opt)
    main = []
    for _ in range(units):
        main.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return _with_warmup(main, 0.1, warmup_steps, interval)


def _overrides(name: str, interval: str) -> list[str]:
    if name == "sequential":
        return [f"scheduler.milestones=[{','.join(map(str, MILESTONES[interval]))}]"]
    return ["+scheduler.parts.0.step_size=1"]


@pytest.mark.parametrize("interval", ["step", "epoch"])
@pytest.mark.parametrize("warmup", [0.0, WARMUP])
@pytest.mark.parametrize("name", ["sequential", "chained"])
def test_composition_logs_torchs_composition(name, warmup, interval, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_config([*TINY, f"scheduler={name}", f"scheduler.warmup_epochs={warmup}", f"scheduler.interval={interval}",
                          *_overrides(name, interval)], uri)
    run.train(cfg)
    client, runs = mlflow_runs(uri)
    logged = metric_series(client, runs[-1].info.run_id, "lr")
    assert [s for s, _ in logged] == list(range(SPE * EPOCHS))
    expected = _reference(name, int(round(warmup * SPE)), interval)
    assert [v for _, v in logged] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert len(set(round(v, 12) for _, v in logged)) >= 3  # the parts really change the lr
    assert lr_series(cfg, SPE) == pytest.approx([v for _, v in logged], rel=1e-12)  # the preview draws the same
    params = runs[-1].data.params
    assert "CosineAnnealingLR" in params["resolved.scheduler.parts"] or name == "chained"


def test_a_plateau_ends_a_sequence_and_cuts_after_its_patience():
    cfg = compose_config(["scheduler=sequential", f"optimizer.lr={LR}", "trainer.max_epochs=6",
                          "scheduler.parts=[{option: linear, start_factor: 0.5, end_factor: 1.0}, {option: plateau, patience: 0}]",
                          "scheduler.milestones=[2]", "scheduler.interval=epoch"], "sqlite://")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    schedule = build_schedule(cfg.scheduler, opt, SPE, 6)
    lrs = []
    for _ in range(6):  # val/loss never improves after the first epoch
        lrs.append(opt.param_groups[0]["lr"])
        for _ in range(SPE):
            schedule.after_optimizer_step()
        schedule.after_epoch({"val/loss": 1.0})
    # epochs 0-1: the linear ramp (0.5 -> 0.75); then the plateau from the ramp's end (1.0): its first
    # metric is its best, and each flat epoch after it cuts x0.1
    assert lrs == pytest.approx([0.5 * LR, 0.75 * LR, LR, LR, 0.1 * LR, 0.01 * LR])
    assert isinstance(schedule.tail, ReduceLROnPlateau)


@pytest.mark.parametrize("name,extra", [("sequential", ["scheduler.milestones=[0.5,1.5]"]), ("chained", [])])
def test_resume_continues_a_composition(name, extra):
    cfg = compose_config(["scheduler=" + name, f"optimizer.lr={LR}", "trainer.max_epochs=4", "scheduler.warmup_epochs=0.5", *extra], "sqlite://")

    def fresh():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
        return opt, build_schedule(cfg.scheduler, opt, SPE, 4)

    def walk(opt, schedule, steps, start=0):
        lrs = []
        for s in range(start, steps):
            lrs.append(opt.param_groups[0]["lr"])
            schedule.after_optimizer_step()
            if (s + 1) % SPE == 0:
                schedule.after_epoch({})
        return lrs

    whole = walk(*fresh(), SPE * 4)
    opt, schedule = fresh()
    first = walk(opt, schedule, 7)
    state = {"optimizer": opt.state_dict(), "schedule": schedule.state_dict()}
    opt, schedule = fresh()
    opt.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    assert first + walk(opt, schedule, SPE * 4, start=7) == pytest.approx(whole, rel=1e-12)


def test_a_new_param_group_follows_a_composition_with_as_many_parts_as_groups():
    cfg = compose_config(["scheduler=chained", f"optimizer.lr={LR}", "trainer.max_epochs=4"], "sqlite://")
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": LR / 2}], lr=LR)
    schedule = build_schedule(cfg.scheduler, opt, SPE, 4)
    for _ in range(SPE):
        schedule.after_optimizer_step()
    schedule.after_epoch({})
    schedule.add_param_group("layer4", [torch.nn.Parameter(torch.zeros(1))], 0.25)
    assert len(schedule.scheduler._schedulers) == 2  # the parts list is not a per-group list
    for _ in range(2):
        for _ in range(SPE):
            schedule.after_optimizer_step()
        schedule.after_epoch({})
        group0, new = opt.param_groups[0]["lr"], opt.param_groups[2]["lr"]
        assert new == pytest.approx(0.25 * group0, rel=1e-12)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["scheduler=sequential", "scheduler.parts=[{option: plateau}, {option: cosine}]", "scheduler.milestones=[1]"], "scheduler.parts.0 (plateau)"),
        (["scheduler=chained", "scheduler.parts=[{option: step}, {option: plateau}]"], "scheduler.parts.1 (plateau)"),
        (["scheduler=sequential", "scheduler.milestones=[1]"], "scheduler.milestones"),
        (["scheduler=sequential", "scheduler.milestones=[1,9]"], "scheduler.milestones"),
        (["scheduler=sequential", "scheduler.milestones=[3,2]"], "scheduler.milestones"),
        (["scheduler=sequential", "scheduler.parts.1.option=nope"], "scheduler.parts.1.option"),
        (["scheduler=sequential", "scheduler.parts.1.option=chained"], "scheduler.parts.1.option"),
        (["scheduler=chained", "+scheduler.parts.0.interval=step"], "scheduler.parts.0.interval"),
        (["scheduler=chained", "+scheduler.parts.0.T_max=3"], "scheduler.parts.0"),
        (["scheduler=chained", "scheduler.parts.1.gamma=-1"], "scheduler.parts.1.gamma"),
        (["scheduler=sequential", "scheduler.parts=[{option: linear}, {option: plateau, mode: max}]", "scheduler.milestones=[1]"],
         "scheduler.parts.1.mode"),
    ],
)
def test_a_composition_torch_cannot_run_is_refused_before_training(overrides, key, small_cfg, tracking_uri):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        run.train(small_cfg(*overrides))
    assert mlflow_runs(tracking_uri)[1] == []  # nothing started
