"""Checkpoints during training: `last.pt` and `best.pt`, written by a `tunelab.checkpoints.Saver`."""

from __future__ import annotations

from typing import Callable

from tunelab import checkpoints
from tunelab.callbacks.base import Callback


class Checkpointing(Callback):
    """Saves the run's state at every `on_checkpoint` (each epoch's end, a stop) and asks for one
    every `every_n_steps` optimizer steps (`trainer.checkpoint_every_n_steps`, 0 = never).

    A checkpoint is `contents()` (model, optimizer, schedule, ... : what the run built), the loop's
    state (`loop`), every random generator (`rng`) and the state of each callback that has a
    `checkpoint_key` (the EMA's weights under `ema`). `saver` is None on the processes of a
    data-parallel run that do not write (all but rank 0): they still take part in the loop's
    all-process sums that precede a checkpoint.
    """

    def __init__(self, saver: checkpoints.Saver | None, contents: Callable[[], dict], every_n_steps: int = 0) -> None:
        self.saver, self.contents, self.every = saver, contents, every_n_steps or 0

    def on_optimizer_step(self, loop) -> None:
        if self.every and loop.state.step % self.every == 0:
            loop.request_checkpoint()

    def on_checkpoint(self, loop, is_best: bool) -> None:
        if self.saver is None:
            return
        extra = {c.checkpoint_key: c.state_dict() for c in loop.callbacks if getattr(c, "checkpoint_key", None)}
        state = {**self.contents(), "rng": checkpoints.rng_state(), "loop": loop.state.to_dict(), **extra}
        self.saver.save(state, loop.state, is_best)
