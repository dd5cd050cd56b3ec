"""Early stopping: end the run when the monitored metric stops improving."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from tunelab.callbacks.base import Callback
from tunelab.errors import require
from tunelab.metrics import lower_is_better


@dataclass
class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by more than `min_delta` for `patience` epochs.

    `mode` is "min", "max", or "auto" (min for losses, max otherwise). `update` returns the reason
    to stop, or None to go on; as a callback it sets `loop.state.stop_reason` at an epoch's end,
    and a resumed run continues the count from the epochs it has already recorded.
    """

    patience: int
    monitor: str = "val/acc"
    mode: str = "auto"
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int = -1
    waited: int = 0

    def __post_init__(self) -> None:
        require(isinstance(self.patience, int) and not isinstance(self.patience, bool) and self.patience >= 1,
                f"trainer.early_stopping.patience={self.patience!r} must be an integer >= 1 (or null to train every epoch)")
        require(self.mode in ("min", "max", "auto"), f"trainer.early_stopping.mode={self.mode} must be min, max or auto")
        require(isinstance(self.min_delta, (int, float)) and self.min_delta >= 0,
                f"trainer.early_stopping.min_delta={self.min_delta!r} must be a number >= 0")
        if self.mode == "auto":
            self.mode = "min" if lower_is_better(self.monitor) else "max"

    def update(self, metrics: Mapping[str, float], epoch: int) -> str | None:
        value = metrics[self.monitor]
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best, self.best_epoch, self.waited = value, epoch, 0
            return None
        self.waited += 1
        if self.waited < self.patience:
            return None
        return (
            f"{self.monitor} did not improve by more than {self.min_delta:g} for {self.patience} epochs "
            f"(best {self.best:.4f} at epoch {self.best_epoch + 1}); stopped after epoch {epoch + 1}"
        )

    def on_fit_start(self, loop) -> None:
        for past in loop.state.history.epochs:
            self.update(past, past["epoch"])

    def on_epoch_end(self, loop, epoch: int, metrics) -> None:
        loop.state.stop_reason = self.update(metrics, epoch)
