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
