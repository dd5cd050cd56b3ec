"""Data-parallel runs with torchrun: 2 CPU processes with gloo give one MLflow run and the accuracy
of the single-process run; 1 process is exactly `python train.py`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, metric_series, mlflow_runs, run_train
from tunelab.data import EpochSampler

#: The accuracy of the 2-process run may differ from the single-process one by this much: the same
#: global batches (2 x 8 images against 1 x 16) give the same mean gradient up to float rounding.
TOLERANCE = 0.01

# Only the head trains (the frozen backbone's BatchNorm in eval mode), so per-process batches of 8
# compute what one batch of 16 does; features are not cached, so the backbone runs under DDP.
COMMON = [
    "freeze=head", "freeze.cache_features=false", "trainer.max_epochs=2", "trainer.device=cpu",
    "trainer.progress=false", "logger.log_model=false", "optimizer.lr=0.05",
]


def torchrun(args: list[str], processes: int, cwd, env: dict) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", str(ROOT / "train.py"), *args]
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


def test_shards_partition_validation_and_pad_training_to_equal_lengths():
    for size in (10, 11, 13):
        val = [list(EpochSampler(size, 0, shuffle=False, rank=r, world_size=3, pad=False)) for r in range(3)]
        assert sorted(i for shard in val for i in shard) == list(range(size))
        train = [EpochSampler(size, 5, shuffle=True, rank=r, world_size=3) for r in range(3)]
        for sampler in train:
            sampler.set_epoch(2)
        shards = [list(s) for s in train]
        assert len({len(s) for s in shards}) == 1 and all(len(s) == len(t) for s, t in zip(shards, train))
        assert set(i for s in shards for i in s) == set(range(size))
        whole = EpochSampler(size, 5, shuffle=True)
        whole.set_epoch(2)
        assert [i for group in zip(*shards) for i in group][:size] == list(whole)  # interleaved = the one-process order


@pytest.mark.slow
def test_two_gloo_processes_make_one_run_with_the_single_process_accuracy(tmp_path):
    ddp_uri, single_uri = f"sqlite:///{tmp_path / 'ddp.db'}", f"sqlite:///{tmp_path / 'single.db'}"
    # 40 global batches per epoch: no padding of the shards, so both runs see exactly the same batches
    proc = torchrun([*COMMON, "data.batch_size=8", "trainer.limit_train_batches=40"], 2, tmp_path, {"MLFLOW_TRACKING_URI": ddp_uri})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Process 1 of 2 (gloo backend)" in proc.stdout + proc.stderr
    assert len(list(tmp_path.glob("outputs/runs/*/*/last.pt"))) == 1  # only rank 0 writes checkpoints
    single = run_train([*COMMON, "data.batch_size=16", "trainer.limit_train_batches=40"], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": single_uri})
    assert single.returncode == 0, single.stderr[-3000:]

    client, runs = mlflow_runs(ddp_uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    one_client, one_runs = mlflow_runs(single_uri)
    one_id = one_runs[0].info.run_id
    for key in ("lr", "train/loss"):  # one value per global optimizer step, as many steps as with one process
        steps = [s for s, _ in metric_series(client, run_id, key)]
        assert steps == [s for s, _ in metric_series(one_client, one_id, key)] == list(range(len(steps))), key
    values = lambda c, r, key: [v for _, v in metric_series(c, r, key)]  # noqa: E731
    assert values(client, run_id, "lr") == pytest.approx(values(one_client, one_id, "lr"))
    ddp_acc, one_acc = values(client, run_id, "val/acc"), values(one_client, one_id, "val/acc")
    assert len(ddp_acc) == len(one_acc) == 2
    assert abs(ddp_acc[-1] - one_acc[-1]) <= TOLERANCE, (ddp_acc, one_acc)
    # validation covered the whole set: the same number of images on both sides
    assert values(client, run_id, "val/loss") == pytest.approx(values(one_client, one_id, "val/loss"), rel=1e-4)


@pytest.mark.slow
def test_one_torchrun_process_is_plain_train_py(tmp_path):
    args = [*COMMON, "trainer.limit_train_batches=6", "data.batch_size=16", "trainer.deterministic=true"]
    a_uri, b_uri = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    proc = torchrun(args, 1, tmp_path, {"MLFLOW_TRACKING_URI": a_uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = run_train(args, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": b_uri, "OMP_NUM_THREADS": "1"})
    assert plain.returncode == 0, plain.stderr[-3000:]
    (ca, [ra]), (cb, [rb]) = mlflow_runs(a_uri), mlflow_runs(b_uri)
    for key in ("train/loss", "val/acc", "val/loss"):
        assert metric_series(ca, ra.info.run_id, key) == metric_series(cb, rb.info.run_id, key), key
    assert torch.distributed.is_available()


def test_resume_command_names_torchrun_and_its_rendezvous(monkeypatch, tmp_path):
    from tunelab.run import resume_command

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    command = resume_command(tmp_path)  # (with the overrides of whatever Hydra config an earlier test left behind)
    assert command.startswith("python train.py ") and command.endswith(f"trainer.resume=auto hydra.run.dir={tmp_path}")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_command(tmp_path, 2).startswith("torchrun --standalone --nproc_per_node=2 train.py ")
    assert resume_command(tmp_path, 4).startswith("torchrun <your --nnodes and --rdzv-* options> --nproc_per_node=2 train.py ")
