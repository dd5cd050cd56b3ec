"""The progress bar of an epoch: optimizer steps, with the latest loss and lr."""

from __future__ import annotations

import math

from tunelab.callbacks.base import Callback


class ProgressBar(Callback):
    """A tqdm bar per epoch (`trainer.progress`); closed before validation, or when the loop raises."""

    def __init__(self) -> None:
        self.bar = None

    def on_epoch_start(self, loop) -> None:
        from tqdm.auto import tqdm

        o = loop.options
        self.bar = tqdm(total=loop.steps_per_epoch, initial=math.ceil(loop.state.batch / o.accumulate),
                        desc=f"epoch {loop.state.epoch + 1}/{o.max_epochs}", leave=False, dynamic_ncols=True)

    def on_optimizer_step(self, loop) -> None:
        self.bar.update()

    def on_train_metrics(self, loop, rows, epoch_end: bool) -> None:
        if rows:
            step, metrics = rows[-1]
            loss = f"{metrics['train/loss']:.4f}" if "train/loss" in metrics else "skipped"
            self.bar.set_postfix(loss=loss, lr=f"{metrics['lr']:.3g}", refresh=False)

    def on_validation_end(self, loop, metrics) -> None:
        self._close()

    def on_exception(self, loop, error) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
