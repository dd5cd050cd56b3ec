"""See a learning-rate schedule before spending compute: no data is loaded and no model is built.

    python -m tunelab.preview scheduler=onecycle trainer.max_epochs=90
    python -m tunelab.preview scheduler=step,cosine,onecycle,cosine_restarts scheduler.warmup_epochs=1

Takes the same overrides as train.py; a comma list (any key) draws one curve per combination in one
picture. The schedule is stepped by the same code the training loop uses, so the curve equals the
`lr` series a run logs. `plateau` is drawn for a monitored metric that never improves. Writes a PNG
and a CSV (one row per optimizer step: `step`, `epoch`, then `lr <label>` per curve).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import logging
import math
import sys
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig

from tunelab.choices import EPOCH_METRICS
from tunelab.data import train_size
from tunelab.errors import ConfigError, build, require
from tunelab.schedules import build_schedule

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def steps_per_epoch(cfg: DictConfig) -> int:
    """Optimizer steps per epoch the training loop will take with this config."""
    if cfg.data.get("folds"):  # the fold sizes depend on the labels: make the split (no image is decoded)
        from tunelab.data import kfold

        splits = build(cfg.data.dataset, "data", image_size=8, mean=[0.0] * 3, std=[1.0] * 3, seed=cfg.seed)
        n = len(kfold(splits, cfg.data.folds, cfg.data.fold, cfg.seed).train)
    else:
        n = train_size(cfg.data.dataset)
    require(n is not None, "the preview cannot tell how many training images this data option has; pass --steps-per-epoch N")
    batches = math.ceil(n / cfg.data.batch_size)
    if cfg.trainer.limit_train_batches is not None:
        batches = min(batches, cfg.trainer.limit_train_batches)
    return math.ceil(batches / cfg.trainer.accumulate_grad_batches)


def lr_series(cfg: DictConfig, per_epoch: int) -> list[float]:
    """The lr of parameter group 0 at every optimizer step of the whole run."""
    from tunelab.optimizers import optimizer_factory

    require(cfg.optimizer.lr != "auto", "optimizer.lr=auto is found by the LR range test when training starts; preview with a number (python -m tunelab.lr_find suggests one)")
    optimizer = optimizer_factory(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    schedule = build_schedule(cfg.scheduler, optimizer, per_epoch, cfg.trainer.max_epochs)
    flat_metrics = {m: 1.0 for m in EPOCH_METRICS}  # never improves: shows when plateau would cut
    lrs: list[float] = []
    group = optimizer.param_groups[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": no training here
        for _ in range(cfg.trainer.max_epochs):
            for _ in range(per_epoch):
                lrs.append(group["lr"])
                schedule.after_optimizer_step()
            schedule.after_epoch(flat_metrics)
    return lrs


def expand(overrides: list[str]) -> list[tuple[str, list[str]]]:
    """Hydra's sweep syntax (a,b,c / range(...)) expanded to (label, overrides) per combination."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    fixed, swept = [], []
    for o in parsed:
        if o.is_sweep_override():
            swept.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            fixed.append(o.input_line)
    combos = list(itertools.product(*swept)) or [()]
    labelled = []
    for combo in combos:
        label = ", ".join(c if not c.startswith("scheduler=") else c.split("=", 1)[1] for c in combo) or _default_label(fixed)
        labelled.append((label, [*fixed, *combo]))
    return labelled


def _default_label(fixed: list[str]) -> str:
    chosen = [o.split("=", 1)[1] for o in fixed if o.startswith("scheduler=")]
    return chosen[0] if chosen else "lr"


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=overrides)
    except HydraException as err:
        raise ConfigError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunelab.preview", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="the same overrides as train.py; comma lists draw several curves")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="optimizer steps per epoch (default: from the data config)")
    parser.add_argument("--out", default="outputs/preview/lr_preview", help="path of the PNG and CSV, without suffix")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        curves: dict[str, list[float]] = {}
        per_epoch = None
        for label, overrides in expand(args.overrides):
            cfg = compose(overrides)
            per_epoch = args.steps_per_epoch or steps_per_epoch(cfg)
            require(per_epoch > 0, f"--steps-per-epoch must be positive, got {per_epoch}")
            curves[label] = lr_series(cfg, per_epoch)
    except ConfigError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    from tunelab import plots

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = plots.lr_curves(curves, per_epoch, title="Learning-rate preview")
    fig.savefig(out.with_suffix(".png"), dpi=120)
    longest = max(len(v) for v in curves.values())
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "epoch", *(f"lr {label}" for label in curves)])  # a curve may be named "step"
        for s in range(longest):
            writer.writerow([s, s // per_epoch, *(v[s] if s < len(v) else "" for v in curves.values())])
    for label, values in curves.items():
        print(f"{label:>30}: {len(values)} steps, start {values[0]:.4g}, peak {max(values):.4g}, end {values[-1]:.4g}")
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
