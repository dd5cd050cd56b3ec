"""Stochastic Weight Averaging (`trainer.swa.*`) with torch's `torch.optim.swa_utils`.

From epoch `start` on (0-based) the run's schedule hands the lr over to `SWALR`, which anneals it
to `swa_lr` over `anneal_epochs` epochs and then holds it. At the end of every such epoch, after
validation: the weights join the average (`AveragedModel.update_parameters`), SWALR steps, the
average's BatchNorm statistics are recomputed on the training set (`update_bn`) and the average
is validated as `val/loss_swa`, `val/acc_swa`, ... The average and SWALR's state are in the
checkpoint under `swa`, so a resumed run continues them.
"""

from __future__ import annotations

from typing import Mapping

from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn

from tunelab.callbacks.base import Callback


class SWA(Callback):
    """Averages the weights of `trained` (the module the optimizer steps) from epoch `start` on."""

    checkpoint_key = "swa"

    def __init__(self, trained: nn.Module, schedule, start: int, swa_lr: float | None, anneal_epochs: int, anneal_strategy: str) -> None:
        self.trained, self.schedule, self.start = trained, schedule, start
        self.swa_lr, self.anneal_epochs, self.anneal_strategy = swa_lr, anneal_epochs, anneal_strategy
        self.average = AveragedModel(trained)
        self.scheduler: SWALR | None = None
        self._saved_scheduler: Mapping | None = None  # SWALR's state from a checkpoint, for when it is built

    def on_epoch_start(self, loop) -> None:  # also the epoch a resumed run continues
        if loop.state.epoch >= self.start and self.scheduler is None:
            self._take_over(loop.optimizer)

    def _take_over(self, optimizer) -> None:
        """Build SWALR on the optimizer as it is now: its lr anneals from each group's current lr.
        With `swa_lr` set, each group's target keeps its ratio to group 0 (layer decay)."""
        first = optimizer.param_groups[0]["lr"]
        if self.swa_lr is None:
            targets = [g["lr"] for g in optimizer.param_groups]
        else:
            targets = [self.swa_lr * (g["lr"] / first if first else 1.0) for g in optimizer.param_groups]
        self.schedule.hand_over()
        self.scheduler = SWALR(optimizer, targets, anneal_epochs=self.anneal_epochs, anneal_strategy=self.anneal_strategy)
        self.schedule.successor = self.scheduler  # param groups added later (gradual unfreezing) follow it too
        if self._saved_scheduler is not None:
            self.scheduler.load_state_dict(self._saved_scheduler)
            self._saved_scheduler = None

    def on_validation_end(self, loop, metrics) -> None:
        if loop.state.epoch < self.start:
            return
        self.average.update_parameters(self.trained)
        self.scheduler.step()
        update_bn(loop.train_loader, self.average, device=loop.options.device)
        metrics.update({f"{key}_swa": value for key, value in loop.validate(self.average).items()})

    @property
    def module(self) -> nn.Module:
        """The averaged weights, as a module like `trained` (what a `_swa` monitor tests and logs)."""
        return self.average.module

    def state_dict(self) -> dict:
        return {"average": self.average.state_dict(), "scheduler": self.scheduler.state_dict() if self.scheduler else None}

    def load_state_dict(self, state: Mapping) -> None:
        self.average.load_state_dict(state["average"])
        self._saved_scheduler = state["scheduler"]
