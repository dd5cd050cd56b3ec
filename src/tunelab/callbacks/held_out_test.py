"""The held-out test at the end of a run: the number to report, on images nothing chose on.

Selection and reporting are different sets. The epoch (and `best.pt`), early stopping, `plateau`'s
cuts and a sweep's winner are chosen on validation; this callback scores the weights that `monitor`
chose on the test split, once, after the last epoch (`trainer.test=false` turns it off).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch import nn

from tunelab import predictions
from tunelab.callbacks.base import Callback

log = logging.getLogger(__name__)


@dataclass
class TestSet:
    """What the test needs from the run: the full model, the module whose weights training chose
    (the model, or its head when the backbone's features were cached), the test split (not read
    before the end) and how its images were normalized."""

    model: nn.Module
    chosen: nn.Module
    dataset: object
    loader: object
    classes: Sequence[str]
    mean: Sequence[float]
    std: Sequence[float]
    folder: Path | None = None
    #: The head trains on cached features now and the whole model later (LP-FT): a chosen epoch
    #: keeps the whole model's weights, since the body it had changes after the switch.
    switches: bool = False


class HeldOutTest(Callback):
    """Keeps the weights of each new best epoch by `monitor` (those of `averaged`, the EMA's or SWA's
    module, when `monitor` is one of their metrics), then scores them at the end of training: `test/acc`, `test/loss`,
    `test/balanced_acc` and `test/macro_f1` logged once at `step=` the chosen epoch, and the
    artifacts `per_class.csv` (validation and test), `confusion_matrix.png` and `top_losses.png`
    (also written to the run folder)."""

    def __init__(self, test: TestSet, logger, monitor: str, averaged: nn.Module | None = None) -> None:
        self.test, self.logger, self.monitor, self.averaged = test, logger, monitor, averaged
        self.best: dict | None = None
        self.best_epoch = -1
        self.best_part: nn.Module | None = None  # the module of `test.model` whose weights `best` holds
        self.scores: dict[str, float] = {}
        #: After training: a copy of the model holding the chosen weights (the one the run logs to MLflow).
        self.model: nn.Module | None = None

    def on_checkpoint(self, loop, is_best: bool) -> None:
        if not is_best or loop.state.batch:  # an epoch's end only
            return
        if self.averaged is not None:  # an average covers the module the optimizer steps
            source, self.best_part = self.averaged, self.test.chosen
        else:
            self.best_part = source = self.test.model if self.test.switches else self.test.chosen
        self.best = {key: value.detach().to("cpu", copy=True) for key, value in source.state_dict().items()}
        self.best_epoch = loop.state.epoch - 1

    def on_fit_end(self, loop) -> None:
        if self.best is None:
            log.warning("No epoch was chosen by %s in this process (a resumed run that had finished): no test score", self.monitor)
            return
        model = self.model = copy.deepcopy(self.test.model)
        _same_module(model, self.test.model, self.best_part).load_state_dict(self.best)
        fed = _same_module(model, self.test.model, loop.switched if loop.switched is not None else self.test.chosen)  # what val_loader feeds
        o = loop.options
        found = {
            "val": predictions.predict(fed, loop.val_loader, o.device, o.precision, o.channels_last),
            "test": predictions.predict(model, self.test.loader, o.device, o.precision, o.channels_last),
        }
        self.scores = found["test"].scores(loop.loss_fn, "test")
        self.logger.log_metrics(self.scores, step=self.best_epoch)
        self.logger.flush()
        log.info("Test (epoch %d, chosen by %s): %s", self.best_epoch + 1, self.monitor,
                 "  ".join(f"{key} {value:.4f}" for key, value in self.scores.items()))
        self._artifacts(found)

    def _artifacts(self, found: dict) -> None:
        """per_class.csv here; the two figures drawn by the logger (in MLflow's helper process)."""
        t = self.test
        table = predictions.per_class_csv(found, t.classes)
        self.logger.log_text(table, "per_class.csv")
        images = {i: t.dataset[i][0] for i in predictions.most_confidently_wrong(found["test"])}
        folder = str(t.folder) if t.folder is not None else None
        self.logger.log_test_figures(predictions.TestFigures.of(found["test"], images, t.classes, t.mean, t.std, folder))
        if t.folder is not None:
            t.folder.mkdir(parents=True, exist_ok=True)
            (t.folder / "per_class.csv").write_text(table)
            log.info("Per-class results: %s; confusion_matrix.png and top_losses.png beside it", t.folder / "per_class.csv")


def _same_module(copied: nn.Module, original: nn.Module, part: nn.Module) -> nn.Module:
    """The module in `copied` that `part` is in `original` (the whole, or one of its submodules)."""
    if part is original:
        return copied
    name = next(n for n, m in original.named_modules() if m is part)
    return copied.get_submodule(name)
