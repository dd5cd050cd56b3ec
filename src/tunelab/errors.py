"""The one exception type for bad input, so the entry point can report it without a traceback."""


class ConfigError(ValueError):
    """A bad config value, missing file or unusable option.

    The message names the key or file and says what would be right; `train.py` prints it as one
    short paragraph and exits non-zero (the full traceback only with HYDRA_FULL_ERROR=1).
    """


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
    """Wrap a Hydra task so bad input ends with a short message and exit code 2, not a traceback.

    With HYDRA_FULL_ERROR=1, or inside a multirun (where the sweep must go on to the next job),
    the ConfigError propagates as usual.
    """
    import functools
    import logging
    import os
    import sys

    @functools.wraps(task)
    def wrapper(cfg):
        try:
            return task(cfg)
        except ConfigError as err:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or multirun:
                raise
            logging.getLogger("tunelab").error("%s", err)
            print(f"Error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
