"""`HelperStore`, the MLflow tracking-store plugin through which the training process logs its
model into the helper process's open store (registered in pyproject.toml under
`[project.entry-points."mlflow.tracking_store"]`), and the `tunelab-helper:` URIs that reach it."""

from __future__ import annotations

import functools

from tunelab.errors import ReportedError
from tunelab.tracking.helper import running_helper

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
    """Whether the installed tunelab registers this very class as the store of `tunelab-helper:`."""
    from importlib.metadata import entry_points

    target = f"{HelperStore.__module__}:{HelperStore.__qualname__}"
    return any(e.value == target for e in entry_points(group="mlflow.tracking_store", name=HELPER_STORE_SCHEME))


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
            helper = running_helper()
            if helper is None:
                raise ReportedError(f"{self.store_uri}: the MLflow helper process is not running")
            return helper.call("store_call", name, args, kwargs)

        forwarded.__name__ = name
        return forwarded

    def shut_down_async_logging(self) -> None:
        """MLflow's `end_run` stops the store's queue of asynchronous logging; this one has none,
        and the helper's store serves the rest of the run."""
