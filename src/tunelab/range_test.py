"""The LR range test: which learning rate to start from, measured on the model and data of a run.

It trains a copy of the model for at most `steps` optimizer steps while the learning rate grows
exponentially from `min_lr` to `max_lr`, smooths the loss, and stops early when the smoothed loss
exceeds `diverge` times its minimum (or is NaN). The suggestion is the learning rate where the
smoothed loss falls fastest against log(lr), looked for before the minimum of the loss; when the
curve is too short for that, the learning rate of the minimum divided by ten. The model given to
the test, the random number generators and the data order are left as they were, so the training
that follows starts from the original weights. `python -m tunelab.lr_find` runs it alone;
`optimizer.lr=auto` runs it before training (`tunelab.run`).
"""

from __future__ import annotations

import copy
import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig
from torch import nn

from tunelab import checkpoints, freezing
from tunelab.errors import require
from tunelab.loop import training_loss
from tunelab.optimizers import optimizer_factory

log = logging.getLogger(__name__)

#: Smoothing of the loss curve: each point is an exponential average with this weight on the past.
SMOOTHING = 0.9
#: The first steps, whose smoothed loss still depends on few batches, are not used for the suggestion.
SKIP_START = 5


@dataclass
class RangeTestOptions:
    """The test's settings (`lr_find.*` in the config) and whether it shows a progress bar."""

    min_lr: float = 1e-6
    max_lr: float = 1.0
    steps: int = 100
    diverge: float = 4.0
    progress: bool = True

    def __post_init__(self) -> None:
        require(0 < self.min_lr < self.max_lr, f"lr_find.min_lr={self.min_lr} and lr_find.max_lr={self.max_lr}: need 0 < min_lr < max_lr")
        require(isinstance(self.steps, int) and self.steps >= 2 * SKIP_START, f"lr_find.steps={self.steps} must be an integer >= {2 * SKIP_START}")
        require(self.diverge > 1, f"lr_find.diverge={self.diverge} must be > 1")

    def lr(self, step: int) -> float:
        return self.min_lr * (self.max_lr / self.min_lr) ** (step / (self.steps - 1))


@dataclass
class RangeTest:
    """What the test measured and what it suggests."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    suggestion: float = math.nan
    rule: str = ""
    stopped: str = ""

    def plot(self):
        from tunelab.plots import pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
        ax.plot(self.lrs, self.losses, color="0.75", linewidth=1, label="loss per step")
        ax.plot(self.lrs, self.smoothed, color="C0", linewidth=2, label="smoothed loss")
        ax.axvline(self.suggestion, color="C3", linestyle="--", label=f"suggested lr {self.suggestion:.3g}")
        ax.set_xscale("log")
        finite = [v for v in self.smoothed if math.isfinite(v)]
        if finite:  # the diverging tail would squash the interesting part
            low = min(finite + [v for v in self.losses if math.isfinite(v)])
            high = max(finite[: max(SKIP_START, 1)] + [min(finite) * 1.5])
            ax.set_ylim(low - 0.1 * (high - low) - 1e-3, high + 0.3 * (high - low) + 1e-3)
        ax.set(xlabel="learning rate (log scale)", ylabel="training loss")
        ax.set_title(f"LR range test: suggested lr {self.suggestion:.3g}, the {self.rule}\n{self.stopped}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        return fig

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "lr", "loss", "smoothed_loss"])
            writer.writerows(zip(range(len(self.lrs)), self.lrs, self.losses, self.smoothed))


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, str]:
    """The lr of the steepest fall of the smoothed loss (against log lr) before its minimum."""
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    require(finite, "the LR range test measured no finite loss; lower lr_find.min_lr")
    lowest = min(finite, key=lambda i: smoothed[i])
    start = min(SKIP_START, lowest)
    if lowest - start >= 2:
        slopes = {
            i: (smoothed[i + 1] - smoothed[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
            for i in range(max(start, 1), lowest)
        }
        steepest = min(slopes, key=slopes.get)
        if slopes[steepest] < 0:
            return lrs[steepest], "steepest fall of the smoothed loss against log(lr), before its minimum"
    return max(lrs[lowest] / 10, lrs[0]), "lr of the lowest smoothed loss / 10, at least the smallest lr tried (no clear fall before the minimum)"


def range_test(model: nn.Module, loader, groups: list[dict], make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
               device: torch.device, options: RangeTestOptions, forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]) -> RangeTest:
    """Run the test on a deep copy of `model` (its train/eval modes kept) and return the curve.

    `groups` are the optimizer's param groups over `model`'s parameters; an entry "lr" in a group is
    taken as a multiple of the base lr relative to the first group (layer decay keeps its ratios).
    `forward(model, x, y)` returns the loss to minimise.
    """
    rng = checkpoints.rng_state()
    probe = copy.deepcopy(model)
    names = {id(p): n for n, p in model.named_parameters()}
    copied = dict(probe.named_parameters())
    base = groups[0].get("lr", 1.0)
    probe_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [copied[names[id(p)]] for p in g["params"]]} for g in groups]
    optimizer = make_optimizer(probe_groups)
    scales = [g.get("lr", base) / base for g in groups]
    try:
        result = _sweep(probe, loader, optimizer, scales, device, options, forward)
    finally:
        checkpoints.set_rng_state(rng)
        del probe, optimizer
    result.suggestion, result.rule = suggest(result.lrs, result.smoothed)
    log.info("LR range test: suggested lr %.4g (%s); %s", result.suggestion, result.rule, result.stopped)
    return result


def _sweep(probe, loader, optimizer, scales: list[float], device, options: RangeTestOptions, forward) -> RangeTest:
    """The optimizer steps of the test, the lr rising each step, until it ran them all or diverged."""
    from tqdm.auto import tqdm

    result, average, best, steps = RangeTest(), 0.0, math.inf, options.steps
    bar = tqdm(total=steps, desc="LR range test", disable=not options.progress, leave=False, dynamic_ncols=True)
    step, epoch = 0, 0
    try:
        while step < steps and not result.stopped:
            loader.sampler.set_epoch(epoch)
            for x, y in loader:
                lr = options.lr(step)
                for g, scale in zip(optimizer.param_groups, scales):
                    g["lr"] = lr * scale
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = forward(probe, x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = loss.item()
                average = SMOOTHING * average + (1 - SMOOTHING) * value
                smooth = average / (1 - SMOOTHING ** (step + 1))
                result.lrs.append(lr)
                result.losses.append(value)
                result.smoothed.append(smooth)
                bar.update()
                bar.set_postfix(lr=f"{lr:.3g}", loss=f"{smooth:.4f}", refresh=False)
                step += 1
                best = min(best, smooth)
                result.stopped = _stop_reason(step, steps, value, smooth, best, lr, options.diverge)
                if result.stopped or step >= steps:
                    break
            epoch += 1
    finally:
        bar.close()
    result.stopped = result.stopped or f"ran all {steps} steps up to lr {options.max_lr:.3g} without diverging"
    return result


def _stop_reason(step: int, steps: int, value: float, smooth: float, best: float, lr: float, diverge: float) -> str:
    if not math.isfinite(smooth):
        return f"stopped after {step} of {steps} steps: the loss is {value} at lr {lr:.3g}"
    if step > SKIP_START and smooth > diverge * best:
        return f"stopped after {step} of {steps} steps: the smoothed loss exceeded {diverge:g} x its minimum (diverged) at lr {lr:.3g}"
    return ""


def for_config(cfg: DictConfig, prepared, device: torch.device) -> RangeTest:
    """The range test on a copy of what this config would train (`prepared`: `tunelab.prepare.Prepared`)."""
    freezing.train_mode(prepared.model, prepared.plan)  # the copy keeps frozen BatchNorm in eval mode
    if prepared.trained is not prepared.model:
        prepared.trained.train()
    groups = freezing.param_groups(prepared.plan, 1.0, cfg.optimizer.get("layer_decay"))
    precision, channels_last = str(cfg.trainer.precision), cfg.trainer.channels_last

    def forward(module, x, y):
        return training_loss(module, x, y, prepared.loss_fn, device, precision, channels_last)[1]

    o = cfg.lr_find
    options = RangeTestOptions(o.min_lr, o.max_lr, o.steps, o.diverge, progress=cfg.trainer.progress)
    return range_test(prepared.trained, prepared.fit_train, groups, optimizer_factory(cfg.optimizer, 1.0), device, options, forward)


def write(result: RangeTest, folder: Path | None):
    """The test's plot (returned, for the caller to close) and, given a folder, lr_find.png and
    lr_find.csv in it."""
    fig = result.plot()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(folder / "lr_find.png", dpi=120)
        result.write_csv(folder / "lr_find.csv")
    return fig


def log_to(logger, result: RangeTest, fig, folder: Path | None) -> None:
    """The test in an MLflow run: the plot, the curve's CSV (when written), the rule and the suggestion."""
    logger.log_figure(fig, "lr_find.png")
    if folder is not None:
        logger.log_artifact(folder / "lr_find.csv")
    logger.set_tag("tunelab.lr_find.rule", result.rule)
    logger.log_metrics({"lr_find/suggested_lr": result.suggestion}, step=0)
