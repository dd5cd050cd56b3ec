"""What `logger=mlflow` builds (`mlflow_logger`, the config's `_target_`), and starting its helper
process early (`start_helper_early`, called first by train.py)."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from tunelab.errors import require
from tunelab.tracking.helper import get_helper
from tunelab.tracking.logger import MlflowLogger
from tunelab.tracking.process_logger import ProcessLogger
from tunelab.tracking.upload import PackageScan

log = logging.getLogger(__name__)


def mlflow_logger(tracking_uri: str | None, experiment_name: str, run_name: str | None = None, log_model: bool = True,
                  in_process: bool = False, register: bool = True, registered_model_name: str | None = None):
    """The logger `logger=mlflow` builds: MLflow's work done by a helper process (`ProcessLogger`), or
    by threads of the training process with `logger.in_process=true` (`MlflowLogger`). `register` and
    `registered_model_name` are checked here and used at the end of a sweep (tunelab.registry)."""
    require(isinstance(in_process, bool), f"logger.in_process={in_process!r} must be true or false")
    require(isinstance(register, bool), f"logger.register={register!r} must be true or false")
    require(registered_model_name is None or (isinstance(registered_model_name, str) and registered_model_name.strip()),
            f"logger.registered_model_name={registered_model_name!r} must be a name, or null for the experiment's name")
    args = (tracking_uri, experiment_name, run_name, log_model)
    if log_model is not False:
        PackageScan.start()  # started by train.py already; this is for train() called from Python
    if not in_process:
        try:
            return ProcessLogger(*args)
        except OSError as err:  # no process could be started
            log.warning("could not start the MLflow helper process (%s); logging from this process", err)
    return MlflowLogger(*args)


def start_helper_early(logger_cfg: Mapping[str, Any]) -> None:
    """Start the helper process now, when `logger=mlflow` will use it, so that it imports MLflow
    while this process imports torch (train.py calls this first), and the package scan of the
    model upload when the run will log its model (`PackageScan`). Rank 0 only under torchrun.

    `logger=mlflow` is a `_target_` of `tunelab.tracking.mlflow_logger` (or of this module's)."""
    targets = {f"{module}.{mlflow_logger.__name__}" for module in (__package__, __name__)}
    if logger_cfg.get("_target_") not in targets or os.environ.get("RANK", "0") != "0":
        return
    if logger_cfg.get("log_model", True) is not False:
        PackageScan.start()
    if logger_cfg.get("in_process"):
        return
    try:
        get_helper()
    except OSError:
        pass  # mlflow_logger reports it and logs from this process
