"""The helper process that does the MLflow work of the training process, and the pipe between them.

Its protocol: each message to the helper is `(op, number, args)`, a call of the method `op` of
the current run's `MlflowLogger` (`new` makes one, `metrics` logs a list of steps' metrics).
Calls that wait for an answer carry a number > 0 and get `(number, ok, value or error)` back;
those sent with 0 (metric batches, the LR figure) get none, and their errors are reported by
`finish`.
"""

from __future__ import annotations

import importlib
import os
import queue
import threading
from typing import Any, Mapping

from tunelab.errors import ReportedError
from tunelab.tracking.children import start_python
from tunelab.tracking.logger import MlflowLogger
from tunelab.tracking.tags import work_for


class _Helper:
    """The helper process that runs MlflowLogger for this process, and the pipe to it.

    One per training process, started at first use and kept for the next run (the jobs of a sweep
    run one after another in one process). Calls that return something wait for their reply,
    matched by number; metric batches go without one. The helper ignores Ctrl-C and SIGTERM (this
    process ends the run properly first) and exits when the pipe closes: at this process's exit,
    or when a `kill -9` ends it.
    """

    def __init__(self) -> None:
        import atexit
        from multiprocessing.connection import Connection

        # A plain `python -c` child with two pipes: no fork of a process that may hold CUDA and
        # threads, and none of multiprocessing's start-up (which fails inside joblib's workers).
        to_child, inbox = os.pipe()
        outbox, from_child = os.pipe()
        code = f"from {__name__} import _serve; _serve({to_child}, {from_child}, {os.getpid()})"
        self.process = start_python(code, pass_fds=(to_child, from_child))
        os.close(to_child)
        os.close(from_child)
        self._out, self._in = Connection(inbox, readable=False), Connection(outbox, writable=False)
        self._calls = 0
        self._lock = threading.Lock()  # MLflow may call the forwarded store (HelperStore) from its threads
        atexit.register(self.close)

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, op: str, *args) -> None:
        try:
            with self._lock:
                self._out.send((op, 0, args))
        except (OSError, EOFError, ValueError) as err:
            raise _gone(err) from None

    def call(self, op: str, *args):
        try:
            with self._lock:
                self._calls += 1
                number = self._calls
                self._out.send((op, number, args))
                while True:
                    answered, ok, value = self._in.recv()
                    if answered == number:  # an older reply was left by a call that Ctrl-C interrupted
                        break
        except (OSError, EOFError, ValueError) as err:
            raise _gone(err) from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._out.close()  # the helper's cue to exit
        try:
            self.process.wait(timeout=30)
        except Exception:
            self.process.kill()
        self._in.close()


def _gone(err: BaseException) -> ReportedError:
    return ReportedError(f"the MLflow helper process is gone ({type(err).__name__}); the run's checkpoint is still in its run folder")


_helper: _Helper | None = None


def get_helper() -> _Helper:
    """This process's helper, started now when there is none or it has exited (OSError when no
    process can be started)."""
    global _helper
    if _helper is None or not _helper.alive():
        _helper = _Helper()
    return _helper


def running_helper() -> _Helper | None:
    """This process's helper when one is running, else None."""
    return _helper if _helper is not None and _helper.alive() else None


#: The calls the helper hands to its drawing thread (sent without a reply): matplotlib's work.
DRAWN = ("log_lr_curves", "log_test_figures")


class _Drawer:
    """A thread of the helper process that draws and stores the figures (the DRAWN calls), so that
    the store calls the training process makes meanwhile (its model upload goes through this
    process's store, `HelperStore`) are answered at once instead of waiting behind matplotlib.
    `wait` returns when every figure handed over is stored, with the first error, if any."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.error: str | None = None
        self.thread: threading.Thread | None = None

    def submit(self, logger, op: str, args: tuple) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="tunelab-figures", daemon=True)
            self.thread.start()
        self.queue.put((logger, op, args))

    def _run(self) -> None:
        while True:
            logger, op, args = self.queue.get()
            try:
                getattr(logger, op)(*args)
            except BaseException as err:
                self.error = self.error or f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            finally:
                self.queue.task_done()

    def wait(self) -> str | None:
        self.queue.join()
        error, self.error = self.error, None
        return error


def _serve(inbox: int, outbox: int, training_pid: int) -> None:
    """The helper process's loop: each message from the pipe `inbox` is a call on the current
    MlflowLogger; replies go to the pipe `outbox`."""
    import pickle
    import signal
    import sys
    from multiprocessing.connection import Connection

    receive, reply = Connection(inbox, writable=False), Connection(outbox, readable=False)
    work_for(training_pid)
    for ignored in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2):
        signal.signal(ignored, signal.SIG_IGN)
    try:  # the slow imports first, while the training process is still importing torch
        for module in ("mlflow.entities", "mlflow.store.tracking.sqlalchemy_store"):
            importlib.import_module(module)
    except Exception:
        pass  # the first call reports what is missing
    logger, deferred, drawer = None, None, _Drawer()
    while True:
        try:
            op, number, args = receive.recv()
        except (EOFError, OSError):  # the training process has ended (every run it finished is stored)
            drawer.wait()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # skip tearing down MLflow's modules: the training process waits for this exit
        try:
            if op == "new":  # a new run's logger: its settings, MLflow's environment variables and folder
                logger, deferred = _new_logger(*args), None
            elif op == "metrics":
                for metrics, step in args[0]:
                    logger.log_metrics(metrics, step)
                logger.flush()
            elif op in DRAWN and not number:
                drawer.submit(logger, op, args)
            else:
                if op == "finish":  # the run's figures are stored before it ends
                    deferred = deferred or drawer.wait()
                value = getattr(logger, op)(*args)
                if op in ("start", "resume"):
                    value = (logger.run_id, logger.uri, logger.experiment_id)
                if op == "finish" and deferred is not None:
                    raise ReportedError(f"MLflow could not store all of run {logger.run_id} ({deferred})")
                if number:  # 0: sent without waiting for a reply
                    reply.send((number, True, value))
        except BaseException as err:
            if not number:  # nobody waits for this one: report it when the run finishes
                deferred = deferred or f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                continue
            try:
                pickle.loads(pickle.dumps(err))
            except Exception:  # not every library error survives the trip
                err = RuntimeError(f"{type(err).__name__}: {err}")
            reply.send((number, False, err))


def _new_logger(kwargs: Mapping[str, Any], env: Mapping[str, str], cwd: str) -> MlflowLogger:
    """The `new` call: the next run's logger, with the training process's MLflow environment
    variables and folder, connecting in the background."""
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[key]
    os.environ.update(env)
    os.chdir(cwd)
    logger = MlflowLogger(**kwargs)
    logger.connect_in_background()
    return logger
