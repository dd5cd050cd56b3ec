"""Runs and sweeps started at the same time: a folder of their own each, and a new store made once."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import ROOT, compose_full, mlflow_runs
from tunelab import folders

TINY = [
    "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "data.batch_size=16",
    "trainer.device=cpu", "trainer.progress=false", "logger.log_model=false", "trainer.checkpoint_min_interval_s=0",
]


def _start(args: list[str], cwd, uri: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """(exit code, stderr) of each process, once it has ended."""
    return [(p.communicate(timeout=600)[1], p.returncode)[::-1] for p in procs]


def test_a_taken_name_gets_a_suffix_and_is_never_reused(tmp_path):
    base = str(tmp_path / "runs" / "12-00-00")
    made = [folders.new_folder(base) for _ in range(3)]
    assert made == [base, f"{base}-2", f"{base}-3"]
    (tmp_path / "runs" / "12-00-00-4").mkdir()  # made by hand, or by another process
    assert folders.new_folder(base) == f"{base}-5"


def test_the_default_folders_are_made_new_and_kept_per_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second, third = compose_full([]), compose_full([]), compose_full([])
    try:
        one = first.hydra.run.dir
        OmegaConf.copy_cache(from_config=first, to_config=second)  # as Hydra does for each job of a sweep
        assert one == first.hydra.run.dir == second.hydra.run.dir  # resolved once per config (and its copies)
        other = third.hydra.run.dir  # another run's config
        assert other != one and os.path.isdir(one) and os.path.isdir(other)
        if other.startswith(one):  # started in the same second: a suffix
            assert other == f"{one}-2"
        assert str(first.hydra.sweep.dir).startswith("outputs/multirun/")
    finally:
        GlobalHydra.instance().clear()


def test_an_explicit_run_folder_keeps_its_meaning(tmp_path):
    given = tmp_path / "my-run"
    cfg = compose_full([f"hydra.run.dir={given}"])
    assert cfg.hydra.run.dir == str(given) and not given.exists()  # Hydra makes it; no suffix, as resume needs


@pytest.mark.slow
def test_four_runs_started_at_once_on_a_new_store_all_finish_in_folders_of_their_own(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    same = "hydra.run.dir=${tunelab.new_folder:" + str(tmp_path / "runs" / "same-second") + "}"  # as four runs started in one second
    procs = [_start([*TINY, f"seed={seed}", same], tmp_path, uri) for seed in range(4)]
    for code, stderr in _finish(procs):
        assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    client, runs = mlflow_runs(uri)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4
    run_dirs = {r.data.tags["tunelab.job_dir"] for r in runs}
    assert len(run_dirs) == 4
    weights = {}
    for run in runs:
        checkpoint = torch.load(os.path.join(run.data.tags["tunelab.job_dir"], "last.pt"), weights_only=True)
        assert checkpoint["run_id"] == run.info.run_id  # each folder holds its own run's checkpoint
        weights[run.data.params["seed"]] = checkpoint["model"]["fc.weight"]
    assert sorted(weights) == ["0", "1", "2", "3"]
    assert not any(torch.equal(weights["0"], weights[s]) for s in "123")


@pytest.mark.slow
def test_two_sweeps_started_in_the_same_second_get_separate_folders_and_parents(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    same = "hydra.sweep.dir=${tunelab.new_folder:" + str(tmp_path / "multirun" / "same-second") + "}"
    procs = [_start(["-m", *TINY, "seed=1,2", same], tmp_path, uri)]
    time.sleep(0.2)
    procs.append(_start(["-m", *TINY, "seed=3,4", same], tmp_path, uri))
    for code, stderr in _finish(procs):
        assert code == 0, stderr[-3000:]
    client, runs = mlflow_runs(uri)
    parents = [r for r in runs if r.data.tags.get("tunelab.sweep") == "true"]
    assert len(parents) == 2
    sweep_dirs = {p.data.tags["tunelab.sweep_dir"] for p in parents}
    assert sweep_dirs == {str(tmp_path / "multirun" / "same-second"), str(tmp_path / "multirun" / "same-second-2")}
    for parent in parents:
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(kids) == 2
        assert {os.path.dirname(k.data.tags["tunelab.job_dir"]) for k in kids} == {parent.data.tags["tunelab.sweep_dir"]}
        folder = parent.data.tags["tunelab.sweep_dir"]
        assert open(os.path.join(folder, "parent_run_id")).read() == parent.info.run_id
