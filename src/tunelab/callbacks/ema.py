"""An exponential moving average of the weights (`trainer.ema_decay`), evaluated every epoch."""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from tunelab.callbacks.base import Callback


class WeightEMA:
    """An exponential moving average of a module's weights.

    `ema = decay * ema + (1 - decay) * weights` for the trainable parameters (frozen ones never
    change, so their average is themselves); buffers (BatchNorm statistics) are copied. Decay 0 makes
    the average equal the raw weights.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = float(decay)
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self._pairs = list(zip(self.module.parameters(), module.parameters()))
        self._buffers = list(zip(self.module.buffers(), module.buffers()))

    @torch.no_grad()
    def update(self) -> None:
        for average, weight in self._pairs:
            if weight.requires_grad:
                average.lerp_(weight, 1.0 - self.decay)
        for average, buffer in self._buffers:
            average.copy_(buffer)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.module.load_state_dict(state)


class EMA(Callback):
    """Updates the average after every optimizer step and adds `val/loss_ema` and `val/acc_ema` to
    each epoch's metrics (before the schedule and early stopping see them). Its weights are saved
    in the checkpoint under `ema` (`checkpoint_key`)."""

    checkpoint_key = "ema"

    def __init__(self, average: WeightEMA) -> None:
        self.average = average

    def on_optimizer_step(self, loop) -> None:
        self.average.update()

    def on_validation_end(self, loop, metrics) -> None:
        metrics.update({f"{key}_ema": value for key, value in loop.validate(self.average.module).items()})

    @property
    def module(self) -> nn.Module:
        """The averaged weights, as a module like the trained one (what a `_ema` monitor tests and logs)."""
        return self.average.module

    def state_dict(self) -> dict:
        return self.average.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.average.load_state_dict(state)
