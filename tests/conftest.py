"""Shared fixtures: the real config composed with Hydra's compose API, shrunk for quick runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ("model", "scheduler", "optimizer", "freeze", "data", "trainer", "logger")

#: Overrides that make a run take seconds: few epochs, few batches, CPU, no progress bar.
SMALL = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.device=cpu",
    "trainer.progress=false",
    "data.batch_size=16",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_config(overrides: list[str], tracking_uri: str | None = None) -> DictConfig:
    """Compose conf/config.yaml like `python train.py OVERRIDES` does, with HydraConfig set."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        if tracking_uri and "tracking_uri" in cfg.logger:
            cfg.logger.tracking_uri = tracking_uri
    return cfg


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite tracking store for one test (MLFLOW_TRACKING_URI cleared)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def small_cfg(tracking_uri):
    """compose_config with SMALL overrides and the test's tracking store."""

    def make(*overrides: str, log_model: bool = False) -> DictConfig:
        extra = [] if log_model or "logger=none" in overrides else ["logger.log_model=false"]
        return compose_config([*SMALL, *extra, *overrides], tracking_uri)

    return make


def run_train(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python train.py ARGS` as a user types it, from `cwd` (outputs/ lands there)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def mlflow_runs(tracking_uri: str, experiment: str = "tunelab"):
    """All runs of an experiment, oldest first."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, []
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return client, runs


def metric_series(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
