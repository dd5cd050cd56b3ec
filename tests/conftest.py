"""Shared fixtures: the real config composed with Hydra's compose API, shrunk for quick runs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
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


@pytest.fixture(autouse=True, scope="session")
def _own_cache_folder(tmp_path_factory):
    """Decoded images and split files of this session in a folder of its own, not the user's cache
    (processes the tests start inherit it; a test may point TUNELAB_CACHE elsewhere)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNELAB_CACHE", str(tmp_path_factory.mktemp("tunelab-cache")))
        yield


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_full(overrides: list[str]) -> DictConfig:
    """conf/config.yaml composed like `python train.py OVERRIDES` does, `hydra` node included."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def compose_config(overrides: list[str], tracking_uri: str | None = None) -> DictConfig:
    """Compose conf/config.yaml like `python train.py OVERRIDES` does, with HydraConfig set."""
    cfg = compose_full(overrides)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        if tracking_uri and "tracking_uri" in cfg.logger:
            cfg.logger.tracking_uri = tracking_uri
    return cfg


@pytest.fixture(scope="session")
def _empty_tracking_store(tmp_path_factory) -> Path:
    """An sqlite tracking store as MLflow makes it on first use (its tables and the Default
    experiment), made once: creating the tables takes MLflow about 0.7 s a store."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch, _empty_tracking_store) -> str:
    """A fresh sqlite tracking store for one test (a copy of the empty one; MLFLOW_TRACKING_URI cleared)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copyfile(_empty_tracking_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def second_validation_fails(monkeypatch):
    """The run's second validation pass (the end of epoch 2 of a SMALL run) raises RuntimeError("boom")."""
    from tunelab import loop

    calls = {"n": 0}
    real = loop.evaluate

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate)


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


#: No telemetry or other calls out of this machine, from a run or an MLflow server.
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
#: The server without its GenAI job runner (a pool of huey consumers, and a folder in /dev/shm that
#: outlives a killed server): quicker to start, and nothing left behind.
SERVER_ENV = {**QUIET_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
SERVER_START_S = 90


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_command() -> list[str]:
    script = Path(sys.executable).parent / "mlflow"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlflow"]


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def answers(base: str) -> bool:
    """True when an MLflow server at `base` answers /health."""
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@contextmanager
def mlflow_server(backend_uri: str, cwd: Path):
    """`mlflow server` on 127.0.0.1 at a free port, answering /health; yields its base URL.

    It serves artifacts itself (`--artifacts-destination cwd/server-artifacts`): clients upload and
    download them over HTTP. Always stopped at the end (its whole process group: SIGTERM, then
    SIGKILL), also when the test fails."""
    port = free_port()
    log = cwd / "mlflow-server.log"
    cmd = [*mlflow_command(), "server", "--backend-store-uri", backend_uri,
           "--artifacts-destination", (cwd / "server-artifacts").as_uri(),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    env = {**os.environ, **SERVER_ENV}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not answers(base):
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode} before answering /health:\n{tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer {base}/health within {SERVER_START_S} s:\n{tail(log)}")
            time.sleep(0.5)
        yield base
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM the server's process group (uvicorn workers included), SIGKILL it if still there."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_at_check(monkeypatch, n: int) -> None:
    """The loop's stop flag answers yes the n-th time it is asked (after every optimizer step and
    every epoch's end), as if a SIGTERM had come then."""
    from tunelab.callbacks.signals import StopFlag

    checks = {"n": 0}

    def asked(self):
        checks["n"] += 1
        return checks["n"] == n

    monkeypatch.setattr(StopFlag, "__call__", asked)


#: What a scheduler option needs on the short runs of the tests (its preset's milestones fit 8 epochs).
SHORT_RUN = {"sequential": ["scheduler.milestones=[0.5,1]"]}


def scheduler_option(name: str) -> list[str]:
    """The overrides that choose scheduler option `name` for a short test run."""
    return [f"scheduler={name}", *SHORT_RUN.get(name, [])]
