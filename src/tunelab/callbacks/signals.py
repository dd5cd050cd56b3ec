"""Stop signals: Ctrl-C, SIGTERM and SIGUSR2 stop the run cleanly at the next optimizer step."""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager

from tunelab.callbacks.base import Callback

log = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGINT/SIGTERM/SIGUSR2 (see `graceful_stop`). A second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    def handle(self, signum, frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("%s received: stopping after the current optimizer step (Ctrl-C again to stop at once)", signal.Signals(signum).name)


@contextmanager
def graceful_stop(flag: StopFlag):
    """Route SIGINT, SIGTERM and SIGUSR2 to `flag` while training (main thread only; joblib threads skip).

    SLURM jobs sent by submitit get SIGUSR2 before their time limit or on preemption: the run then
    writes its checkpoint and ends KILLED, so `trainer.resume=auto` can continue it.
    """
    try:
        previous = {s: signal.signal(s, flag.handle) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class StopSignal(Callback):
    """Asks the loop to stop (`loop.interrupt`) once `flag` is set: after the optimizer step it
    arrived in, or at the end of the epoch. In a data-parallel run every process agrees at every
    step, so all stop at the same one. The loop writes a checkpoint, then raises `Interrupted`."""

    def __init__(self, flag: StopFlag) -> None:
        self.flag = flag

    def on_optimizer_step(self, loop) -> None:
        if loop.options.dist.any(self.flag()):
            loop.interrupt = f"stopped after optimizer step {loop.state.step - 1} (epoch {loop.state.epoch + 1})"

    def on_epoch_end(self, loop, epoch: int, metrics) -> None:
        if loop.options.dist.any(self.flag()):
            loop.interrupt = f"stopped after epoch {epoch + 1}"
