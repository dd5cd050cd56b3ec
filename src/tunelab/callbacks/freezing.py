"""Frozen stages during training: BatchNorm of frozen stages kept in eval mode, gradual unfreezing,
and the trainable parameter count of each epoch."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from tunelab import freezing
from tunelab.callbacks.base import Callback

log = logging.getLogger(__name__)


@dataclass
class Probe:
    """Linear probing, then fine-tuning (`freeze=lp_ft`): after `epochs` epochs every frozen stage
    trains at `lr_scale` times the head's lr. `after` is (the model, its image loaders) when the
    probe trained the head on cached features: what the loop trains from the switch on."""

    epochs: int
    lr_scale: float
    after: tuple | None = None


class Freezing(Callback):
    """At the start of every epoch: every `unfreeze_every` epochs (`freeze.unfreeze_every`, 0 =
    never) the frozen stage nearest the head becomes trainable, as a new param group whose lr
    follows the schedule from then on (`layer_decay` scales it like the others); then the model is
    put in training mode with the frozen stages' BatchNorm in eval mode (`freeze.bn=eval`). After
    validation it adds `trainable_params` to the epoch's metrics.

    With a `probe` (LP-FT), the start of epoch `probe.epochs` unfreezes every stage at once: one
    group `body` at `probe.lr_scale` x the head's lr (one group per stage with layer decay), and,
    when the probe ran on cached features, the loop switches to the whole model and its images.

    `wrapper` is the DDP wrapper of a data-parallel run, rebuilt when a stage unfreezes (DDP
    averages only the parameters that were trainable when it was built).
    """

    def __init__(self, model: nn.Module, plan: freezing.FreezePlan, schedule, layer_decay: float | None = None,
                 unfreeze_every: int = 0, wrapper=None, probe: Probe | None = None) -> None:
        self.model, self.plan, self.schedule = model, plan, schedule
        self.layer_decay, self.every, self.wrapper, self.probe = layer_decay, unfreeze_every or 0, wrapper, probe
        self._switch_due = False  # the loop is to train the whole model from the next epoch it starts

    def replay(self, epochs: int) -> None:
        """Unfreeze what the first `epochs` epochs of a resumed run unfroze, so the optimizer has
        the groups its checkpoint holds."""
        for epoch in range(epochs):
            self._unfreeze_if_due(epoch)

    def on_epoch_start(self, loop) -> None:
        if loop.state.batch == 0:  # not again for an epoch resumed in its middle
            self._unfreeze_if_due(loop.state.epoch)
        if self._switch_due:  # also a resumed run whose probe had ended
            self._switch_due = False
            loop.switch(*self.probe.after)
        freezing.train_mode(self.model, self.plan)

    def on_validation_end(self, loop, metrics) -> None:
        metrics["trainable_params"] = self.plan.trainable_params()

    def _unfreeze_if_due(self, epoch: int) -> None:
        if self.probe is not None and epoch == self.probe.epochs:
            self._end_probe(epoch)
        if not (self.every and epoch > 0 and epoch % self.every == 0):
            return
        stage = freezing.unfreeze_next(self.plan)
        if stage is None:
            return
        self.schedule.add_param_group(stage.name, list(stage.params.values()), freezing.lr_scale(self.plan, stage, self.layer_decay))
        if self.wrapper is not None:
            self.wrapper.rewrap()
        log.info("Epoch %d: unfroze %s (%d parameters); trainable now %d", epoch + 1, stage.name, stage.numel, self.plan.trainable_params())

    def _end_probe(self, epoch: int) -> None:
        """LP-FT's switch: every frozen stage joins the optimizer at `probe.lr_scale` x the head's lr."""
        unfrozen = []
        while (stage := freezing.unfreeze_next(self.plan)) is not None:
            unfrozen.append(stage)
        if self.layer_decay is not None:  # one group per stage, each with its layer-decay factor on top
            for stage in unfrozen:
                scale = self.probe.lr_scale * freezing.lr_scale(self.plan, stage, self.layer_decay)
                self.schedule.add_param_group(stage.name, list(stage.params.values()), scale)
        elif unfrozen:
            self.schedule.add_param_group("body", [p for stage in unfrozen for p in stage.params.values()], self.probe.lr_scale)
        if self.wrapper is not None:
            self.wrapper.rewrap()
        self._switch_due = self.probe.after is not None
        log.info("Epoch %d: linear probing done; every stage trains now (%d parameters), the body at %g x the head's lr",
                 epoch + 1, self.plan.trainable_params(), self.probe.lr_scale)
