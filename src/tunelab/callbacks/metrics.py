"""Metric logging: every optimizer step's `lr` and `train/loss`, and each epoch's metrics, to the run's logger."""

from __future__ import annotations

from tunelab.callbacks.base import Callback


class MetricLogger(Callback):
    """Hands the loop's metrics to `logger` (an MLflow logger, or `NullLogger`).

    Per optimizer step: `lr` (and `lr/<group>`), `train/loss`, logged with `step=` the optimizer
    step, sent to the store once per logging interval; the steps of an epoch's end go in one
    write with the epoch's metrics. Per epoch (`step=epoch`): `train/acc`, `val/*` (the EMA's too),
    `trainable_params` and, with `trainer.skip_nonfinite`, `train/skipped_batches`.
    """

    def __init__(self, logger) -> None:
        self.logger = logger

    def on_train_metrics(self, loop, rows, epoch_end: bool) -> None:
        for step, metrics in rows:
            self.logger.log_metrics(metrics, step=step)
        if not epoch_end:
            self.logger.flush()

    def on_epoch_end(self, loop, epoch: int, metrics) -> None:
        logged = {key: float(value) for key, value in metrics.items() if key != "train/loss"}
        if loop.options.skip_nonfinite:
            logged["train/skipped_batches"] = float(loop.state.skipped)
        self.logger.log_metrics(logged, step=epoch)
        self.logger.flush()
