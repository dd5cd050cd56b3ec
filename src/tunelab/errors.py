"""The one exception type for bad input, so the entry point can report it without a traceback."""


class ReportedError(Exception):
    """An error whose message tells the whole story: `train.py` prints it as one short paragraph,
    without a traceback (unless HYDRA_FULL_ERROR=1), and exits with `exit_code`."""

    exit_code = 1


class ConfigError(ReportedError, ValueError):
    """A bad config value, missing file or unusable option; the message names the key or file and
    says what would be right. Raised before any training step, so nothing is lost."""

    exit_code = 2


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)


def build(node, key: str, *args, **kwargs):
    """`hydra.utils.instantiate(node, *args, **kwargs)`, with a bad key or value reported as ConfigError.

    `key` is the config group (`scheduler`, `optimizer`, ...) named in the message.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(f"{key}: could not build {node.get('_target_', key)}: {cause}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: could not build {node.get('_target_', key)}: {err}") from None


def report_errors(task):
    """Wrap a Hydra task so a ReportedError ends with its short message and exit code, not a traceback.

    Inside a multirun a failing job must not stop the sweep: its error is recorded in MLflow (a
    FAILED child run with the tag `tunelab.error`), the job returns NaN (a failed trial for
    Optuna) and the sweep goes on. With HYDRA_FULL_ERROR=1 errors propagate as usual.
    """
    import functools
    import logging
    import os
    import sys

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
    import logging

    logger = logging.getLogger("tunelab")
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
