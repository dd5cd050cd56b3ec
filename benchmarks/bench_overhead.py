"""What tunelab costs over the subject's bare loop, measured side by side in one run.

    python benchmarks/bench_overhead.py [--epochs 5] [--runs 2]

1. Per-epoch time, in one process, epochs of both alternating: tunelab's loop (resnet18, digits,
   SGD + cosine stepped per step, lr and train/loss logged every step to MLflow, progress bar on,
   checkpoints as `python train.py` writes them, each write waited for within its epoch)
   against benchmarks/bare_loop.py's loop doing the same work. Target <= 1.03x. tunelab's SGD
   uses torch's fused kernel (`optimizer.fused`, its configs' default) and the subject's loop does
   not, so the same is also measured against the bare loop with fused SGD: tunelab's own cost.
2. Per-step MLflow logging: the same tunelab loop with the logger `logger=mlflow` builds (MLflow in
   a helper process) against NullLogger. Target <= 1.01x. Then, for comparison, MLflow in threads
   of the training process (`logger.in_process=true`) against NullLogger.
3. Whole process for a 4-epoch run (start-up, logging, model upload included):
   `python train.py model=resnet18 scheduler=cosine trainer.max_epochs=4` against
   `python benchmarks/bare_loop.py --epochs 4`, the runs alternating. The ratio is the median of
   the rounds' ratios (each tunelab run against the bare run right after it). Target <= 1.10x.
   Also the same run with `logger.log_model=false`, which shows what the model upload costs, and
   `python train.py` against the bare loop script with fused SGD (`--fused`).
4. Start-up: from launching `python train.py` to its first training step. Target <= 4 s.
5. Model upload: mlflow.pytorch.log_model with pip requirements given (as tunelab does) against
   letting MLflow infer them.
6. tunelab's model upload in a fresh process (importing MLflow included) with the package scan
   done beforehand by `PackageScan`, as a run's is, against leaving it to MLflow.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bare_loop  # noqa: E402
from common import ROOT, say, started_logger  # noqa: E402


def tunelab_pieces(logger, folder: Path | None = None):
    """The objects run.train builds for resnet18/digits/sgd/cosine, ready for loop.fit; with
    `folder`, also its checkpoints there, at the default `trainer.checkpoint_min_interval_s`."""
    from omegaconf import OmegaConf

    from tunelab import checkpoints, data, freezing, models
    from tunelab.schedules import build_schedule

    splits = data.digits(32, models.IMAGENET_MEAN, models.IMAGENET_STD, seed=42)
    torch.manual_seed(42)
    from tunelab.optimizers import optimizer_factory

    model = models.torchvision_model("resnet18", 10)
    plan = freezing.freeze(model, 0)
    opt = optimizer_factory(OmegaConf.load(ROOT / "conf" / "optimizer" / "sgd.yaml"), 0.05)(freezing.param_groups(plan, 0.05))
    train = data.make_loader(splits.train, 64, True, 42)
    val = data.make_loader(splits.val, 64, False, 42)
    cfg = OmegaConf.create({"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": None, "eta_min": 0.0, "interval": "step"})
    schedule = build_schedule(cfg, opt, len(train), 1000)
    interval = OmegaConf.load(ROOT / "conf" / "trainer" / "default.yaml").checkpoint_min_interval_s
    saver = checkpoints.Saver(folder, interval, "val/acc") if folder is not None else None
    return dict(model=model, plan=plan, opt=opt, train=train, val=val, schedule=schedule, logger=logger, state=None, saver=saver)


def tunelab_epoch(p) -> float:
    from tunelab import loop
    from tunelab.callbacks.checkpointing import Checkpointing
    from tunelab.callbacks.freezing import Freezing
    from tunelab.callbacks.metrics import MetricLogger
    from tunelab.callbacks.progress import ProgressBar

    state = p["state"] or loop.LoopState()
    saver = p["saver"]

    def contents() -> dict:  # what run.py saves, less what this loop lacks
        return {"model": p["model"].state_dict(), "optimizer": p["opt"].state_dict(), "schedule": p["schedule"].state_dict(),
                "frozen": p["plan"].frozen}

    callbacks = [Freezing(p["model"], p["plan"], p["schedule"]), MetricLogger(p["logger"]), ProgressBar()]
    if saver is not None:
        callbacks.append(Checkpointing(saver, contents))
    started = time.perf_counter()
    options = loop.LoopOptions(max_epochs=state.epoch + 1, device=torch.device("cpu"))
    p["state"] = loop.fit(p["model"], p["train"], p["val"], p["opt"], p["schedule"], torch.nn.CrossEntropyLoss(), options, callbacks, state)
    if saver is not None:
        saver.writer.close()  # this epoch's write, if any, is charged to this epoch, not to the next bare one
    return time.perf_counter() - started


def bare_pieces(fused: bool = False):
    x, y, xv, yv = bare_loop.digits()
    model = bare_loop.build()
    opt = bare_loop.sgd(model, fused)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=-(-len(y) // 64) * 1000)
    return dict(model=model, opt=opt, sched=sched, data=(x, y, xv, yv), epoch=0)


def bare_epoch(p) -> float:
    x, y, xv, yv = p["data"]
    started = time.perf_counter()
    bare_loop.train_epoch(p["model"], p["opt"], p["sched"], x, y, 64, p["epoch"])
    bare_loop.validate(p["model"], xv, yv, 64)
    p["epoch"] += 1
    return time.perf_counter() - started


def side_by_side(a, run_a, b, run_b, epochs: int) -> tuple[float, float, float, str]:
    """Median epoch times of a and b, the median of the ratios of adjacent epochs (a then b,
    alternating, so the machine's drift cancels) and the range of the middle half of those ratios;
    the first epoch of each is dropped as warm-up."""
    run_a(a), run_b(b)
    ta, tb = [], []
    for _ in range(epochs):
        ta.append(run_a(a))
        tb.append(run_b(b))
    ratios = [x / y for x, y in zip(ta, tb)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios), f"middle half of the pairs {q1:.3f}-{q3:.3f}"


def whole_process(tmp: Path, runs: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """Seconds of each whole `python train.py` 4-epoch run, of the same run with
    `logger.log_model=false` (what the model upload costs), of the bare loop script and of the bare
    loop script with fused SGD; the four alternate, so each round's runs see the same state of the
    machine."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    tunelab_cmd = [sys.executable, str(ROOT / "train.py"), "model=resnet18", "scheduler=cosine", "trainer.max_epochs=4", f"hydra.run.dir={tmp}/run"]
    no_model_cmd = [*tunelab_cmd, "logger.log_model=false"]
    bare_cmd = [sys.executable, str(ROOT / "benchmarks" / "bare_loop.py"), "--epochs", "4", "--out", str(tmp / "bare.pt")]
    subprocess.run(tunelab_cmd, env=env, cwd=tmp, capture_output=True, check=True)  # creates the database once, as any later run finds it
    commands = (tunelab_cmd, no_model_cmd, bare_cmd, [*bare_cmd, "--fused"])
    times: list[list[float]] = [[] for _ in commands]
    for _ in range(runs):
        for i, cmd in enumerate(commands):
            started = time.perf_counter()
            subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, check=True)
            times[i].append(time.perf_counter() - started)
    return times[0], times[1], times[2], times[3]


def paired(a: list[float], b: list[float]) -> tuple[float, str]:
    """The median of the ratios of the runs of one round, and the range of those ratios."""
    ratios = sorted(x / y for x, y in zip(a, b))
    return statistics.median(ratios), f"rounds {ratios[0]:.3f}-{ratios[-1]:.3f}"


def startup(tmp: Path, runs: int) -> float:
    """Seconds from launching train.py to the log line printed right before the first step."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), "trainer.max_epochs=1", "trainer.limit_train_batches=1",
           "trainer.limit_val_batches=1", "logger.log_model=false", "trainer.progress=false", f"hydra.run.dir={tmp}/start"]
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if "Training:" in line:
                times.append(time.perf_counter() - started)
        proc.wait()
    return statistics.median(times)


def model_upload(tmp: Path) -> tuple[float, float]:
    import mlflow
    import mlflow.pytorch

    from tunelab.tracking import pip_requirements

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'upload.db'}")
    model = bare_loop.build().eval()
    example = torch.randn(2, 3, 32, 32).numpy()
    times = []
    for requirements in (pip_requirements(), None):
        with mlflow.start_run():
            started = time.perf_counter()
            mlflow.pytorch.log_model(model, name="model", input_example=example, pip_requirements=requirements)
            times.append(time.perf_counter() - started)
    return times[0], times[1]


def upload_with_scan(tmp: Path, rounds: int) -> tuple[float, float]:
    """Median seconds of tunelab's model upload (benchmarks/upload_once.py, a fresh process each)
    with the package scan answered by PackageScan and with MLflow scanning, alternating."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp / 'scan.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("scan")
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for scan in (True, False):
            run_id = client.create_run(experiment).info.run_id
            cmd = [sys.executable, str(ROOT / "benchmarks" / "upload_once.py"), uri, run_id, *([] if scan else ["--no-scan"])]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            times[scan].append(float(out.split()[-1]))
    return statistics.median(times[True]), statistics.median(times[False])


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per side (after one warm-up)")
    parser.add_argument("--runs", type=int, default=2, help="whole-process runs per side")
    args = parser.parse_args()
    from tunelab.tracking import NullLogger

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        logger = started_logger(tmp / "epochs.db", "bench")
        t_tunelab, t_bare, ratio, spread = side_by_side(tunelab_pieces(logger, tmp / "ckpt"), tunelab_epoch, bare_pieces(), bare_epoch, args.epochs)
        say(f"1. epoch: tunelab {t_tunelab:.3f} s, bare loop {t_bare:.3f} s  ->  {ratio:.3f}x ({spread})  (target <= 1.03)  {verdict(ratio <= 1.03)}")
        t_tunelab, t_bare, ratio, spread = side_by_side(tunelab_pieces(logger, tmp / "ckpt2"), tunelab_epoch, bare_pieces(fused=True), bare_epoch, args.epochs)
        say(f"   the same against the bare loop with fused SGD (tunelab's own cost): {t_tunelab:.3f} s vs {t_bare:.3f} s  ->  {ratio:.3f}x ({spread})")
        t_logged, t_null, ratio, spread = side_by_side(tunelab_pieces(logger), tunelab_epoch, tunelab_pieces(NullLogger()), tunelab_epoch, args.epochs)
        logger.finish("FINISHED")
        say(f"2. epoch with MLflow per-step logging {t_logged:.3f} s, without {t_null:.3f} s  ->  {ratio:.3f}x ({spread})  (target <= 1.01)  {verdict(ratio <= 1.01)}")
        threads = started_logger(tmp / "threads.db", "bench", in_process=True)
        t_logged, t_null, ratio, spread = side_by_side(tunelab_pieces(threads), tunelab_epoch, tunelab_pieces(NullLogger()), tunelab_epoch, args.epochs)
        threads.finish("FINISHED")
        say(f"   for comparison, MLflow in threads of the training process (logger.in_process=true): {t_logged:.3f} s vs {t_null:.3f} s  ->  {ratio:.3f}x ({spread})")
        w_tunelab, w_no_model, w_bare, w_bare_fused = whole_process(tmp, args.runs)
        ratio, spread = paired(w_tunelab, w_bare)
        say(f"3. whole 4-epoch process: python train.py {statistics.median(w_tunelab):.1f} s, bare loop script "
            f"{statistics.median(w_bare):.1f} s  ->  {ratio:.3f}x ({spread})  (target <= 1.10)  {verdict(ratio <= 1.10)}")
        ratio, spread = paired(w_no_model, w_bare)
        say(f"   the same without the model upload (logger.log_model=false): {statistics.median(w_no_model):.1f} s  ->  {ratio:.3f}x ({spread})")
        ratio, spread = paired(w_tunelab, w_bare_fused)
        say(f"   python train.py against the bare loop with fused SGD (tunelab's own cost): bare {statistics.median(w_bare_fused):.1f} s  ->  {ratio:.3f}x ({spread})")
        s = startup(tmp, args.runs + 1)
        say(f"4. start-up to the first training step: {s:.2f} s  (target <= 4 s)  {verdict(s <= 4)}")
        given, inferred = model_upload(tmp)
        say(f"5. log_model with pip requirements given {given:.2f} s, inferred by MLflow {inferred:.2f} s")
        scanned, unscanned = upload_with_scan(tmp, args.runs)
        say(f"6. tunelab's model upload in a fresh process, package scan done beforehand (PackageScan) {scanned:.2f} s, "
            f"left to MLflow {unscanned:.2f} s")


if __name__ == "__main__":
    main()
