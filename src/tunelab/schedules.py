"""Learning-rate schedules: torch's schedulers, stepped at the right moments, with warmup for any.

The config names a torch scheduler (`_target_`, `_partial_: true`); `build` completes it with the
optimizer and the lengths that depend on the run (`T_max`, `total_steps`, CyclicLR's step size,
milestones in epochs), leaving every value the user set explicitly as it is. The keys tunelab adds
(`interval`, `warmup_epochs`, `warmup_start_factor`, `monitor`) are removed before instantiation.

Warmup: for the first `round(warmup_epochs * steps_per_epoch)` optimizer steps a LinearLR ramps the
lr from `warmup_start_factor` times the scheduler's first lr up to that lr; then the chosen scheduler
starts from its own step 0. Epoch-interval schedulers (and `plateau`) take their first step at the
end of the first epoch in which they were active.

Compositions (`scheduler=sequential`, `scheduler=chained`, see `tunelab.compositions`) are built
from their parts the same way, each part's lengths from its own segment, and run as torch's
SequentialLR or ChainedScheduler; a plateau last in a sequence is stepped here, after validation.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ChainedScheduler, LinearLR, ReduceLROnPlateau, SequentialLR

from tunelab import compositions
from tunelab.choices import EPOCH_METRICS
from tunelab.compositions import Part
from tunelab.errors import ConfigError, build, require
from tunelab.metrics import lower_is_better

log = logging.getLogger(__name__)

#: Keys of a scheduler config that tunelab reads and torch does not take.
TUNELAB_KEYS = ("interval", "warmup_epochs", "warmup_start_factor", "monitor")
#: Param-group entries that hold a learning rate (set by the optimizer and by schedulers).
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr", "swa_lr")


def step_decay(epoch: int, every: int = 30, factor: float = 0.1) -> float:
    """The classic rule `lr = base_lr * 0.1 ** (epoch // 30)`, as a LambdaLR multiplier.

    Any function of the epoch (or step) returning a multiplier of the base lr plugs in the same way:
    `scheduler=lambda scheduler.lr_lambda._target_=mypackage.my_decay`.
    """
    return factor ** (epoch // every)


def inverse_time(step: int, rate: float = 0.1) -> float:
    """Inverse-time decay, `1 / (1 + rate * step)`: the default function of `scheduler=lambda`."""
    return 1.0 / (1.0 + rate * step)


def constant_factor(step: int, factor: float = 0.95) -> float:
    """The same multiplier at every call: with MultiplicativeLR, lr *= factor each interval."""
    return factor


def _has_momentum(optimizer: Optimizer) -> bool:
    return optimizer.defaults.get("momentum", 0) > 0


def _fill_lengths(
    kwargs: dict[str, Any], target: str, optimizer: Optimizer, units: int, steps_per_epoch: int, interval: str, max_epochs: int,
    key: str = "scheduler",
) -> dict[str, Any]:
    """Complete the run-dependent lengths the user left null; explicit values win.

    `units` is the length of the schedule (or of a composition's part) in scheduler steps, `key`
    where its config is (scheduler, or scheduler.parts.N), for messages.
    """
    name = target.rsplit(".", 1)[-1]
    per_epoch = steps_per_epoch if interval == "step" else 1

    def unset(k: str) -> bool:
        return k in kwargs and kwargs[k] is None

    if name == "CosineAnnealingLR" and unset("T_max"):
        kwargs["T_max"] = units
    if name in ("PolynomialLR", "LinearLR", "ConstantLR") and unset("total_iters"):
        kwargs["total_iters"] = units
    if name == "OneCycleLR":
        if unset("total_steps"):
            kwargs["total_steps"] = units
        if unset("max_lr"):
            kwargs["max_lr"] = [g["lr"] for g in optimizer.param_groups]
    if name == "CosineAnnealingWarmRestarts" and unset("T_0"):
        kwargs["T_0"] = max(1, units // 3)
    if name == "CyclicLR":
        if unset("base_lr"):
            kwargs["base_lr"] = [g["lr"] / 10 for g in optimizer.param_groups]
        if unset("max_lr"):
            kwargs["max_lr"] = [g["lr"] for g in optimizer.param_groups]
        if unset("step_size_up"):
            kwargs["step_size_up"] = max(1, units // 4)
        if kwargs.get("cycle_momentum", True) and not _has_momentum(optimizer):
            log.info("CyclicLR: %s has no momentum to cycle; cycle_momentum=false", type(optimizer).__name__)
            kwargs["cycle_momentum"] = False
    if name in ("StepLR", "MultiStepLR", "ExponentialLR") and isinstance(kwargs.get("gamma"), (int, float)):
        require(kwargs["gamma"] > 0, f"{key}.gamma must be > 0 (the lr is multiplied by it), got {kwargs['gamma']}")
    if name == "StepLR" and kwargs.get("step_size") is not None:
        require(_positive(kwargs["step_size"]), f"{key}.step_size must be a number of epochs > 0, got {kwargs['step_size']!r}")
        kwargs["step_size"] = max(1, int(round(kwargs["step_size"] * per_epoch)))
    if name == "MultiStepLR":
        if kwargs.get("milestones") is None:  # half and three quarters of the run, once each in a short run
            kwargs["milestones"] = sorted({m for m in (max_epochs // 2, (3 * max_epochs) // 4) if m > 0})
        kwargs["milestones"] = [int(round(m * per_epoch)) for m in kwargs["milestones"]]
    decay = kwargs.get("lr_lambda") if name == "LambdaLR" else None
    if isinstance(decay, dict) and decay.get("_target_") == f"{__name__}.{step_decay.__name__}" and decay.get("every") is not None:
        every = decay["every"]
        require(_positive(every), f"{key}.lr_lambda.every must be a number of epochs > 0, got {every!r}")
        decay["every"] = max(1, int(round(every * per_epoch)))  # the function counts the scheduler's steps
    return kwargs


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _owned(scheduler) -> list:
    """A scheduler and, for torch's compositions, every scheduler inside it."""
    inner = getattr(scheduler, "_schedulers", None) or []
    return [scheduler, *(s for child in inner for s in _owned(child))]


class Schedule:
    """A torch scheduler with its calling contract and an optional linear warmup before it.

    - `after_optimizer_step()`: call right after every `optimizer.step()`. Steps the warmup, then
      (with `interval="step"`) the scheduler, once per optimizer step.
    - `after_epoch(metrics)`: call after validation at the end of every epoch. Steps an
      epoch-interval scheduler; `ReduceLROnPlateau` gets `metrics[monitor]`.

    A ReduceLROnPlateau is the `tail`: alone it is the whole schedule; last in a sequence it takes
    over once `scheduler` has taken `tail_start` steps, and is stepped once per epoch from then on.
    `hand_over()` stops all stepping for good: SWA's SWALR sets the lr from then on (and, as
    `successor`, gets the entries of param groups added later).
    """

    def __init__(self, optimizer, scheduler, interval: str, warmup_steps: int = 0, warmup_start_factor: float = 0.1, monitor: str | None = None,
                 resolved: Mapping[str, Any] | None = None, tail: ReduceLROnPlateau | None = None, tail_start: int = 0):
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler, tail = None, scheduler
        self.optimizer, self.scheduler, self.interval, self.monitor = optimizer, scheduler, interval, monitor
        self.tail, self.tail_start = tail, tail_start
        self.warmup_steps = warmup_steps
        #: Every argument the torch scheduler received (those tunelab filled in included, in the
        #: units it counts), its interval and the warmup's steps: what rebuilds the schedule.
        self.resolved = dict(resolved or {})
        self.warmup = LinearLR(optimizer, warmup_start_factor, 1.0, total_iters=warmup_steps) if warmup_steps else None
        self.steps = 0  # optimizer steps, warmup included
        self.scheduler_steps = 0  # steps of the schedule after warmup (the tail's included)
        self.handed_over = False
        self.successor = None

    def after_optimizer_step(self) -> None:
        self.steps += 1
        if self.handed_over:
            return
        if self.steps <= self.warmup_steps:
            self.warmup.step()
        elif self.interval == "step":
            self._step(None)

    def after_epoch(self, metrics: Mapping[str, float]) -> None:
        if self.handed_over or self.steps <= self.warmup_steps:
            return
        if self.interval == "epoch":
            self._step(metrics)
        elif self.tail is not None and self.scheduler_steps > self.tail_start:  # the tail ran in this epoch
            self.tail.step(metrics[self.monitor])

    def _step(self, metrics: Mapping[str, float] | None) -> None:
        if self.tail is None or self.scheduler_steps < self.tail_start:
            self.scheduler.step()
        elif metrics is not None:
            self.tail.step(metrics[self.monitor])
        self.scheduler_steps += 1

    def hand_over(self) -> None:
        """Stop stepping: another scheduler sets the lr from now on."""
        self.handed_over = True

    def add_param_group(self, name: str, params: list, scale: float) -> None:
        """Add a param group mid-run (gradual unfreezing) whose lr follows the schedule from now on.

        The group copies group 0's settings with every lr-valued entry scaled by `scale` (1, or
        layer_decay**k). Torch schedulers keep one entry per group in lists (`base_lrs`,
        `max_lrs`, `lr_lambdas`, ...); each gets group 0's entry appended, scaled when it is an lr,
        so the new group's lr stays `scale` x group 0's at every later step. A composition's own
        lists (its parts, its milestones) are not per group: only its parts' are extended.
        """
        n = len(self.optimizer.param_groups)
        template = self.optimizer.param_groups[0]
        group = {k: (v * scale if k in _LR_KEYS else v) for k, v in template.items() if k not in ("params", "name")}
        self.optimizer.add_param_group({**group, "name": name, "params": params})
        for scheduler in (*_owned(self.scheduler), self.tail, self.warmup, self.successor):
            if scheduler is None:
                continue
            composite = isinstance(scheduler, (SequentialLR, ChainedScheduler))
            for attr, value in vars(scheduler).items():
                if isinstance(value, list) and len(value) == n and (not composite or attr == "_last_lr"):
                    first = value[0]
                    value.append(first * scale if "lr" in attr and isinstance(first, (int, float)) else first)

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "scheduler_steps": self.scheduler_steps,
            "handed_over": self.handed_over,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "tail": self.tail.state_dict() if self.tail is not None else None,
            "warmup": self.warmup.state_dict() if self.warmup else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = state["steps"]
        self.scheduler_steps = state.get("scheduler_steps", 0)
        self.handed_over = state.get("handed_over", False)
        if "tail" not in state and self.scheduler is None:  # a checkpoint from before compositions: plateau alone
            state = {**state, "tail": state["scheduler"], "scheduler": None}
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.tail is not None:
            self.tail.load_state_dict(state["tail"])
        if self.warmup is not None:
            self.warmup.load_state_dict(state["warmup"])


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps of warmup: `round(warmup_epochs * steps_per_epoch)`."""
    return int(round(warmup_epochs * steps_per_epoch))


def _check_plateau(part: Part) -> str:
    """The monitor of a plateau part, checked against what the loop logs and the part's mode."""
    monitor = part.cfg.get("monitor")
    require(monitor in EPOCH_METRICS, f"{part.key}.monitor={monitor} is never logged; use one of {', '.join(EPOCH_METRICS)}")
    require(not monitor.endswith("_swa"), f"{part.key}.monitor={monitor}: SWA takes the lr over when its metrics begin; watch val/loss or val/acc")
    mode = part.cfg.get("mode", "min")
    require(
        mode == ("min" if lower_is_better(monitor) else "max"),
        f"{part.key}.mode={mode} does not fit {part.key}.monitor={monitor}: use mode=max for an accuracy or F1, min for a loss",
    )
    return monitor


def _kwargs(part: Part) -> dict[str, Any]:
    try:
        container = OmegaConf.to_container(part.cfg, resolve=True, throw_on_missing=True)
    except Exception as err:  # ??? left in a config, or a broken interpolation
        raise ConfigError(f"{part.key}: {err}".splitlines()[0]) from None
    return {k: v for k, v in container.items() if k not in TUNELAB_KEYS and not k.startswith("_")}


def _build_part(part: Part, optimizer: Optimizer, units: int, steps_per_epoch: int, interval: str, max_epochs: int) -> tuple[Any, dict]:
    """One torch scheduler of `units` scheduler steps, and the arguments it got."""
    kwargs = _fill_lengths(_kwargs(part), part.cfg._target_, optimizer, max(1, units), steps_per_epoch, interval, max_epochs, part.key)
    for key, value in kwargs.items():
        require(value is not None, f"{part.key}.{key} needs a value for {part.name}: set {part.key}.{key}=...")
    node = OmegaConf.create({"_target_": part.cfg._target_, "_convert_": "all", **kwargs})
    return build(node, part.key, optimizer=optimizer), {"_target_": part.cfg._target_, **kwargs}


def _interval(cfg: DictConfig, alone_plateau: bool) -> tuple[str, int, float]:
    interval = "epoch" if alone_plateau else cfg.get("interval", "step")
    require(interval in ("step", "epoch"), f"scheduler.interval must be 'step' or 'epoch', got {interval!r}")
    warmup_epochs = cfg.get("warmup_epochs", 0) or 0
    start_factor = cfg.get("warmup_start_factor", 0.1)
    require(isinstance(warmup_epochs, (int, float)) and warmup_epochs >= 0, f"scheduler.warmup_epochs must be a number >= 0, got {warmup_epochs!r}")
    require(0 < start_factor <= 1, f"scheduler.warmup_start_factor must be in (0, 1], got {start_factor}")
    return interval, warmup_epochs, start_factor


def build_schedule(cfg: DictConfig, optimizer: Optimizer, steps_per_epoch: int, max_epochs: int) -> Schedule:
    """Build the configured scheduler on `optimizer` for a run of `max_epochs` x `steps_per_epoch`."""
    composition = compositions.kind(cfg.get("_target_", ""))
    parts = compositions.parts(cfg) if composition else [Part("scheduler", "", cfg)]
    interval, warmup_epochs, start_factor = _interval(cfg, composition is None and parts[0].plateau)
    require(
        warmup_epochs < max_epochs,
        f"scheduler.warmup_epochs={warmup_epochs} must be shorter than the run (trainer.max_epochs={max_epochs})",
    )
    monitor = _check_plateau(parts[-1]) if parts[-1].plateau else None
    w = warmup_steps(warmup_epochs, steps_per_epoch)
    units = max(1, steps_per_epoch * max_epochs - w if interval == "step" else max_epochs - w // steps_per_epoch)
    per = steps_per_epoch if interval == "step" else 1
    milestones = compositions.milestone_units(cfg, len(parts), units, per) if composition == "sequential" else []
    lengths = compositions.segments(milestones, units) if composition == "sequential" else [units] * len(parts)
    built, resolved_parts = [], []
    for part, length in zip(parts, lengths):
        epochs = max_epochs if composition is None else compositions.epochs_of(length, per)
        scheduler, args = _build_part(part, optimizer, length, steps_per_epoch, interval, epochs)
        built.append(scheduler)
        resolved_parts.append(args)
    tail = built.pop() if parts[-1].plateau else None
    if composition == "sequential" and len(built) > 1:
        scheduler = SequentialLR(optimizer, built, milestones=milestones[: len(built) - 1])
    elif composition == "chained":
        scheduler = ChainedScheduler(built, optimizer=optimizer)
    else:
        scheduler = built[0] if built else None
    tail_start = milestones[-1] if tail is not None and built else 0
    log.info("Instantiating scheduler <%s> (interval=%s, warmup %d steps)", cfg.get("_target_"), interval, w)
    if composition:
        described = {"parts": resolved_parts, **({"milestones": milestones} if milestones else {})}
    else:
        described = {k: v for k, v in resolved_parts[0].items() if k != "_target_"}
    resolved = {**described, "interval": interval, "warmup_steps": w, "warmup_start_factor": start_factor}
    return Schedule(optimizer, scheduler, interval, w, start_factor, monitor, resolved, tail, tail_start)
