"""Everything MLflow, one concern per module, each importing only the ones listed before it:

- `store`: the tracking URI, opening the store (under a lock for a new sqlite file), experiments.
- `tags`: tag names (`GROUPS`, `KIND_TAG`, `PARENT_RUN_TAG`), a run's process and version tags,
  reaping runs left RUNNING by a dead process.
- `children`: starting the Python child processes (the helper, the package scan).
- `upload`: the model upload (`log_pytorch_model`), its pip requirements and package scan.
- `logger`: the logger interface (`NullLogger`, `logger=none`), `MlflowLogger` (one run's MLflow
  work in this process, metrics sent in batches by a thread), `flatten`.
- `helper`: the helper process that runs `MlflowLogger` for the training process, and its pipe.
- `plugin`: `HelperStore`, the MLflow tracking-store plugin that reaches the helper's open store.
- `process_logger`: `ProcessLogger`, the logger whose work the helper process does.
- `factory`: `mlflow_logger` (what `logger=mlflow` builds) and `start_helper_early`.

The names below are the package's interface (config files name `tunelab.tracking.mlflow_logger`
and `tunelab.tracking.NullLogger`).
"""

from tunelab.tracking.factory import mlflow_logger, start_helper_early
from tunelab.tracking.logger import MlflowLogger, NullLogger, flatten
from tunelab.tracking.plugin import HELPER_STORE_SCHEME, HelperStore, helper_store_uri
from tunelab.tracking.process_logger import ProcessLogger
from tunelab.tracking.store import (
    EXPERIMENT_KIND_TAG, artifact_location, get_or_create_experiment, open_store, resolve_tracking_uri, store_lock,
)
from tunelab.tracking.tags import GROUPS, KIND_TAG, PARENT_RUN_TAG, installed, process_tags, reap_dead_runs
from tunelab.tracking.upload import PackageScan, log_pytorch_model, pip_requirements

__all__ = [
    "EXPERIMENT_KIND_TAG", "GROUPS", "HELPER_STORE_SCHEME", "HelperStore", "KIND_TAG", "MlflowLogger", "NullLogger",
    "PARENT_RUN_TAG", "PackageScan", "ProcessLogger", "artifact_location", "flatten", "get_or_create_experiment",
    "helper_store_uri", "installed", "log_pytorch_model", "mlflow_logger", "open_store", "pip_requirements",
    "process_tags", "reap_dead_runs", "resolve_tracking_uri", "start_helper_early", "store_lock",
]
