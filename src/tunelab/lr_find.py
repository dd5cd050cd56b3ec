"""LR range test: which learning rate to start from, measured on your model and data.

    python -m tunelab.lr_find                                   # resnet18, full fine-tuning, digits
    python -m tunelab.lr_find model=mobilenet_v3_small freeze=head optimizer=adamw
    python train.py optimizer.lr=auto                           # run it first, then train with its suggestion

The test trains a copy of the model for at most `lr_find.steps` optimizer steps while the learning
rate grows exponentially from `lr_find.min_lr` to `lr_find.max_lr`, smooths the loss, and stops
early when the smoothed loss exceeds `lr_find.diverge` times its minimum (or is NaN). The suggestion
is the learning rate where the smoothed loss falls fastest against log(lr), looked for before the
minimum of the loss; when the curve is too short for that, the learning rate of the minimum divided
by ten. The model given to the test, the random number generators and the data order are left as
they were, so the training that follows starts from the original weights.

Writes lr_find.png and lr_find.csv (to --out) and, unless `logger=none`, an MLflow run tagged
`tunelab.kind=lr_find` with the plot, the curve and the suggestion.
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tunelab.errors import ConfigError, require

log = logging.getLogger(__name__)

#: Smoothing of the loss curve: each point is an exponential average with this weight on the past.
SMOOTHING = 0.9
#: The first steps, whose smoothed loss still depends on few batches, are not used for the suggestion.
SKIP_START = 5


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
        from tunelab.plots import _pyplot

        plt = _pyplot()
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


def range_test(
    model: nn.Module,
    loader,
    groups: list[dict],
    make_optimizer: Callable[[list[dict]], torch.optim.Optimizer],
    loss_fn: nn.Module,
    device: torch.device,
    *,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    steps: int = 100,
    diverge: float = 4.0,
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> RangeTest:
    """Run the test on a deep copy of `model` (its train/eval modes kept) and return the curve.

    `groups` are the optimizer's param groups over `model`'s parameters; an entry "lr" in a group is
    taken as a multiple of the base lr relative to the first group (layer decay keeps its ratios).
    `forward(model, x, y)` returns the loss (default: `loss_fn(model(x), y)`).
    """
    from tqdm.auto import tqdm

    from tunelab import checkpoints

    require(0 < min_lr < max_lr, f"lr_find.min_lr={min_lr} and lr_find.max_lr={max_lr}: need 0 < min_lr < max_lr")
    require(isinstance(steps, int) and steps >= 2 * SKIP_START, f"lr_find.steps={steps} must be an integer >= {2 * SKIP_START}")
    require(diverge > 1, f"lr_find.diverge={diverge} must be > 1")
    forward = forward or (lambda m, x, y: loss_fn(m(x), y))
    rng = checkpoints.rng_state()
    probe = copy.deepcopy(model)
    names = {id(p): n for n, p in model.named_parameters()}
    copied = dict(probe.named_parameters())
    base = groups[0].get("lr", 1.0)
    probe_groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [copied[names[id(p)]] for p in g["params"]]} for g in groups
    ]
    scales = [g.get("lr", base) / base for g in groups]
    optimizer = make_optimizer(probe_groups)
    result = RangeTest()
    average, best = 0.0, math.inf
    ratio = max_lr / min_lr
    bar = tqdm(total=steps, desc="LR range test", disable=not progress, leave=False, dynamic_ncols=True)
    try:
        step, epoch = 0, 0
        while step < steps and not result.stopped:
            loader.sampler.set_epoch(epoch)
            for x, y in loader:
                lr = min_lr * ratio ** (step / (steps - 1))
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
                if not math.isfinite(smooth):
                    result.stopped = f"stopped after {step} of {steps} steps: the loss is {value} at lr {lr:.3g}"
                    break
                best = min(best, smooth)
                if step > SKIP_START and smooth > diverge * best:
                    result.stopped = f"stopped after {step} of {steps} steps: the smoothed loss exceeded {diverge:g} x its minimum (diverged) at lr {lr:.3g}"
                    break
                if step >= steps:
                    break
            epoch += 1
        if not result.stopped:
            result.stopped = f"ran all {steps} steps up to lr {max_lr:.3g} without diverging"
    finally:
        bar.close()
        checkpoints.set_rng_state(rng)
        del probe, optimizer
    result.suggestion, result.rule = suggest(result.lrs, result.smoothed)
    log.info("LR range test: suggested lr %.4g (%s); %s", result.suggestion, result.rule, result.stopped)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunelab.lr_find", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="the same overrides as train.py (model, freeze, optimizer, data, lr_find.*)")
    parser.add_argument("--out", default="outputs/lr_find", help="folder of lr_find.png and lr_find.csv (default: outputs/lr_find)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    from tunelab.errors import ReportedError
    from tunelab.preview import compose
    from tunelab.run import find_lr

    try:
        cfg = compose(args.overrides)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = find_lr(cfg, out)
    except (ConfigError, ReportedError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    print(f"Suggested lr: {result.suggestion:.4g}  ({result.rule})")
    print(result.stopped)
    print(f"wrote {out / 'lr_find.png'} and {out / 'lr_find.csv'}; train with it:  python train.py optimizer.lr={result.suggestion:.3g} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
