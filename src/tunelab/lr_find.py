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
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from tunelab import range_test
from tunelab.checks import check_config
from tunelab.environment import seed_everything, select_device
from tunelab.errors import ConfigError, ReportedError, build
from tunelab.prepare import prepare
from tunelab.run import flat_config
from tunelab.tracking import KIND_TAG

log = logging.getLogger(__name__)


def find_lr(cfg: DictConfig, out_dir: Path):
    """`python -m tunelab.lr_find`: the range test alone, its plot and CSV in `out_dir`, and an MLflow run."""
    check_config(cfg)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    device = select_device(cfg.trainer.device)
    logger = build(cfg.logger, "logger")
    logger.connect_in_background()
    try:
        result = range_test.for_config(cfg, prepare(cfg, device), device)
    finally:
        logger.wait_for_connection()
    import matplotlib.pyplot as plt

    fig = range_test.write(result, out_dir)  # on disk before MLflow is asked for anything
    try:
        logger.start(flat_config(cfg), {KIND_TAG: "lr_find", "model": str(cfg.model.name), "mlflow.runName": f"lr_find {cfg.model.name}"})
        status = "FAILED"
        try:
            for step, (lr, loss, smooth) in enumerate(zip(result.lrs, result.losses, result.smoothed)):
                logger.log_metrics({"lr_find/lr": lr, "lr_find/loss": loss, "lr_find/smoothed_loss": smooth}, step=step)
            logger.set_tag("tunelab.lr_find.stopped", result.stopped)
            range_test.log_to(logger, result, fig, out_dir)
            status = "FINISHED"
        finally:
            logger.finish(status)
    finally:
        plt.close(fig)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunelab.lr_find", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="the same overrides as train.py (model, freeze, optimizer, data, lr_find.*)")
    parser.add_argument("--out", default="outputs/lr_find", help="folder of lr_find.png and lr_find.csv (default: outputs/lr_find)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    from tunelab.preview import compose

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
