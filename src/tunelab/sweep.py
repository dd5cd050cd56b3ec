"""Sweeps grouped in MLflow: one parent run per `-m` sweep, each job a nested child run.

`MlflowSweepCallback` (a Hydra callback, enabled in conf/config.yaml) opens the parent run when a
multirun starts and tells the jobs its id through the environment variable `TUNELAB_PARENT_RUN_ID`
and a file `parent_run_id` in the sweep folder (jobs in other processes inherit the variable: joblib
workers, submitit's local jobs and SLURM jobs under sbatch's default `--export=ALL`; a job started
without it, e.g. under `--export=NONE`, reads the file on the shared file system). When the sweep
ends it builds the comparison (tunelab.compare), logs it to the parent and writes it to the sweep
folder. A job that fails is recorded as a FAILED child with its error, and the sweep goes on;
`train.py` then exits with status 1 once the sweep is done (`failed_jobs`).

The process that launched the sweep ends the parent KILLED when it exits early: on Ctrl-C, and on
SIGTERM or SIGHUP (a closed terminal, `kill`) while those still have their default action. Jobs
already handed to a cluster keep running and still log as children of that parent.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from tunelab import folders  # noqa: F401  (a job in a worker process, joblib's or submitit's, resolves the sweep folder)
from tunelab.tracking.store import open_store, resolve_tracking_uri
from tunelab.tracking.tags import ERROR_TAG, JOB_DIR_TAG, PARENT_ENV, PARENT_FILE, SWEEP_TAG, parent_run_id, process_tags, run_tags, ui_lines

log = logging.getLogger(__name__)



def _client_and_experiment(logger_cfg: DictConfig):
    uri = resolve_tracking_uri(logger_cfg.get("tracking_uri"))
    client, experiment_id = open_store(uri, logger_cfg.experiment_name)
    return client, experiment_id, uri


def _tracking_on(cfg: DictConfig) -> bool:
    return "experiment_name" in cfg.get("logger", {})


#: Signals that end the launching process (the parent run then ends KILLED) where they would
#: otherwise kill it without running exit handlers; an ignored signal (nohup) stays ignored.
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


#: Jobs of this process's sweeps that failed: counted here for jobs run in this process, and taken
#: from the comparison (the runs in MLflow) for jobs that ran elsewhere (joblib, submitit).
_failed = 0


def failed_jobs() -> int:
    """How many jobs of the sweeps launched from this process failed."""
    return _failed


def _exit_on_signal(signum, frame) -> None:
    log.warning("%s received: the sweep stops and its parent run ends KILLED", signal.Signals(signum).name)
    raise SystemExit(128 + signum)


class MlflowSweepCallback(Callback):
    """Hydra callback: the parent run of a sweep and its comparison."""

    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.client = None
        self.uri = None
        self.experiment_id = None
        self._signals: list[int] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _tracking_on(config):
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self.client, experiment_id, self.uri = _client_and_experiment(config.logger)
        self.experiment_id = experiment_id
        overrides = " ".join(config.hydra.overrides.task)
        tags = {**process_tags(), SWEEP_TAG: "true", "overrides": overrides or "(none)", "tunelab.sweep_dir": str(sweep_dir.resolve())}
        run = self.client.create_run(experiment_id, tags=tags, run_name=f"sweep {sweep_dir.name}: {overrides}"[:250])
        self.parent_id = run.info.run_id
        os.environ[PARENT_ENV] = self.parent_id
        atexit.register(self._end_if_open, "KILLED")
        self._exit_on_signals()
        (sweep_dir / PARENT_FILE).write_text(self.parent_id)
        log.info("Sweep parent run %s (MLflow %s)", self.parent_id, self.uri)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from tunelab import compare

        if self.parent_id is None:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        status = "FINISHED"
        try:
            report = compare.compare_runs(self.client, compare.children(self.client, self.parent_id), sweep_dir, parent_id=self.parent_id)
            global _failed
            _failed = max(_failed, sum(not row.ok for row in report.rows))
            print(report.summary())
            print(f"\nComparison: {report.png}\n            {report.markdown}")
            self._register(report, config)
            print("\n".join(ui_lines(self.uri, self.experiment_id, self.parent_id, f"Sweep parent run {self.parent_id}")))
        except Exception:
            status = "FAILED"
            log.exception("Could not build the sweep's comparison")
        finally:
            self._end_if_open(status)
            os.environ.pop(PARENT_ENV, None)
            for signum in self._signals:
                signal.signal(signum, signal.SIG_DFL)
            self._signals = []

    def _register(self, report, config: DictConfig) -> None:
        """The winner into the Model Registry (tunelab.registry); a failure there is reported, not raised:
        the comparison is already stored."""
        from tunelab.registry import champion_uri, register_winner

        try:
            version = register_winner(self.client, self.uri, report, self.parent_id, config.logger)
        except Exception as err:
            log.error("Could not register the winner in the Model Registry: %s", str(err).splitlines()[0][:300])
            return
        if version is not None:
            name = config.logger.get("registered_model_name") or config.logger.experiment_name
            print(f"Registered the winner as {name} version {version}, alias champion:  {champion_uri(name)}")

    def _exit_on_signals(self) -> None:
        """Turn SIGTERM/SIGHUP into SystemExit in the launching process, so that `atexit` ends the
        parent run (the jobs' own handlers, see tunelab.run, take over while a job trains here)."""
        for signum in _STOP_SIGNALS:
            try:
                if signal.getsignal(signum) is signal.SIG_DFL:
                    signal.signal(signum, _exit_on_signal)
                    self._signals.append(signum)
            except ValueError:  # not the main thread
                return

    def _end_if_open(self, status: str) -> None:
        if self.parent_id is not None:
            self.client.set_terminated(self.parent_id, status)
            self.parent_id = None


def job_failed(cfg: DictConfig, error: BaseException) -> None:
    """Record a failed sweep job in MLflow: its child run (made FAILED here if the job failed
    before it could start one) carries the error as the tag `tunelab.error`."""
    from hydra.core.hydra_config import HydraConfig

    global _failed
    _failed += 1
    if not _tracking_on(cfg):
        return
    parent = parent_run_id()
    client, experiment_id, _ = _client_and_experiment(cfg.logger)
    job_dir = str(HydraConfig.get().runtime.output_dir)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{JOB_DIR_TAG}` = '{job_dir}'", max_results=1)
    message = f"{type(error).__name__}: {error}".splitlines()[0][:4000]
    if found:
        run_id = found[0].info.run_id
    else:
        tags = run_tags(cfg)
        run_id = client.create_run(experiment_id, tags=tags, run_name=tags.get("overrides", "failed job")[:250]).info.run_id
        client.set_terminated(run_id, "FAILED")
    client.set_tag(run_id, ERROR_TAG, message)
    log.error("Job failed (recorded in MLflow run %s under sweep %s): %s", run_id, parent, message)
