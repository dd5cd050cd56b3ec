"""Beyond one process: sweeps through submitit's launchers, and runs logged to a shared MLflow server.

- `hydra/launcher=submitit_local` runs each job of a sweep in its own process, as a SLURM job would
  run on a compute node; the sweep is grouped in MLflow like any other (one parent, nested children,
  the comparison at the end), and a SIGTERM to the launching process ends the parent KILLED.
- `hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml) composes, and submitit turns it into the
  sbatch script it would submit (no SLURM here: the submission itself is stubbed).
- `python train.py` with MLFLOW_TRACKING_URI=http://... logs to a real `mlflow server`: params,
  metrics and every artifact (the model included) go over HTTP into the server's own stores.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from conftest import (
    QUIET_ENV, ROOT, SMALL, answers, compose_full, metric_series, mlflow_runs, mlflow_server, run_train,
)

PARENT_TAG = "mlflow.parentRunId"
SWEEP_OVERRIDES = ["-m", "hydra/launcher=submitit_local", "scheduler=step,cosine", *SMALL, "logger.log_model=false"]


def _grouped(uri: str):
    """The sweep's parent and its children in the store at `uri`; the store holds nothing else."""
    client, runs = mlflow_runs(uri)
    parents = [r for r in runs if r.data.tags.get("tunelab.sweep") == "true"]
    assert len(parents) == 1, [(r.info.run_name, r.data.tags) for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert len(children) == len(runs) - 1, [(r.info.run_name, r.data.tags.get(PARENT_TAG)) for r in runs]
    return client, parent, children


@pytest.mark.slow
def test_a_submitit_local_sweep_is_grouped_like_any_other(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_train(SWEEP_OVERRIDES, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri, **QUIET_ENV}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr

    client, parent, children = _grouped(uri)
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.tags["scheduler"] for r in children) == ["cosine", "step"]
    assert all(r.info.status == "FINISHED" for r in children), [(r.info.run_name, r.info.status) for r in children]
    # Each job ran in a process of its own, not in the one that launched the sweep.
    pids = {r.data.tags["tunelab.pid"] for r in children}
    assert len(pids) == 2 and parent.data.tags["tunelab.pid"] not in pids
    for run in children:
        epochs = metric_series(client, run.info.run_id, "val/acc")
        assert [step for step, _ in epochs] == [0, 1]

    sweep_dir = tmp_path / parent.data.tags["tunelab.sweep_dir"]
    assert (sweep_dir / "parent_run_id").read_text() == parent.info.run_id
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == ["0", "1"]
    assert any((sweep_dir / ".submitit").glob("*/*_log.out")), "submitit kept no job logs"
    with open(sweep_dir / "comparison.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.png", "comparison.csv", "comparison.md"} <= artifacts


@pytest.mark.slow
def test_sigterm_to_the_launching_process_ends_the_parent_killed(tmp_path):
    """The launching process only waits for its jobs; `kill PID` (or a closed terminal) must not
    leave the sweep's parent run RUNNING."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    slow = [o for o in SWEEP_OVERRIDES if not o.startswith(("trainer.max_epochs", "trainer.limit_train_batches"))]
    env = {**os.environ, **QUIET_ENV, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    log = tmp_path / "sweep.log"  # a file, not a pipe: the jobs inherit it and outlive the process
    # Its own process group: the submitit jobs it starts are in it too, and are stopped with it below.
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *slow, "trainer.max_epochs=50"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "outputs").glob("multirun/*/*/.submitit/*/*_log.out")):
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep never started its jobs"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    output = log.read_text(errors="replace")
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "SIGTERM received: the sweep stops" in output
    _, parent, _ = _grouped(uri)
    assert parent.info.status == "KILLED"


def test_a_job_without_the_environment_variable_finds_the_parent_in_the_sweep_folder(tmp_path, monkeypatch):
    """What a SLURM job started with `sbatch --export=NONE` relies on, whatever `hydra.sweep.subdir`
    is (here two levels deep, as an override_dirname holding a path would be)."""
    from tunelab.sweep import PARENT_ENV, parent_run_id

    sweep_dir = tmp_path / "sweep"
    cfg = compose_full(["hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=a/b"])
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(sweep_dir / "a" / "b")
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # restored after the test
    HydraConfig.instance().set_config(cfg)
    monkeypatch.delenv(PARENT_ENV, raising=False)
    assert parent_run_id() is None
    (sweep_dir / "a" / "b").mkdir(parents=True)
    (sweep_dir / "parent_run_id").write_text("0123abcd\n")
    assert parent_run_id() == "0123abcd"
    monkeypatch.setenv(PARENT_ENV, "from-the-environment")
    assert parent_run_id() == "from-the-environment"


def test_the_slurm_launcher_config_composes():
    cfg = compose_full(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 2
    assert launcher.timeout_min > 0 and launcher.cpus_per_task > 0 and launcher.mem_gb > 0
    assert launcher.array_parallelism > 0 and launcher.tasks_per_node == 1
    assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"
    # The run config is the same as a local run's: the launcher changes only where jobs run.
    assert cfg.model.name == compose_full([]).model.name


class _Submitted(Exception):
    """Raised by the stand-in for sbatch once the script is written."""


def test_the_slurm_launcher_writes_the_sbatch_script(tmp_path, monkeypatch):
    """Every key of slurm.yaml is one submitit accepts, and lands in the job array's sbatch script."""
    import submitit
    from hydra.utils import instantiate

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that srun exists
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    scripts = []

    def sbatch(executor, command):
        scripts.append(executor._make_submission_file_text(command, "test"))
        raise _Submitted

    monkeypatch.setattr(submitit.SlurmExecutor, "_submit_command", sbatch)
    sweep_dir = tmp_path / "sweep"
    cfg = compose_full([
        "hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={sweep_dir}",
        'hydra.launcher.setup=["source .venv/bin/activate"]', "+hydra.launcher.additional_parameters.mail_type=END",
    ])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda cfg: 0.0, config=cfg)
    with pytest.raises(_Submitted):
        launcher.launch([["scheduler=step"], ["scheduler=cosine"], ["scheduler=onecycle"]], initial_job_idx=0)
    (script,) = scripts
    expected = [
        "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB",
        "#SBATCH --time=120", "#SBATCH --array=0-2%3", "#SBATCH --signal=USR2@120", "#SBATCH --mail-type=END",
        f"#SBATCH --output={sweep_dir}/.submitit/%A_%a/%A_%a_0_log.out", "source .venv/bin/activate",
    ]
    missing = [line for line in expected if line not in script.splitlines()]
    assert not missing, f"missing {missing} in:\n{script}"


@pytest.fixture
def server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (sqlite store, artifacts served by the server itself),
    stopped when the test ends, pass or fail."""
    home = tmp_path / "server"
    home.mkdir()
    with mlflow_server(f"sqlite:///{home / 'mlflow.db'}", home) as base:
        yield base, home / "server-artifacts"
    assert not answers(base), f"the server at {base} still answers"


@pytest.mark.slow
def test_a_run_logs_to_a_shared_tracking_server_over_http(tmp_path, server, monkeypatch):
    import mlflow.pytorch
    import mlflow.tracking._tracking_service.utils as tracking_utils
    import torch

    base, artifact_store = server
    workdir = tmp_path / "job"
    workdir.mkdir()
    small = [o for o in SMALL if not o.startswith("trainer.max_epochs")]
    proc = run_train([*small, "trainer.max_epochs=1", "logger.log_model=true"], cwd=workdir,
                     env={"MLFLOW_TRACKING_URI": base, **QUIET_ENV}, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    client, runs = mlflow_runs(base)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["trainer.max_epochs"] == "1"
    assert [step for step, _ in metric_series(client, run.info.run_id, "val/acc")] == [0]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri  # proxied by the server
    assert {"config.yaml", "lr_curve.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    stored = {p.name for p in artifact_store.rglob("*") if p.is_file()}
    assert {"config.yaml", "lr_curve.png", "MLmodel"} <= stored, sorted(stored)
    # Nothing was written to a local store beside the job.
    assert not (workdir / "outputs" / "mlflow.db").exists() and not (workdir / "mlruns").exists()
    assert not (workdir / "outputs" / "mlartifacts").exists()

    config = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert "max_epochs: 1" in open(config).read()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", base)  # mlflow's global URI, restored afterwards
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    with torch.no_grad():
        logits = model(torch.zeros(2, 3, 32, 32))
    assert tuple(logits.shape) == (2, 10)
