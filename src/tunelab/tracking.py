"""Everything MLflow: the run's life cycle, batched metrics, params, tags, artifacts, the model.

The loop talks to a small logger object (`MlflowLogger`, or `NullLogger` for `logger=none`), so it
runs the same with tracking off and tests point it at a temporary sqlite file. Per-step metrics are
buffered and sent in batches (`MlflowClient.log_batch`) by a background thread with a bounded queue:
the training step never waits on the tracking store; `flush()` hands over what is buffered and
`finish()` waits until every batch has arrived before it sets the run's final status.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from tunelab.errors import ConfigError, ReportedError

log = logging.getLogger(__name__)

#: MLflow refuses param values longer than this many characters.
_PARAM_VALUE_LIMIT = 6000
#: MLflow accepts at most this many metrics in one log_batch call.
_BATCH_LIMIT = 1000
#: Tags MLflow's UI reads: open in the classic (not GenAI) view, and group child runs under a parent.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
PARENT_RUN_TAG = "mlflow.parentRunId"
#: Tag of the runs that are not trainings (`lr_find` for an LR range test); comparisons skip them.
KIND_TAG = "tunelab.kind"


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
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_location(uri: str, experiment: str) -> str | None:
    """For a sqlite store, artifacts go beside the database (outputs/mlartifacts/NAME), not into
    ./mlruns of whatever directory a process happens to run in; a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).expanduser().resolve().parent / "mlartifacts" / experiment).as_uri()


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
        from mlflow import MlflowClient

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
        self._client = MlflowClient(uri)
        try:
            experiment_id = get_or_create_experiment(self._client, self.experiment_name)
        except Exception as err:
            raise ConfigError(f"{key}={uri}: cannot use the MLflow tracking store ({str(err).splitlines()[0][:300]})") from None
        reap_dead_runs(self._client, experiment_id)
        self._uri = uri
        return experiment_id

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        """Open a new run: tags, then the flattened params in one call."""
        import mlflow
        from mlflow.entities import Param

        experiment_id = self._connected()
        tags = {**process_tags(), **tags, **({"mlflow.runName": self.run_name} if self.run_name else {})}
        run = self._client.create_run(experiment_id, tags=tags)
        self.run_id = run.info.run_id
        mlflow.set_tracking_uri(self._uri)
        values = {k: str(v)[:_PARAM_VALUE_LIMIT] for k, v in params.items()}
        self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in values.items()])
        self._start_sender()
        log.info("MLflow run %s in experiment '%s' at %s", self.run_id, self.experiment_name, self._uri)

    def resume(self, run_id: str) -> None:
        """Continue an existing run: RUNNING again, and metrics it already holds are not sent twice."""
        import mlflow

        self._connected()
        try:
            run = self._client.get_run(run_id)
        except Exception:
            raise ConfigError(f"trainer.resume: the checkpoint's MLflow run {run_id} is not in {self._uri}") from None
        self.run_id = run_id
        self._skip = {key: max(m.step for m in self._client.get_metric_history(run_id, key)) for key in run.data.metrics}
        self._client.update_run(run_id, status="RUNNING")
        self._client.set_tag(run_id, "tunelab.pid", str(os.getpid()))
        mlflow.set_tracking_uri(self._uri)
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

    def log_artifact(self, path: str | Path) -> None:
        self._client.log_artifact(self.run_id, str(path))

    def log_model(self, model, input_example) -> None:
        """`mlflow.pytorch.log_model(name="model")` with explicit pip requirements (no slow inference).

        MLflow's safe `pt2` format (torch.export, traced on `input_example`, which should hold at
        least two images so the batch size stays dynamic) is tried first; a model torch.export cannot
        trace is saved in the pickle format instead, with a warning.
        """
        import mlflow
        import mlflow.pytorch

        # The model is saved from the CPU. MLflow checks the input example by loading the model
        # through pyfunc, which picks CUDA when a GPU is present, and a pt2 model saved on the
        # CPU cannot be loaded there, so on a GPU machine the check would fail with a warning.
        # A user who set MLFLOW_DEFAULT_PREDICTION_DEVICE keeps that choice.
        user_set = "MLFLOW_DEFAULT_PREDICTION_DEVICE" in os.environ
        os.environ.setdefault("MLFLOW_DEFAULT_PREDICTION_DEVICE", "cpu")
        try:
            self._log_model(mlflow, model, input_example)
        finally:
            if not user_set:
                os.environ.pop("MLFLOW_DEFAULT_PREDICTION_DEVICE", None)

    def _log_model(self, mlflow, model, input_example) -> None:
        with mlflow.start_run(run_id=self.run_id):
            for fmt in ("pt2", "pickle"):
                try:
                    mlflow.pytorch.log_model(
                        model,
                        name="model",
                        input_example=input_example,
                        pip_requirements=pip_requirements(),
                        serialization_format=fmt,
                    )
                    return
                except Exception as err:
                    if fmt == "pickle":
                        raise
                    log.warning("torch.export could not trace the model (%s); logging it in the pickle format", str(err).splitlines()[0][:200])

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


def process_tags() -> dict[str, str]:
    """Where and with what the run was made: host and pid (to spot dead runs), library versions,
    the project's git commit (the tag MLflow's UI shows as the source version)."""
    import platform
    import socket
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    tags = {"tunelab.host": socket.gethostname(), "tunelab.pid": str(os.getpid()), "version.python": platform.python_version()}
    for package in ("tunelab", "torch", "torchvision", "timm", "mlflow", "hydra-core"):
        try:
            tags[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            continue
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def reap_dead_runs(client, experiment_id: str) -> None:
    """Mark KILLED the RUNNING runs of this host whose process is gone (a `kill -9`, a power cut)."""
    import socket

    host = socket.gethostname()
    try:
        runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=200)
    except Exception:
        return
    for run in runs:
        tags = run.data.tags
        if tags.get("tunelab.host") != host or not tags.get("tunelab.pid", "").isdigit():
            continue
        pid = int(tags["tunelab.pid"])
        if pid == os.getpid():
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


def pip_requirements() -> list[str]:
    """The packages a logged model needs, pinned to the versions installed here."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "torchvision", "timm", "mlflow"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins
