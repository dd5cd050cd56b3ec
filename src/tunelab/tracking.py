"""Everything MLflow: the run's life cycle, batched metrics, params, tags, artifacts, the model.

The loop talks to a small logger object (`NullLogger` for `logger=none`), so it runs the same with
tracking off and tests point it at a temporary sqlite file. `MlflowLogger` does the MLflow work:
per-step metrics are buffered and sent in batches (`MlflowClient.log_batch`) by a background thread
with a bounded queue, so the training step never waits on the tracking store; `flush()` hands over
what is buffered and `finish()` waits until every batch has arrived before it sets the run's final
status. `logger=mlflow` runs it in a helper process (`ProcessLogger`): the training process then
neither imports MLflow at start-up nor shares its interpreter with the store's Python code.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import queue
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

from tunelab.errors import ConfigError, ReportedError, require

log = logging.getLogger(__name__)

#: MLflow refuses param values longer than this many characters.
_PARAM_VALUE_LIMIT = 6000
#: MLflow accepts at most this many metrics in one log_batch call.
_BATCH_LIMIT = 1000
#: Tags MLflow's UI reads: open in the classic (not GenAI) view, and group child runs under a parent.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
PARENT_RUN_TAG = "mlflow.parentRunId"
#: The config groups; each run is tagged with the option chosen in each (`scheduler`=cosine, ...).
GROUPS = ("model", "scheduler", "optimizer", "freeze", "data", "trainer", "logger")
#: Tag of the runs that are not trainings (`lr_find` for an LR range test); comparisons skip them.
KIND_TAG = "tunelab.kind"
#: The process that trains: this one, or the one a helper process (ProcessLogger) works for.
_training_pid = os.getpid()


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optimizer': {'lr': 0.1}} -> {'optimizer.lr': 0.1}; lists stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def resolve_tracking_uri(configured: str | None) -> str:
    """MLFLOW_TRACKING_URI when set, else the configured URI; makes a sqlite file's folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured or "sqlite:///outputs/mlflow.db"
    database = _sqlite_path(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    return uri


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]).expanduser() if uri.startswith("sqlite:///") else None


@contextmanager
def store_lock(uri: str):
    """For a sqlite store, hold an exclusive lock on the file `NAME.lock` beside the database for the block.

    MLflow creates and migrates a sqlite store's tables when a process first opens it, and two
    processes doing that at once both create them (`table ... already exists`, `duplicate column
    name`). Under the lock the first process makes the store and the others wait, then find it
    made. Other stores (a server, PostgreSQL) need no lock; neither does a system without `fcntl`.
    """
    path = _sqlite_path(uri)
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if path is None or fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_store(uri: str, experiment_name: str | None = None):
    """An `MlflowClient` for `uri` whose store is made (and `experiment_name` found or created, when
    given) under `store_lock`: any number of processes may open a new sqlite store at once.

    Returns (client, experiment id or None)."""
    from mlflow import MlflowClient

    with store_lock(uri):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # opens the store: tables made or migrated now, under the lock
        experiment_id = get_or_create_experiment(client, experiment_name) if experiment_name else None
    return client, experiment_id


def artifact_location(uri: str, experiment: str) -> str | None:
    """For a sqlite store, artifacts go beside the database (outputs/mlartifacts/NAME), not into
    ./mlruns of whatever directory a process happens to run in; a server decides for itself."""
    path = _sqlite_path(uri)
    return None if path is None else (path.resolve().parent / "mlartifacts" / experiment).as_uri()


def get_or_create_experiment(client, name: str) -> str:
    """The experiment's id, creating it (tagged for MLflow's classic training view) if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            location = artifact_location(client.tracking_uri, name)
            return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND_TAG]))
        except Exception:  # another process of a parallel sweep created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.tags.get(EXPERIMENT_KIND_TAG[0]) != EXPERIMENT_KIND_TAG[1]:
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND_TAG)
    return experiment.experiment_id


class _BatchSender(threading.Thread):
    """Sends metric batches in order from a bounded queue, retrying each a few times."""

    def __init__(self, client, run_id: str, max_pending: int = 64, retries: int = 3):
        super().__init__(name="tunelab-mlflow", daemon=True)
        self.client, self.run_id, self.retries = client, run_id, retries
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            batch = self.queue.get()
            try:
                if batch is None:
                    return
                self._send(batch)
            except Exception as err:  # reported by close(), never swallowed
                self.error = self.error or err
            finally:
                self.queue.task_done()

    def _send(self, batch: list) -> None:
        for attempt in range(self.retries + 1):
            try:
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
                return
            except Exception as err:
                if attempt == self.retries:
                    raise
                log.warning("MLflow log_batch failed (%s); retrying", err)
                time.sleep(0.5 * 2**attempt)

    def close(self) -> None:
        self.queue.put(None)
        self.join()


class NullLogger:
    """Tracking off: every call does nothing, so the loop needs no `if logger` checks."""

    run_id: str | None = None
    log_model_enabled = False

    def connect_in_background(self) -> None:
        pass

    def wait_for_connection(self) -> None:
        pass

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        pass

    def resume(self, run_id: str) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tag(self, key: str, value: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def log_figure(self, figure, name: str) -> None:
        pass

    def log_lr_curves(self, curves: Mapping[str, list[float]], steps_per_epoch: int, name: str = "lr_curve.png") -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def log_model(self, model, input_example) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class MlflowLogger(NullLogger):
    """One MLflow run: `start`, then `log_metrics`/`flush` per step/epoch, then `finish(status)`."""

    def __init__(self, tracking_uri: str | None, experiment_name: str, run_name: str | None = None, log_model: bool = True):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.log_model_enabled = log_model
        self.run_id = None
        self._client = None
        self._sender: _BatchSender | None = None
        self._pending: list = []
        self._skip: dict[str, int] = {}
        self._uri = None
        self._connector: threading.Thread | None = None
        self._connect_error: BaseException | None = None
        self._experiment_id = None

    def connect_in_background(self) -> None:
        """Import MLflow and open the store in a thread while the run builds its data and model;
        `start`/`resume` wait for it (and report its error) before any training step."""

        def connect() -> None:
            try:
                self._experiment_id = self._connect()
            except BaseException as err:
                self._connect_error = err

        self._connector = threading.Thread(target=connect, name="tunelab-mlflow-connect", daemon=True)
        self._connector.start()

    def wait_for_connection(self) -> None:
        """Let a background connection finish (a process must not exit while it creates the
        tables of a new sqlite store: that would leave the store half made)."""
        if self._connector is not None:
            self._connector.join()

    def _connected(self) -> str:
        if self._connector is None:
            return self._connect()
        self._connector.join()
        self._connector = None
        if self._connect_error is not None:
            raise self._connect_error
        return self._experiment_id

    def _connect(self) -> str:
        """Client and experiment; fails within seconds, naming the URI, when the store is unreachable."""
        configured = self.tracking_uri
        uri = resolve_tracking_uri(configured)
        key = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "logger.tracking_uri"
        if uri.startswith(("http://", "https://")):
            import requests

            try:
                requests.get(uri.rstrip("/") + "/health", timeout=5)
            except requests.RequestException as err:
                raise ConfigError(
                    f"{key}={uri}: the MLflow tracking server does not answer ({type(err).__name__}); "
                    "start it (mlflow server --host 127.0.0.1 --port 5000 ...) or point tunelab elsewhere"
                ) from None
        try:
            self._client, experiment_id = open_store(uri, self.experiment_name)
        except Exception as err:
            raise ConfigError(f"{key}={uri}: cannot use the MLflow tracking store ({str(err).splitlines()[0][:300]})") from None
        reap_dead_runs(self._client, experiment_id)
        self._uri = uri
        return experiment_id

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        """Open a new run: tags, then the flattened params in one call."""
        experiment_id = self._connected()  # first: importing MLflow here while the connecting thread does can fail halfway
        from mlflow.entities import Param

        tags = {**process_tags(), **tags, **({"mlflow.runName": self.run_name} if self.run_name else {})}
        run = self._client.create_run(experiment_id, tags=tags)
        self.run_id = run.info.run_id
        values = {k: str(v)[:_PARAM_VALUE_LIMIT] for k, v in params.items()}
        self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in values.items()])
        self._start_sender()
        log.info("MLflow run %s in experiment '%s' at %s", self.run_id, self.experiment_name, self._uri)

    def resume(self, run_id: str) -> None:
        """Continue an existing run: RUNNING again, and metrics it already holds are not sent twice."""
        self._connected()
        try:
            run = self._client.get_run(run_id)
        except Exception:
            raise ConfigError(f"trainer.resume: the checkpoint's MLflow run {run_id} is not in {self._uri}") from None
        self.run_id = run_id
        self._skip = {key: max(m.step for m in self._client.get_metric_history(run_id, key)) for key in run.data.metrics}
        self._client.update_run(run_id, status="RUNNING")
        self._client.set_tag(run_id, "tunelab.pid", str(_training_pid))
        self._start_sender()
        log.info("Continuing MLflow run %s at %s", run_id, self._uri)

    def _start_sender(self) -> None:
        self._sender = _BatchSender(self._client, self.run_id)
        self._sender.start()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer metrics for one step; they are sent at the next flush (no I/O here)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        skip = self._skip
        self._pending.extend(
            Metric(key, float(value), now, step) for key, value in metrics.items() if not skip or step > skip.get(key, -1)
        )

    def flush(self) -> None:
        """Hand buffered metrics to the sender thread (blocks only when its queue is full)."""
        while self._pending:
            batch, self._pending = self._pending[:_BATCH_LIMIT], self._pending[_BATCH_LIMIT:]
            self._sender.queue.put(batch)

    def log_text(self, text: str, name: str) -> None:
        self._client.log_text(self.run_id, text, name)

    def set_tag(self, key: str, value: str) -> None:
        self._client.set_tag(self.run_id, key, str(value)[:5000])

    def log_figure(self, figure, name: str) -> None:
        self._client.log_figure(self.run_id, figure, name)

    def log_lr_curves(self, curves: Mapping[str, list[float]], steps_per_epoch: int, name: str = "lr_curve.png") -> None:
        """The run's learning rate per param group and optimizer step, drawn as the figure `name`."""
        from tunelab import plots

        figure = plots.lr_curves(curves, steps_per_epoch, end_together=True)  # picks matplotlib's Agg backend before pyplot loads
        import matplotlib.pyplot as plt

        try:
            self.log_figure(figure, name)
        finally:
            plt.close(figure)

    def log_artifact(self, path: str | Path) -> None:
        self._client.log_artifact(self.run_id, str(path))

    def log_model(self, model, input_example) -> None:
        log_pytorch_model(self._uri, self.run_id, model, input_example)

    def store_call(self, name: str, args: tuple, kwargs: dict):
        """One method of this logger's tracking store, called for `HelperStore` in the training process."""
        require(not name.startswith("_"), f"the tracking store has no public method {name!r}")
        return getattr(self._client._tracking_client.store, name)(*args, **kwargs)

    def log_bytes(self, data: bytes, name: str) -> None:
        """A file made elsewhere (a rendered figure) as the artifact `name`."""
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / name
            path.write_bytes(data)
            self._client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        """Send everything still buffered, then set FINISHED, FAILED or KILLED."""
        if self.run_id is None:
            return
        error = None
        try:
            self.flush()
            self._sender.close()
            error = self._sender.error
        finally:
            try:
                self._client.set_terminated(self.run_id, status)
            except Exception as err:
                error = error or err
        if error is not None:
            raise ReportedError(
                f"MLflow at {self._uri} could not store all of run {self.run_id} "
                f"({str(error).splitlines()[0][:300]}); the run's checkpoint is still in its run folder"
            )


def mlflow_logger(tracking_uri: str | None, experiment_name: str, run_name: str | None = None, log_model: bool = True,
                  in_process: bool = False):
    """The logger `logger=mlflow` builds: MLflow's work done by a helper process (`ProcessLogger`), or
    by threads of the training process with `logger.in_process=true` (`MlflowLogger`)."""
    require(isinstance(in_process, bool), f"logger.in_process={in_process!r} must be true or false")
    args = (tracking_uri, experiment_name, run_name, log_model)
    if log_model is not False:
        PackageScan.start()  # started by train.py already; this is for train() called from Python
    if not in_process:
        try:
            return ProcessLogger(*args)
        except OSError as err:  # no process could be started
            log.warning("could not start the MLflow helper process (%s); logging from this process", err)
    return MlflowLogger(*args)


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
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        # A plain `python -c` child with two pipes: no fork of a process that may hold CUDA and
        # threads, and none of multiprocessing's start-up (which fails inside joblib's workers).
        to_child, inbox = os.pipe()
        outbox, from_child = os.pipe()
        code = f"from tunelab.tracking import _serve; _serve({to_child}, {from_child}, {os.getpid()})"
        self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(to_child, from_child), env=_child_env(), stdin=subprocess.DEVNULL)
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


def _child_env() -> dict[str, str]:
    """The environment of a `python -c` child of this process: this one's, with its module search
    path (an editable install, a test's sys.path) as PYTHONPATH."""
    import sys

    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _gone(err: BaseException) -> ReportedError:
    return ReportedError(f"the MLflow helper process is gone ({type(err).__name__}); the run's checkpoint is still in its run folder")


_helper: _Helper | None = None


def start_helper_early(logger_cfg: Mapping[str, Any]) -> None:
    """Start the helper process now, when `logger=mlflow` will use it, so that it imports MLflow
    while this process imports torch (train.py calls this first), and the package scan of the
    model upload when the run will log its model (`PackageScan`). Rank 0 only under torchrun."""
    if logger_cfg.get("_target_") != f"{__name__}.mlflow_logger" or os.environ.get("RANK", "0") != "0":
        return
    if logger_cfg.get("log_model", True) is not False:
        PackageScan.start()
    if logger_cfg.get("in_process"):
        return
    try:
        _get_helper()
    except OSError:
        pass  # mlflow_logger reports it and logs from this process


def _get_helper() -> _Helper:
    global _helper
    if _helper is None or not _helper.alive():
        _helper = _Helper()
    return _helper


def _serve(inbox: int, outbox: int, training_pid: int) -> None:
    """The helper process's loop: each message from the pipe `inbox` is a call on the current
    MlflowLogger; replies go to the pipe `outbox`."""
    import pickle
    import signal
    import sys
    from multiprocessing.connection import Connection

    receive, reply = Connection(inbox, writable=False), Connection(outbox, readable=False)

    global _training_pid
    _training_pid = training_pid
    for ignored in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2):
        signal.signal(ignored, signal.SIG_IGN)
    try:  # the slow imports first, while the training process is still importing torch
        for module in ("mlflow.entities", "mlflow.store.tracking.sqlalchemy_store"):
            importlib.import_module(module)
    except Exception:
        pass  # the first call reports what is missing
    logger, deferred = None, None
    while True:
        try:
            op, number, args = receive.recv()
        except (EOFError, OSError):  # the training process has ended (every run it finished is stored)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # skip tearing down MLflow's modules: the training process waits for this exit
        try:
            if op == "new":  # a new run's logger: its settings, MLflow's environment variables and folder
                kwargs, env, cwd = args
                for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
                    del os.environ[key]
                os.environ.update(env)
                os.chdir(cwd)
                logger, deferred = MlflowLogger(**kwargs), None
                logger.connect_in_background()
            elif op == "metrics":
                for metrics, step in args[0]:
                    logger.log_metrics(metrics, step)
                logger.flush()
            else:
                value = getattr(logger, op)(*args)
                if op in ("start", "resume"):
                    value = (logger.run_id, logger._uri)
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


class ProcessLogger(NullLogger):
    """MlflowLogger with its work done in a helper process (see `_Helper`).

    The training process then never imports MLflow for logging (over a second of start-up) and
    never runs the tracking store's Python code beside its loop: a step's metrics are a list
    append, a flush one message through a pipe. Only `log_model` runs here, as it needs the model,
    and it reaches the database through the helper's open connection (`HelperStore`).
    """

    def __init__(self, tracking_uri: str | None, experiment_name: str, run_name: str | None = None, log_model: bool = True):
        self._kwargs = dict(tracking_uri=tracking_uri, experiment_name=experiment_name, run_name=run_name, log_model=log_model)
        self.experiment_name = experiment_name
        self.log_model_enabled = log_model
        self.run_id = None
        self._uri = None
        self._pending: list[tuple[dict[str, float], int]] = []
        self._helper = _get_helper()
        self._announced = False

    def connect_in_background(self) -> None:
        """The helper imports MLflow and opens the store while this process builds data and model."""
        if not self._announced:
            env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
            self._helper.send("new", self._kwargs, env, os.getcwd())
            self._announced = True

    def wait_for_connection(self) -> None:
        if self._announced:
            self._helper.call("wait_for_connection")

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        self.connect_in_background()
        self.run_id, self._uri = self._helper.call("start", dict(params), dict(tags))
        log.info("MLflow run %s in experiment '%s' at %s", self.run_id, self.experiment_name, self._uri)

    def resume(self, run_id: str) -> None:
        self.connect_in_background()
        self.run_id, self._uri = self._helper.call("resume", run_id)
        log.info("Continuing MLflow run %s at %s", run_id, self._uri)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._pending.append(({key: float(value) for key, value in metrics.items()}, step))

    def flush(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            self._helper.send("metrics", batch)

    def log_text(self, text: str, name: str) -> None:
        self._helper.call("log_text", text, name)

    def set_tag(self, key: str, value: str) -> None:
        self._helper.call("set_tag", key, str(value))

    def log_figure(self, figure, name: str) -> None:
        import io

        buffer = io.BytesIO()
        figure.savefig(buffer, format=Path(name).suffix.lstrip(".") or "png")
        self._helper.call("log_bytes", buffer.getvalue(), name)

    def log_lr_curves(self, curves: Mapping[str, list[float]], steps_per_epoch: int, name: str = "lr_curve.png") -> None:
        """Drawn and stored by the helper process, without a reply, while this process goes on (to
        log the model, on the other core); an error there is reported by `finish`."""
        self._helper.send("log_lr_curves", dict(curves), steps_per_epoch, name)

    def log_artifact(self, path: str | Path) -> None:
        self._helper.call("log_artifact", str(Path(path).resolve()))

    def log_model(self, model, input_example) -> None:
        """Logged here, where the model is, through the helper's open store where MLflow can be told
        to use it (`HelperStore`): opening a database store here would import its SQL layer anew."""
        log_pytorch_model(helper_store_uri(self._uri), self.run_id, model, input_example)

    def finish(self, status: str) -> None:
        if self.run_id is None:
            return
        self.flush()
        self._helper.call("finish", status)


#: The URI scheme of `HelperStore`, registered with MLflow as a tracking-store plugin (pyproject.toml).
HELPER_STORE_SCHEME = "tunelab-helper"
#: The URI schemes of MLflow's database stores; the others (a server) cost nothing to open.
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def helper_store_uri(uri: str) -> str:
    """`tunelab-helper:URI` for a database store when MLflow knows `HelperStore` (tunelab is
    installed), else URI itself. A server's URI stays: MLflow finds its artifacts through it."""
    if uri.split(":", 1)[0].split("+", 1)[0] not in _DATABASE_SCHEMES or not _helper_store_registered():
        return uri
    return f"{HELPER_STORE_SCHEME}:{uri}"


@functools.cache
def _helper_store_registered() -> bool:
    from importlib.metadata import entry_points

    target = f"{__name__}:{HelperStore.__name__}"
    return any(e.name == HELPER_STORE_SCHEME and e.value == target for e in entry_points(group="mlflow.tracking_store"))


class HelperStore:
    """The tracking store MLflow opens in the training process for `tunelab-helper:` URIs: each
    method call is made on the store of the helper process's current run, which is open already.

    Logging a model then costs this process no second connection to the database (and none of
    the second of imports that opening it takes). Only `log_model` uses it; the model's files
    are written by MLflow here, to the artifact location the store gives.
    """

    def __init__(self, store_uri: str | None = None, artifact_uri: str | None = None) -> None:
        self.store_uri = store_uri

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def forwarded(*args, **kwargs):
            if _helper is None or not _helper.alive():
                raise ReportedError(f"{self.store_uri}: the MLflow helper process is not running")
            return _helper.call("store_call", name, args, kwargs)

        forwarded.__name__ = name
        return forwarded

    def shut_down_async_logging(self) -> None:
        """MLflow's `end_run` stops the store's queue of asynchronous logging; this one has none,
        and the helper's store serves the rest of the run."""


class PackageScan:
    """The map of installed packages to their modules, computed by a process at idle priority.

    MLflow checks a logged model's pip requirements against the installed packages, and for that
    maps every installed package to the modules it provides
    (`importlib_metadata.packages_distributions`, which reads each package's list of files): about
    half a second of the model upload here, and the same answer every time in one environment.
    `start` runs that scan in a separate Python process at idle priority, which takes only a core
    nothing else wants (the end of start-up, or beside the upload, which uses one core). `used()`
    hands its answer to MLflow for the duration of the upload; MLflow scans by itself when the scan
    failed or has not finished within a second of being needed (every core busy).
    """

    _process = None
    _result: dict[str, list[str]] | None = None
    _CODE = (
        "import json, os, sys\n"
        "if hasattr(os, 'sched_setscheduler'):\n"
        "    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
        "else:\n"
        "    os.nice(19)\n"
        "import importlib_metadata\n"
        "json.dump(importlib_metadata.packages_distributions(), sys.stdout)\n"
    )

    @classmethod
    def start(cls) -> None:
        """Start the scan once per process (a sweep's later jobs reuse its answer, as MLflow does)."""
        import subprocess
        import sys

        if cls._process is not None or cls._result is not None:
            return
        try:
            cls._process = subprocess.Popen(
                [sys.executable, "-c", cls._CODE], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_child_env(),
            )
        except OSError:
            cls._process = None

    @classmethod
    def result(cls, wait_s: float = 1.0) -> dict[str, list[str]] | None:
        """The scan's map, waiting up to `wait_s` for it; None when there is none to be had."""
        import json
        import subprocess

        if cls._result is None and cls._process is not None:
            process, cls._process = cls._process, None
            try:
                out, _ = process.communicate(timeout=wait_s)
                if process.returncode == 0:
                    cls._result = json.loads(out)
            except (subprocess.TimeoutExpired, ValueError):
                process.kill()
                process.communicate()
        return cls._result

    @classmethod
    @contextmanager
    def used(cls):
        """Within the block, `importlib_metadata.packages_distributions()` answers from the scan
        (a fresh copy each call) when it has one; the function is put back after."""
        try:
            import importlib_metadata
        except ImportError:
            yield
            return
        original = importlib_metadata.packages_distributions

        def packages_distributions():
            mapping = cls.result()
            if mapping is None:
                return original()
            return {module: list(packages) for module, packages in mapping.items()}

        importlib_metadata.packages_distributions = packages_distributions
        try:
            yield
        finally:
            importlib_metadata.packages_distributions = original


def log_pytorch_model(uri: str, run_id: str, model, input_example) -> None:
    """`mlflow.pytorch.log_model(name="model")` into run `run_id` of the store at `uri`, with
    explicit pip requirements (MLflow's own inference of them takes about 10 s).

    MLflow's safe `pt2` format (torch.export, traced on `input_example`, which should hold at
    least two images so the batch size stays dynamic) is tried first. MLflow's optional check of
    the serving example (loading the saved model back and predicting, which only warns on failure)
    is skipped there: it was a fifth of the upload's time, and on a GPU machine it loaded the
    CPU-saved model on CUDA and failed. A model torch.export cannot trace is saved in the pickle
    format instead, with a warning; MLflow loads that only with
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true. The check stays on for it, because MLflow passes
    the pickle format's extra arguments on to torch.save, which rejects that one.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    # MLflow's fluent API logs to its process-wide tracking URI, which mlflow.set_tracking_uri also
    # exports as MLFLOW_TRACKING_URI. Both are put back after: else this process's later runs
    # (sweep jobs, the helper's next connection) and its user's own MLflow calls would go to this
    # store, or through the helper to whatever run it serves next.
    with _environment_kept("MLFLOW_TRACKING_URI"), _use_tracking_uri(uri), PackageScan.used():
        with mlflow.start_run(run_id=run_id):
            requirements = pip_requirements()
            try:
                mlflow.pytorch.log_model(
                    model, name="model", input_example=input_example, pip_requirements=requirements, serialization_format="pt2",
                    validate_serving_input=False,
                )
                return
            except Exception as err:
                log.warning(
                    "torch.export could not trace the model (%s); logging it in the pickle format, which loads only with "
                    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true", str(err).splitlines()[0][:200],
                )
                failed = mlflow.last_logged_model()  # the attempt left a FAILED model entry in the run
                if failed is not None and failed.source_run_id == run_id and failed.status == "FAILED":
                    mlflow.MlflowClient().delete_logged_model(failed.model_id)
            mlflow.pytorch.log_model(model, name="model", input_example=input_example, pip_requirements=requirements, serialization_format="pickle")


@contextmanager
def _environment_kept(*names: str):
    """Put these environment variables back as they were (absent ones removed) after the block."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def process_tags() -> dict[str, str]:
    """Where and with what the run was made: host and pid (to spot dead runs), library versions,
    the project's git commit (the tag MLflow's UI shows as the source version)."""
    import platform
    import socket
    import subprocess

    tags = {"tunelab.host": socket.gethostname(), "tunelab.pid": str(_training_pid), "version.python": platform.python_version()}
    for package in ("tunelab", "torch", "torchvision", "timm", "mlflow", "hydra-core"):
        found = installed(package)
        if found:
            tags[f"version.{package}"] = found[1]
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def reap_dead_runs(client, experiment_id: str) -> None:
    """Mark KILLED the RUNNING runs of this host whose process is gone (a `kill -9`, a power cut), in
    every experiment of the store: the dead run may have used another `logger.experiment_name`."""
    import socket

    host = socket.gethostname()
    try:
        experiments = {experiment_id} | {e.experiment_id for e in client.search_experiments(max_results=1000)}
        runs = client.search_runs(
            sorted(experiments), filter_string=f"attributes.status = 'RUNNING' and tags.`tunelab.host` = '{host}'", max_results=200,
        )
    except Exception:
        return
    for run in runs:
        tags = run.data.tags
        if tags.get("tunelab.host") != host or not tags.get("tunelab.pid", "").isdigit():
            continue
        pid = int(tags["tunelab.pid"])
        if pid == _training_pid:
            continue
        try:
            os.kill(pid, 0)
            continue  # still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        client.set_tag(run.info.run_id, "tunelab.ended", "process gone (killed); marked KILLED by a later run")
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning("MLflow run %s was left RUNNING by process %d, which is gone: marked KILLED", run.info.run_id, pid)


def installed(package: str) -> tuple[str, str] | None:
    """(distribution, version) of an installed package, or None; MLflow may be installed as
    `mlflow-skinny` alone (servers and small images do that)."""
    from importlib.metadata import PackageNotFoundError, version

    for distribution in (package, "mlflow-skinny") if package == "mlflow" else (package,):
        try:
            return distribution, version(distribution)
        except PackageNotFoundError:
            continue
    return None


def pip_requirements() -> list[str]:
    """The packages a logged model needs, pinned to the versions installed here."""
    found = [installed(package) for package in ("torch", "torchvision", "timm", "mlflow")]
    return [f"{distribution}=={version}" for distribution, version in filter(None, found)]
