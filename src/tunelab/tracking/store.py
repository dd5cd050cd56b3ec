"""The tracking store: which URI a run logs to, opening it (a new sqlite store made once, under a
file lock), the experiment the runs go in, and the store object behind an `MlflowClient`."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

#: Tag MLflow's UI reads on an experiment: open it in the classic (not GenAI) view.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")


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


def client_store(client):
    """The tracking store object (`mlflow.store.tracking.abstract_store.AbstractStore`) an
    `MlflowClient` works on, whose methods `HelperStore` forwards calls to.

    MLflow has no public way to get it, so this is tunelab's one use of a private MLflow name
    (`MlflowClient._tracking_client.store`); tests/test_tracking_process.py fails, naming the MLflow
    version, when MLflow changes it."""
    return client._tracking_client.store
