"""Nothing lost: checkpoints, resume after kill -9, reproducibility, NaN, signals, logging faults."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from conftest import ROOT, SMALL, metric_series, mlflow_runs, run_train, stop_at_check
from tunelab import checkpoints, run, tracking
from tunelab.choices import KEEP_CHECKPOINTS
from tunelab.errors import ConfigError, ReportedError
from tunelab.loop import NonFiniteLossError

RESUMABLE = [
    "trainer.max_epochs=3", "trainer.limit_train_batches=8", "trainer.limit_val_batches=2", "data.batch_size=32",
    "trainer.device=cpu", "trainer.progress=false", "trainer.deterministic=true", "trainer.checkpoint_every_n_steps=2",
    "logger.log_model=false", "scheduler=onecycle", "scheduler.warmup_epochs=0.5", "freeze.depth=-1",
    "freeze.unfreeze_every=1", "freeze.cache_features=false", "optimizer=adamw",
]


class NanAfter(nn.Module):
    """Cross-entropy that turns NaN after `after` training batches (a loss made to blow up)."""

    def __init__(self, after: int):
        super().__init__()
        self.after, self.calls = after, 0

    def forward(self, logits, target):
        loss = nn.functional.cross_entropy(logits, target)
        if not torch.is_grad_enabled():  # validation
            return loss
        self.calls += 1
        return self.broken(loss) if self.calls > self.after else loss

    def broken(self, loss):
        return loss * float("nan")


class InfGradAfter(NanAfter):
    """The same, but its value stays finite while its gradient turns infinite."""

    def broken(self, loss):
        loss.register_hook(lambda grad: grad * float("inf"))
        return loss


class FullDisk:
    """torch.save as on a disk that fills up after `good_writes` checkpoints: each later write puts
    some bytes in its file, then fails with ENOSPC."""

    def __init__(self, save, good_writes: int):
        self.save, self.good_writes, self.calls = save, good_writes, 0

    def __call__(self, obj, f, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.good_writes:
            return self.save(obj, f, *args, **kwargs)
        f.write(b"\0" * 65536)
        raise OSError(errno.ENOSPC, "No space left on device")


#: `python WRAPPER.py ARGS` = `python train.py ARGS` on a disk that is full after the checkpoints of epoch 1.
FULL_DISK_TRAIN_PY = """\
import runpy, sys
sys.path.insert(0, {tests!r})
import torch
from test_faults import FullDisk
torch.save = FullDisk(torch.save, good_writes=2)
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
"""
_UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


def _free_and_needed(message: str) -> tuple[float, float]:
    """The free space and the space needed that a checkpoint write error reports, in bytes."""
    size = r"([0-9.]+) (B|kB|MB|GB|TB)"
    match = re.search(rf"has {size} free, and the checkpoint needs about {size}", message)
    assert match, message
    return float(match[1]) * _UNITS[match[2]], float(match[3]) * _UNITS[match[4]]


def _all_metrics(client, run_id):
    keys = client.get_run(run_id).data.metrics
    return {k: metric_series(client, run_id, k) for k in keys}


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri}
    straight = run_train([*RESUMABLE, f"hydra.run.dir={tmp_path}/straight"], cwd=tmp_path, env=env)
    assert straight.returncode == 0, straight.stderr[-2000:]

    folder = tmp_path / "killed"
    args = [*RESUMABLE, f"hydra.run.dir={folder}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path,
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    step = 0
    while time.time() < deadline and proc.poll() is None:  # kill once a mid-epoch checkpoint of epoch 2 exists
        try:
            state = torch.load(folder / "last.pt", weights_only=True)["loop"]
            step = state["step"]
            if state["epoch"] == 1 and state["batch"] > 0:
                break
        except (FileNotFoundError, RuntimeError, EOFError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 8 < step < 24, f"killed at step {step}"
    _, runs = mlflow_runs(uri)
    assert runs[-1].info.status == "RUNNING"  # kill -9 leaves no chance to say otherwise...

    resumed = run_train([*RESUMABLE, "trainer.resume=auto", f"hydra.run.dir={folder}"], cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    client, runs = mlflow_runs(uri)
    assert len(runs) == 2 and [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    a, b = (_all_metrics(client, r.info.run_id) for r in runs)
    assert sorted(a) == sorted(b)
    for key in a:  # every step once, same values
        assert [s for s, _ in b[key]] == sorted({s for s, _ in b[key]}), key
        assert b[key] == a[key], key
    wa = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    wb = torch.load(folder / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("cache", ["auto", "off"])
def test_resume_mid_epoch_on_image_files_equals_an_uninterrupted_run(small_cfg, tracking_uri, tmp_path, monkeypatch, cache):
    """Files read by a DataLoader, random crops and flips, dropout: the batches before the stop are
    not read again and the loader draws nothing from the restored global RNG. With the decoded store
    (data.cache=auto) the crops of the resumed epoch's remaining images are those of the straight run."""
    import numpy as np
    from PIL import Image

    from tunelab.loop import Interrupted

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 3)):
        for label in ("a", "b"):
            (tmp_path / "photos" / split / label).mkdir(parents=True)
            for k in range(n):
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) // (2 if label == "a" else 1)
                Image.fromarray(pixels).save(tmp_path / "photos" / split / label / f"{k}.png")
    common = ("data=folder", f"data.dataset.root={tmp_path / 'photos'}", "data.image_size=32", "data.batch_size=4",
              "data.num_workers=0", "model=mobilenet_v3_small", "trainer.deterministic=true", "trainer.limit_train_batches=5",
              f"data.cache={cache}")
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    run.train(small_cfg(*common, f"trainer.checkpoint_dir={tmp_path}/straight", "logger.experiment_name=straight"))
    assert len(list((tmp_path / "cache").glob("decoded/*.u8"))) == (cache != "off")

    with monkeypatch.context() as patch:
        stop_at_check(patch, 8)  # 5 steps, the end of epoch 1, 2 steps of epoch 2
        with pytest.raises(Interrupted):
            run.train(small_cfg(*common, f"trainer.checkpoint_dir={tmp_path}/stopped", "logger.experiment_name=stopped"))
    stopped = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["loop"]
    assert stopped["epoch"] == 1 and 0 < stopped["batch"] < 5
    run.train(small_cfg(*common, f"trainer.checkpoint_dir={tmp_path}/stopped", "logger.experiment_name=stopped", "trainer.resume=auto"))
    wa = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_same_seed_twice_is_identical_and_logs_provenance(small_cfg, tracking_uri, tmp_path):
    finals = []
    for i in range(2):
        run.train(small_cfg("trainer.deterministic=true", f"trainer.checkpoint_dir={tmp_path}/{i}", f"logger.experiment_name=rep{i}"))
        finals.append(torch.load(tmp_path / str(i) / "last.pt", weights_only=True)["model"])
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    histories = []
    for i in range(2):
        client, runs = mlflow_runs(tracking_uri, f"rep{i}")
        histories.append(_all_metrics(client, runs[0].info.run_id))
        tags, params = runs[0].data.tags, runs[0].data.params
        assert params["seed"] == "42" and torch.__version__.startswith(tags["version.torch"])
        assert len(tags["mlflow.source.git.commit"]) == 40 and tags["tunelab.pid"].isdigit()
    assert histories[0] == {k: [(s, v) for s, v in series] for k, series in histories[1].items()}


def test_best_and_last_checkpoints(small_cfg, tracking_uri, tmp_path):
    run.train(small_cfg("trainer.max_epochs=3", f"trainer.checkpoint_dir={tmp_path}"))
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    accs = [e["val/acc"] for e in last["loop"]["epochs"]]
    assert best["val/acc"] == max(accs) == last["loop"]["best"]
    assert best["epoch"] == accs.index(max(accs)) + 1
    _, runs = mlflow_runs(tracking_uri)
    assert last["run_id"] == runs[0].info.run_id and last["loop"]["epoch"] == 3


def test_epoch_end_checkpoints_wait_for_the_interval_and_are_written_at_the_end(small_cfg, tmp_path, monkeypatch):
    written = []
    save_atomic = checkpoints.save_atomic

    def recording(obj, path):
        written.append((path.name, obj["loop"]["epoch"] if path.name == checkpoints.LAST else obj["epoch"]))
        save_atomic(obj, path)

    monkeypatch.setattr(checkpoints, "save_atomic", recording)
    for interval, expected in (("30", [3]), ("0", [1, 2, 3])):
        written.clear()
        folder = tmp_path / interval
        run.train(small_cfg("trainer.max_epochs=3", f"trainer.checkpoint_dir={folder}", f"trainer.checkpoint_min_interval_s={interval}"))
        assert [epoch for name, epoch in written if name == checkpoints.LAST] == expected
        last = torch.load(folder / "last.pt", weights_only=True)
        accs = [e["val/acc"] for e in last["loop"]["epochs"]]
        assert last["loop"]["epoch"] == 3 and torch.load(folder / "best.pt", weights_only=True)["epoch"] == accs.index(max(accs)) + 1
    with pytest.raises(ConfigError, match=r"trainer.checkpoint_min_interval_s=-1 must be >= 0"):
        run.train(small_cfg("trainer.checkpoint_min_interval_s=-1"))


def test_a_held_checkpoint_reuses_its_tensors_and_is_written_only_when_flushed(tmp_path):
    path = tmp_path / "last.pt"
    writer = checkpoints.Writer()
    writer.hold({"w": torch.ones(3), "n": 1, "history": [1.0]}, path)
    held = writer._held[path]["w"]
    writer.hold({"w": torch.full((3,), 2.0), "n": 2, "history": [1.0, 0.5]}, path)
    assert writer._held[path]["w"] is held and not path.exists()
    writer.flush_held()
    writer.close()
    saved = torch.load(path, weights_only=True)
    assert saved["w"].tolist() == [2.0] * 3 and saved["n"] == 2 and saved["history"] == [1.0, 0.5]
    writer.hold({"w": torch.zeros(3)}, path)
    writer.submit({"w": torch.full((3,), 5.0)}, path)  # newer than the held one, which is dropped
    writer.flush_held()
    writer.close()
    assert torch.load(path, weights_only=True)["w"].tolist() == [5.0] * 3


def test_atomic_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoints.save_atomic({"v": torch.tensor(1)}, path)

    def broken(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_atomic({"v": torch.tensor(2)}, path)
    assert torch.load(path, weights_only=True)["v"].item() == 1


def test_nonfinite_loss_stops_at_once_and_keeps_the_last_checkpoint(small_cfg, tracking_uri, tmp_path):
    cfg = small_cfg("loss._target_=test_faults.NanAfter", "~loss.label_smoothing", "+loss.after=6",
                    "trainer.max_epochs=3", f"trainer.checkpoint_dir={tmp_path}")
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 6 \(epoch 2, lr [0-9.e-]+\)"):
        run.train(cfg)
    client, runs = mlflow_runs(tracking_uri)
    assert runs[0].info.status == "FAILED"
    assert [s for s, _ in metric_series(client, runs[0].info.run_id, "train/loss")] == list(range(6))
    assert torch.load(tmp_path / "last.pt", weights_only=True)["loop"]["epoch"] == 1


def test_skip_nonfinite_counts_and_finishes(small_cfg, tracking_uri):
    run.train(small_cfg("loss._target_=test_faults.NanAfter", "~loss.label_smoothing", "+loss.after=6",
                        "trainer.skip_nonfinite=true"))
    client, runs = mlflow_runs(tracking_uri)
    assert runs[0].info.status == "FINISHED"
    assert [v for _, v in metric_series(client, runs[0].info.run_id, "train/skipped_batches")] == [0.0, 2.0]
    # the two skipped steps have their lr but no train/loss (not a made-up 0)
    assert [s for s, _ in metric_series(client, runs[0].info.run_id, "lr")] == list(range(8))
    assert [s for s, _ in metric_series(client, runs[0].info.run_id, "train/loss")] == list(range(6))


def test_skip_nonfinite_fails_when_every_batch_of_an_epoch_is_skipped(small_cfg, tracking_uri):
    with pytest.raises(NonFiniteLossError, match=r"every batch of epoch 2 had a non-finite loss \(4 skipped"):
        run.train(small_cfg("loss._target_=test_faults.NanAfter", "~loss.label_smoothing", "+loss.after=4",
                            "trainer.skip_nonfinite=true", "trainer.max_epochs=3"))
    client, runs = mlflow_runs(tracking_uri)
    assert runs[0].info.status == "FAILED"


def test_skip_nonfinite_skips_a_step_with_nonfinite_gradients(small_cfg, tracking_uri, tmp_path, caplog):
    run.train(small_cfg("loss._target_=test_faults.InfGradAfter", "~loss.label_smoothing", "+loss.after=5",
                        "trainer.skip_nonfinite=true", f"trainer.checkpoint_dir={tmp_path}"))
    client, runs = mlflow_runs(tracking_uri)
    assert runs[0].info.status == "FINISHED"
    assert "skipped optimizer step 5: its loss was finite, its gradients not (1 skipped so far)" in caplog.text
    assert [v for _, v in metric_series(client, runs[0].info.run_id, "train/skipped_batches")] == [0.0, 3.0]
    weights = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert len(metric_series(client, runs[0].info.run_id, "train/loss")) == 8  # the losses themselves were finite


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR2])  # USR2: SLURM time limit via submitit
def test_signal_writes_a_checkpoint_and_ends_killed(sig, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "trainer.max_epochs=50", "trainer.progress=false", "logger.log_model=false",
         f"hydra.run.dir={folder}", "trainer.device=cpu", "trainer.checkpoint_min_interval_s=0"],
        cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (folder / "last.pt").exists():  # after the first epoch
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "trainer.resume=auto" in err and f"hydra.run.dir={folder}" in err
    state = torch.load(folder / "last.pt", weights_only=True)["loop"]
    assert state["batch"] > 0  # written at the interruption, in the middle of an epoch
    _, runs = mlflow_runs(uri)
    assert runs[0].info.status == "KILLED"


@pytest.mark.slow
def test_ctrl_c_during_start_up_ends_quietly(tmp_path):
    """Before training installs its own handler (here: while torch is imported) Ctrl-C ends the
    process with 130 and one line, not a traceback through the imports."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 30
    while time.time() < deadline and not (tmp_path / "run" / ".hydra").exists():  # the config is composed
        time.sleep(0.02)
    time.sleep(0.2)  # in the task now, importing torch
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "Interrupted." in err


def test_unreachable_server_fails_fast_before_training(small_cfg, tracking_uri, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}"):
        run.train(small_cfg())
    assert time.perf_counter() - started < 30


def test_logging_errors_are_retried_then_reported_and_the_checkpoint_stays(small_cfg, tracking_uri, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    calls = {"n": 0}
    original = MlflowClient.log_batch

    def flaky(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if metrics:
            calls["n"] += 1
            raise ConnectionError("tracking store went away")
        return original(self, run_id, metrics=metrics, params=params, tags=tags)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    monkeypatch.setattr(tracking.logger.time, "sleep", lambda s: None)
    with pytest.raises(ReportedError, match="could not store all of run"):  # in process, so the patch applies
        run.train(small_cfg(f"trainer.checkpoint_dir={tmp_path}", "logger.in_process=true"))
    assert calls["n"] >= 4  # each batch tried 1 + 3 times
    assert (tmp_path / "last.pt").exists()


def test_sender_retries_then_delivers_everything(monkeypatch):
    class Client:
        def __init__(self):
            self.failures, self.got = 2, []

        def log_batch(self, run_id, metrics, synchronous=True):
            if self.failures:
                self.failures -= 1
                raise ConnectionError("blip")
            self.got.extend(metrics)

    monkeypatch.setattr(tracking.logger.time, "sleep", lambda s: None)
    client = Client()
    sender = tracking.logger._BatchSender(client, "run", retries=3)
    sender.start()
    for i in range(5):
        sender.queue.put([i])
    sender.close()
    assert client.got == [0, 1, 2, 3, 4] and sender.error is None


def test_corrupt_image_is_named_or_skipped(tmp_path):
    from PIL import Image

    from tunelab import data

    for split in ("train", "val"):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for i in range(2):
                (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (20, 20), color).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not an image at all")
    args = dict(root=str(tmp_path), image_size=16, mean=[0.5] * 3, std=[0.5] * 3, seed=0)
    with pytest.raises(ConfigError, match=r"broken\.png.*skip_bad_files=true"):
        data.image_folder(**args)
    splits = data.image_folder(**args, skip_bad_files=True)
    assert len(splits.train) == 4 and splits.classes == ["cat", "dog"]


def test_a_run_left_running_by_a_dead_process_is_marked_killed(small_cfg, tracking_uri):
    import socket

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = tracking.get_or_create_experiment(client, "tunelab")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphaned = [client.create_run(e, tags={"tunelab.host": socket.gethostname(), "tunelab.pid": str(dead.pid)}).info.run_id
                for e in (exp, client.create_experiment("another"))]  # the next run may log to another experiment
    run.train(small_cfg())
    assert [client.get_run(r).info.status for r in orphaned] == ["KILLED", "KILLED"]


def test_resume_refuses_a_different_config(small_cfg, tracking_uri, tmp_path):
    run.train(small_cfg(f"trainer.checkpoint_dir={tmp_path}"))
    with pytest.raises(ConfigError, match=r"optimizer.lr"):
        run.train(small_cfg(f"trainer.checkpoint_dir={tmp_path}", "trainer.resume=auto", "optimizer.lr=0.5"))


def test_the_checked_keep_checkpoints_values_are_the_ones_checkpoints_knows():
    assert tuple(checkpoints.KEEP) == KEEP_CHECKPOINTS


@pytest.mark.parametrize("keep, left", [("all", {"last.pt", "best.pt"}), ("best", {"best.pt"}), ("none", set())])
def test_a_finished_run_keeps_the_checkpoints_it_is_told_to(keep, left, small_cfg, tracking_uri, tmp_path):
    run.train(small_cfg(f"trainer.checkpoint_dir={tmp_path}", f"trainer.keep_checkpoints={keep}", log_model=keep == "none"))
    assert {p.name for p in tmp_path.glob("*.pt")} == left


def test_a_failed_run_keeps_both_checkpoints_whatever_keep_checkpoints_says(small_cfg, tracking_uri, tmp_path, second_validation_fails):
    with pytest.raises(RuntimeError, match="boom"):
        run.train(small_cfg(f"trainer.checkpoint_dir={tmp_path}", "trainer.keep_checkpoints=none"))
    assert {p.name for p in tmp_path.glob("*.pt")} == {"last.pt", "best.pt"}


def test_keeping_no_checkpoint_and_no_logged_model_is_warned_about(small_cfg, tracking_uri, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="tunelab.run"):
        run.train(small_cfg(f"trainer.checkpoint_dir={tmp_path}", "trainer.keep_checkpoints=none"))
    assert "a finished run keeps no weights" in caplog.text


@pytest.mark.parametrize("epochs, trained", [(2, 2), (4, 3)])  # the last epoch's write fails; an earlier one's stops the run
def test_a_full_disk_fails_the_run_keeps_the_last_checkpoint_and_everything_logged(epochs, trained, small_cfg, tracking_uri, tmp_path,
                                                                                   monkeypatch):
    folder = tmp_path / "checkpoints"
    monkeypatch.setattr(torch, "save", FullDisk(torch.save, good_writes=2))  # last.pt and best.pt of epoch 1
    save = checkpoints.Saver.save

    def save_once_the_write_failed(self, last, loop_state, is_best):  # the failed write of epoch 2 is over by epoch 3's end
        deadline = time.monotonic() + 60
        while loop_state.epoch == 3 and self.writer.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        save(self, last, loop_state, is_best)

    monkeypatch.setattr(checkpoints.Saver, "save", save_once_the_write_failed)
    with pytest.raises(ReportedError, match=rf"could not write the checkpoint {re.escape(str(folder))}/last\.pt \(\[Errno 28\]") as info:
        run.train(small_cfg(f"trainer.max_epochs={epochs}", f"trainer.checkpoint_dir={folder}", "trainer.checkpoint_min_interval_s=0",
                            log_model=True))
    free, needed = _free_and_needed(str(info.value))
    assert free == pytest.approx(shutil.disk_usage(folder).free, rel=0.1)
    assert needed == pytest.approx((folder / "last.pt").stat().st_size, rel=0.1)
    assert not list(folder.glob("*.tmp"))
    assert torch.load(folder / "last.pt", weights_only=True)["loop"]["epoch"] == 1
    client, runs = mlflow_runs(tracking_uri)
    run_id = runs[0].info.run_id
    assert runs[0].info.status == "FAILED"
    assert [s for s, _ in metric_series(client, run_id, "val/acc")] == list(range(trained))
    assert [s for s, _ in metric_series(client, run_id, "train/loss")] == list(range(4 * trained))
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "lr_curve.png" in artifacts and "model" not in artifacts


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 20 MB file system, where resnet18's last.pt (90 MB) does not fit; None where
    mounting one is not allowed (not root)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(folder)], capture_output=True).returncode == 0
    except FileNotFoundError:
        mounted = False
    yield folder if mounted else None
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_train_py_on_a_full_disk_ends_failed_with_one_paragraph(tmp_path, small_disk):
    folder, script = small_disk, ROOT / "train.py"
    if small_disk is None:  # no file system of our own: one that fills up after epoch 1
        folder, script = tmp_path / "checkpoints", tmp_path / "full_disk_train.py"
        script.write_text(FULL_DISK_TRAIN_PY.format(tests=str(ROOT / "tests"), train=str(ROOT / "train.py")))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    args = [*SMALL, "model=resnet18", "logger.log_model=false", "trainer.checkpoint_min_interval_s=0",
            f"trainer.checkpoint_dir={folder}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and f"could not write the checkpoint {folder}/" in errors[0], proc.stderr[-3000:]
    free, needed = _free_and_needed(errors[0])
    assert free < needed if small_disk else free > needed
    assert not list(folder.glob("*.tmp"))
    _, runs = mlflow_runs(uri)
    assert [r.info.status for r in runs] == ["FAILED"]
