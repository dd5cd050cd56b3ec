"""The entry point's error handling: bad input ends as one short paragraph and an exit code, and a
failing job of a sweep is recorded without stopping the sweep (`train.py` wraps its task in
`report_errors`)."""

from __future__ import annotations

import functools
import logging
import os
import sys

from tunelab.errors import ReportedError


def report_errors(task):
    """Wrap a Hydra task so a ReportedError ends with its short message and exit code, not a traceback.

    Inside a multirun a failing job must not stop the sweep: its error is recorded in MLflow (a
    FAILED child run with the tag `tunelab.error`), the job returns NaN (a failed trial for
    Optuna) and the sweep goes on. With HYDRA_FULL_ERROR=1 errors propagate as usual.
    """
    @functools.wraps(task)
    def wrapper(cfg):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        try:
            return task(cfg)
        except Exception as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            if multirun:
                from tunelab.sweep import job_failed

                if not isinstance(err, ReportedError):
                    logging.getLogger("tunelab").exception("The job raised")
                job_failed(cfg, err)
                return float("nan")
            if not isinstance(err, ReportedError):
                raise
            _to_log_files(str(err))
            print(f"Error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None

    return wrapper


def _to_log_files(message: str) -> None:
    """`message` as an ERROR record in the log files only (Hydra's job log): the terminal shows it
    once, as the `Error:` paragraph on stderr, not a second time through the console handler."""
    logger = logging.getLogger("tunelab")
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
