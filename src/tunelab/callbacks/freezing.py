"""Frozen stages during training: BatchNorm of frozen stages kept in eval mode, gradual unfreezing,
and the trainable parameter count of each epoch."""

from __future__ import annotations

import logging

from torch import nn

from tunelab import freezing
from tunelab.callbacks.base import Callback

log = logging.getLogger(__name__)


class Freezing(Callback):
    """At the start of every epoch: every `unfreeze_every` epochs (`freeze.unfreeze_every`, 0 =
    never) the frozen stage nearest the head becomes trainable, as a new param group whose lr
    follows the schedule from then on (`layer_decay` scales it like the others); then the model is
    put in training mode with the frozen stages' BatchNorm in eval mode (`freeze.bn=eval`). After
    validation it adds `trainable_params` to the epoch's metrics.

    `wrapper` is the DDP wrapper of a data-parallel run, rebuilt when a stage unfreezes (DDP
    averages only the parameters that were trainable when it was built).
    """

    def __init__(self, model: nn.Module, plan: freezing.FreezePlan, schedule, layer_decay: float | None = None,
                 unfreeze_every: int = 0, wrapper=None) -> None:
        self.model, self.plan, self.schedule = model, plan, schedule
        self.layer_decay, self.every, self.wrapper = layer_decay, unfreeze_every or 0, wrapper

    def replay(self, epochs: int) -> None:
        """Unfreeze what the first `epochs` epochs of a resumed run unfroze, so the optimizer has
        the groups its checkpoint holds."""
        for epoch in range(epochs):
            self._unfreeze_if_due(epoch)

    def on_epoch_start(self, loop) -> None:
        if loop.state.batch == 0:  # not again for an epoch resumed in its middle
            self._unfreeze_if_due(loop.state.epoch)
        freezing.train_mode(self.model, self.plan)

    def on_validation_end(self, loop, metrics) -> None:
        metrics["trainable_params"] = self.plan.trainable_params()

    def _unfreeze_if_due(self, epoch: int) -> None:
        if not (self.every and epoch > 0 and epoch % self.every == 0):
            return
        stage = freezing.unfreeze_next(self.plan)
        if stage is None:
            return
        self.schedule.add_param_group(stage.name, list(stage.params.values()), freezing.lr_scale(self.plan, stage, self.layer_decay))
        if self.wrapper is not None:
            self.wrapper.rewrap()
        log.info("Epoch %d: unfroze %s (%d parameters); trainable now %d", epoch + 1, stage.name, stage.numel, self.plan.trainable_params())
