"""The tags of a run: the config group names, where and with what it was made (host, the training
process's id, library versions, git commit), and marking KILLED the runs whose process is gone."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)

#: Tag MLflow's UI reads to group child runs (a sweep's jobs) under a parent run.
PARENT_RUN_TAG = "mlflow.parentRunId"
#: The config groups; each run is tagged with the option chosen in each (`scheduler`=cosine, ...).
GROUPS = ("model", "scheduler", "optimizer", "freeze", "data", "trainer", "logger")
#: Tag of the runs that are not trainings (`lr_find` for an LR range test); comparisons skip them.
KIND_TAG = "tunelab.kind"
#: Tag of a sweep's parent run ("true").
SWEEP_TAG = "tunelab.sweep"
#: Tag of a failed run (a sweep's job): its error in one line.
ERROR_TAG = "tunelab.error"
#: Tag of a run: the folder it ran in (checkpoints, log).
JOB_DIR_TAG = "tunelab.job_dir"
#: How a sweep's jobs learn their parent run: this environment variable, else this file in the sweep folder.
PARENT_ENV = "TUNELAB_PARENT_RUN_ID"
PARENT_FILE = "parent_run_id"
#: The process that trains: this one, or the one a helper process works for (`work_for`).
_training_pid = os.getpid()


def training_pid() -> int:
    """The id of the process that trains, which a run's `tunelab.pid` tag names."""
    return _training_pid


def work_for(pid: int) -> None:
    """Tag the runs this process makes as made by process `pid` (a helper process does the
    logging of the training process `pid`, and the run is alive as long as that one is)."""
    global _training_pid
    _training_pid = pid


def process_tags() -> dict[str, str]:
    """Where and with what the run was made: host and pid (to spot dead runs), library versions,
    the project's git commit (the tag MLflow's UI shows as the source version)."""
    import platform
    import socket
    import subprocess

    tags = {"tunelab.host": socket.gethostname(), "tunelab.pid": str(_training_pid), "version.python": platform.python_version()}
    for package in ("tunelab", "torch", "torchvision", "timm", "mlflow", "hydra-core"):
        found = installed(package)
        if found:
            tags[f"version.{package}"] = found[1]
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def reap_dead_runs(client, experiment_id: str) -> None:
    """Mark KILLED the RUNNING runs of this host whose process is gone (a `kill -9`, a power cut), in
    every experiment of the store: the dead run may have used another `logger.experiment_name`."""
    import socket

    host = socket.gethostname()
    try:
        experiments = {experiment_id} | {e.experiment_id for e in client.search_experiments(max_results=1000)}
        runs = client.search_runs(
            sorted(experiments), filter_string=f"attributes.status = 'RUNNING' and tags.`tunelab.host` = '{host}'", max_results=200,
        )
    except Exception:
        return
    for run in runs:
        tags = run.data.tags
        if tags.get("tunelab.host") != host or not tags.get("tunelab.pid", "").isdigit():
            continue
        pid = int(tags["tunelab.pid"])
        if pid == _training_pid:
            continue
        try:
            os.kill(pid, 0)
            continue  # still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        client.set_tag(run.info.run_id, "tunelab.ended", "process gone (killed); marked KILLED by a later run")
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning("MLflow run %s was left RUNNING by process %d, which is gone: marked KILLED", run.info.run_id, pid)


def installed(package: str) -> tuple[str, str] | None:
    """(distribution, version) of an installed package, or None; MLflow may be installed as
    `mlflow-skinny` alone (servers and small images do that)."""
    from importlib.metadata import PackageNotFoundError, version

    for distribution in (package, "mlflow-skinny") if package == "mlflow" else (package,):
        try:
            return distribution, version(distribution)
        except PackageNotFoundError:
            continue
    return None


def run_tags(cfg: DictConfig) -> dict[str, str]:
    """The chosen option of each group, the command-line overrides and, in a sweep, the parent run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.get()
    tags = {g: str(hydra.runtime.choices.get(g)) for g in GROUPS if g in hydra.runtime.choices}
    tags["overrides"] = " ".join(hydra.overrides.task) or "(none)"
    if hydra.runtime.get("output_dir"):
        tags[JOB_DIR_TAG] = str(hydra.runtime.output_dir)
    # A readable name of our own: MLflow's random names repeat, since the seed fixes Python's RNG
    picked = " ".join(f"{g}={tags[g]}" for g in ("model", "scheduler", "freeze") if g in tags)
    tags["mlflow.runName"] = (" ".join(hydra.overrides.task) or picked)[:250]
    parent = parent_run_id()
    if parent:
        tags[PARENT_RUN_TAG] = parent
        tags["tunelab.job"] = str(hydra.job.get("num", ""))
    return tags


def parent_run_id() -> str | None:
    """The id of the sweep's parent run, for a job of a multirun; None outside a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    marker = _sweep_folder(HydraConfig.get()) / PARENT_FILE
    return marker.read_text().strip() if marker.is_file() else None


def _sweep_folder(hydra_cfg: DictConfig) -> Path:
    """The sweep folder of a job: its absolute output folder less the `hydra.sweep.subdir` part
    (which may span several levels, e.g. an override_dirname holding a path)."""
    job_dir = Path(str(hydra_cfg.runtime.output_dir))
    levels = len(Path(str(hydra_cfg.sweep.subdir)).parts)
    return job_dir.parents[levels - 1] if levels else job_dir


#: Where `mlflow ui` listens by default.
UI_ADDRESS = "http://127.0.0.1:5000"


def ui_link(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in MLflow's UI, in its training view: MLflow 3 otherwise opens an experiment in
    its GenAI overview. The UI is the server itself for an http(s) store, else `mlflow ui`'s address."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def ui_lines(uri: str, experiment_id: str, run_id: str, what: str) -> list[str]:
    """The last lines of a run or a sweep: what was logged, the command that opens the UI on this
    store (none for a server) and the direct link."""
    lines = [what]
    if not uri.startswith(("http://", "https://")):
        lines.append(f"Open the MLflow UI:  mlflow ui --backend-store-uri {uri}")
    lines.append(f"then:                {ui_link(uri, experiment_id, run_id)}")
    return lines
