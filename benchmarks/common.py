"""Helpers shared by the benchmark scripts: compose the real config, capture a run's history, start
the MLflow logger a run uses."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def train_history(overrides: list[str]):
    """Run tunelab.run.train with the overrides and return the loop's History (per-epoch seconds)."""
    from tunelab import loop, run

    captured = {}

    def capture(*args, **kwargs):
        captured["history"] = loop.fit(*args, **kwargs)
        return captured["history"]

    run.fit = capture
    try:
        run.train(compose(overrides))
    finally:
        run.fit = loop.fit
    result = captured["history"]
    return getattr(result, "history", result)  # fit returns the loop's state, which holds the History


def say(line: str = "") -> None:
    print(line, flush=True)
    sys.stdout.flush()


def started_logger(db: Path, experiment: str, **options):
    """The MLflow logger `logger=mlflow` builds (`options`: e.g. `in_process=True`), on the sqlite
    file `db`, connected and with a run started; model logging off."""
    from tunelab.tracking import mlflow_logger

    logger = mlflow_logger(f"sqlite:///{db}", experiment, log_model=False, **options)
    logger.connect_in_background()
    logger.start({}, {})
    return logger
