"""The callback interface of the training loop (`tunelab.loop.fit`), and the list that calls them.

Everything optional in a run is a callback: a small object with named hooks that the loop calls at
fixed moments, in this order:

- `on_fit_start(loop)`: once, before the first epoch (also when a run is resumed);
- `on_epoch_start(loop)`: before the first batch of every epoch, also of an epoch resumed in its
  middle (`loop.state.batch` > 0 then); after `model.train()`;
- `on_optimizer_step(loop)`: after every optimizer step, once the schedule has stepped and
  `loop.state.step` counts it;
- `on_train_metrics(loop, rows, epoch_end)`: once per logging interval (and at the end of each
  epoch, `epoch_end=True`) with the optimizer steps since the last call, each as
  `(step, {"lr": ..., "train/loss": ...})`; their losses were read from the device once, together;
- `on_validation_end(loop, metrics)`: after validation; a callback may add metrics (the EMA's);
- `on_epoch_end(loop, epoch, metrics)`: after the schedule's epoch step and the epoch's record;
- `on_checkpoint(loop, is_best)`: when the loop's state is complete and its metrics so far are
  logged: at the end of every epoch, when a callback asked for one, and before a stop;
- `on_fit_end(loop)`: after the last epoch; `on_exception(loop, error)`: when fit raises.

Callbacks are called in the order they are given. A callback steers the loop through it:
`loop.state.stop_reason = "..."` ends the run after this epoch (FINISHED, early stopping);
`loop.interrupt = "..."` stops it at this optimizer step or epoch end, after a checkpoint
(`Interrupted`, the run ends KILLED); `loop.request_checkpoint()` writes a checkpoint at this
step. A callback that changes what trains (gradual unfreezing) does so in `on_epoch_start`, where
it may also hand the loop another module and loaders with `loop.switch(...)` (LP-FT leaving the
head's cached features for the whole model).
"""

from __future__ import annotations

from typing import Iterable

HOOKS = ("on_fit_start", "on_epoch_start", "on_optimizer_step", "on_train_metrics", "on_validation_end", "on_epoch_end",
         "on_checkpoint", "on_fit_end", "on_exception")


class Callback:
    """Every hook does nothing; a callback overrides the ones it needs (see the module's docstring)."""

    def on_fit_start(self, loop) -> None:
        pass

    def on_epoch_start(self, loop) -> None:
        pass

    def on_optimizer_step(self, loop) -> None:
        pass

    def on_train_metrics(self, loop, rows: list[tuple[int, dict[str, float]]], epoch_end: bool) -> None:
        pass

    def on_validation_end(self, loop, metrics: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, loop, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, loop, is_best: bool) -> None:
        pass

    def on_fit_end(self, loop) -> None:
        pass

    def on_exception(self, loop, error: BaseException) -> None:
        pass


class CallbackList:
    """Calls each hook on the callbacks that define it, in their order.

    Each hook is bound once to the callbacks that override it, so a hook no callback uses costs
    one empty loop per call and the per-step hook nothing beyond the callbacks' own work.
    """

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)
        for hook in HOOKS:
            bound = [getattr(c, hook) for c in self.callbacks if getattr(type(c), hook, None) is not getattr(Callback, hook)]
            setattr(self, hook, _dispatcher(bound))

    def __iter__(self):
        return iter(self.callbacks)


def _dispatcher(bound: list):
    def call(*args) -> None:
        for method in bound:
            method(*args)

    return call
