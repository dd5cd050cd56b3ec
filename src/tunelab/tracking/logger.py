"""The logger the loop talks to: `NullLogger` (`logger=none`, and the interface), and
`MlflowLogger`, which does the MLflow work of one run in this process.

The loop calls a small logger object, so it runs the same with tracking off and tests point it at a
temporary sqlite file. Per-step metrics are buffered and sent in batches (`MlflowClient.log_batch`)
by a background thread with a bounded queue, so the training step never waits on the tracking
store; `flush()` hands over what is buffered and `finish()` waits until every batch has arrived
before it sets the run's final status.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from tunelab.errors import ConfigError, ReportedError, require
from tunelab.tracking.store import client_store, open_store, resolve_tracking_uri
from tunelab.tracking.tags import process_tags, reap_dead_runs, training_pid
from tunelab.tracking.upload import log_pytorch_model

log = logging.getLogger(__name__)

#: MLflow refuses param values longer than this many characters.
_PARAM_VALUE_LIMIT = 6000
#: MLflow accepts at most this many metrics in one log_batch call.
_BATCH_LIMIT = 1000


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
    #: The run's experiment and the store's URI, once the run has started (for the link to the UI).
    experiment_id: str | None = None
    uri: str | None = None
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

    def log_test_figures(self, figures) -> None:
        pass

    def log_model(self, model, input_example, info=None) -> None:
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
        self.uri: str | None = None  # the URI in use once connected: MLFLOW_TRACKING_URI, else tracking_uri
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
        self.uri = uri
        return experiment_id

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        """Open a new run: tags, then the flattened params in one call."""
        experiment_id = self._connected()  # first: importing MLflow here while the connecting thread does can fail halfway
        from mlflow.entities import Param

        tags = {**process_tags(), **tags, **({"mlflow.runName": self.run_name} if self.run_name else {})}
        self.experiment_id = experiment_id
        run = self._client.create_run(experiment_id, tags=tags)
        self.run_id = run.info.run_id
        values = {k: str(v)[:_PARAM_VALUE_LIMIT] for k, v in params.items()}
        self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in values.items()])
        self._start_sender()
        log.info("MLflow run %s in experiment '%s' at %s", self.run_id, self.experiment_name, self.uri)

    def resume(self, run_id: str) -> None:
        """Continue an existing run: RUNNING again, and metrics it already holds are not sent twice."""
        self._connected()
        try:
            run = self._client.get_run(run_id)
        except Exception:
            raise ConfigError(f"trainer.resume: the checkpoint's MLflow run {run_id} is not in {self.uri}") from None
        self.run_id, self.experiment_id = run_id, run.info.experiment_id
        self._skip = {key: max(m.step for m in self._client.get_metric_history(run_id, key)) for key in run.data.metrics}
        self._client.update_run(run_id, status="RUNNING")
        self._client.set_tag(run_id, "tunelab.pid", str(training_pid()))
        self._start_sender()
        log.info("Continuing MLflow run %s at %s", run_id, self.uri)

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

    def log_test_figures(self, figures) -> None:
        """The held-out test's figures (`tunelab.predictions.TestFigures`), drawn here, logged, and
        written to their run folder when they have one."""
        from tunelab.plots import pyplot

        drawn = figures.draw()
        try:
            for name, figure in drawn.items():
                if figures.folder is None:
                    self.log_figure(figure, name)
                    continue
                path = Path(figures.folder) / name
                figure.savefig(path, dpi=110)  # rendered once: the run folder's file is the artifact
                self.log_artifact(path)
        finally:
            for figure in drawn.values():
                pyplot().close(figure)

    def log_model(self, model, input_example, info=None) -> None:
        """The model as `model`; with a `ModelInfo`, one that classifies images (tunelab.serving)."""
        log_pytorch_model(self.uri, self.run_id, model, input_example, info)

    def store_call(self, name: str, args: tuple, kwargs: dict):
        """One method of this logger's tracking store, called for `HelperStore` in the training process."""
        require(not name.startswith("_"), f"the tracking store has no public method {name!r}")
        return getattr(client_store(self._client), name)(*args, **kwargs)

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
                f"MLflow at {self.uri} could not store all of run {self.run_id} "
                f"({str(error).splitlines()[0][:300]}); the run's checkpoint is still in its run folder"
            )
