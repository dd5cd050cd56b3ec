"""One run, top to bottom: data, model, freezing, optimizer, schedule, logger; fit; log the result.

`train(cfg)` is what `train.py` calls. The loop (`tunelab.loop.fit`) gets the optional behaviours as
callbacks, built in `callbacks()` in the order they run.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from tunelab import checkpoints, distributed, freezing, range_test
from tunelab.callbacks.checkpointing import Checkpointing
from tunelab.callbacks.early_stopping import EarlyStopping
from tunelab.callbacks.ema import EMA, WeightEMA
from tunelab.callbacks.freezing import Freezing, Probe
from tunelab.callbacks.held_out_test import HeldOutTest, TestSet
from tunelab.callbacks.metrics import MetricLogger
from tunelab.callbacks.progress import ProgressBar
from tunelab.callbacks.signals import StopFlag, StopSignal, graceful_stop
from tunelab.callbacks.swa import SWA
from tunelab.checks import check_config, swa_start
from tunelab.environment import limit_threads_for_parallel_jobs, seed_everything, select_device
from tunelab.errors import build, require
from tunelab.inference import ModelInfo
from tunelab.loop import History, Interrupted, LoopOptions, LoopState, fit
from tunelab.optimizers import optimizer_factory
from tunelab.prepare import Prepared, prepare
from tunelab.schedules import build_schedule
from tunelab.tracking import NullLogger, flatten
from tunelab.tracking.tags import parent_run_id, run_tags, ui_lines

log = logging.getLogger(__name__)

#: Tag of a run that early stopping ended, holding the reason.
EARLY_STOP_TAG = "tunelab.stopped_early"
#: The prefix of the params that hold what tunelab derived for a run (the config params stay as given).
RESOLVED_PREFIX = "resolved."


@dataclass
class Run:
    """What one run is given before anything is built: its config, where it runs, what it resumes."""

    cfg: DictConfig
    device: torch.device
    dist: distributed.Context
    logger: object
    run_dir: Path | None
    params: dict
    saved: dict | None = None
    resume_from: Path | None = None


@dataclass
class Training:
    """What the loop steps, built for a run: the optimizer over the trainable groups, the schedule,
    the grad scaler, the module the optimizer steps (DDP-wrapped in a data-parallel run), the lr."""

    optimizer: torch.optim.Optimizer
    schedule: object
    scaler: torch.amp.GradScaler
    stepped: torch.nn.Module
    lr: float
    steps_per_epoch: int
    lr_test: object = None
    state: LoopState = field(default_factory=LoopState)


def train(cfg: DictConfig) -> float:
    """Run one fine-tuning job as configured; return the best value of `cfg.monitor`."""
    check_config(cfg)
    limit_threads_for_parallel_jobs()
    run_dir = checkpoint_dir(cfg)
    resume_from = checkpoints.resolve(str(cfg.trainer.resume), run_dir) if cfg.trainer.resume else None
    saved = checkpoints.load(resume_from) if resume_from else None
    params = flat_config(cfg)
    if saved is not None:
        changed = checkpoints.config_differences(saved["config"], params)
        require(not changed, f"trainer.resume={cfg.trainer.resume}: the config differs from the checkpoint's in " + "; ".join(changed[:6]))
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    dist = distributed.from_environment()
    device = select_device(cfg.trainer.device, dist)
    distributed.init(dist, device)
    if dist.is_main:
        log.info("Instantiating logger <%s>", cfg.logger._target_)
        logger = build(cfg.logger, "logger")
        logger.connect_in_background()  # importing MLflow and opening the store overlap data and model building
    else:  # only rank 0 talks to MLflow and writes checkpoints; the others only train
        logging.getLogger("tunelab").setLevel(logging.WARNING)
        logger = NullLogger()
    try:
        return _train(Run(cfg, device, dist, logger, run_dir, params, saved, resume_from))
    except BaseException:
        logger.wait_for_connection()
        raise
    finally:
        distributed.shutdown()


def _train(run: Run) -> float:
    prepared = prepare(run.cfg, run.device, run.dist)
    training = _training(run, prepared)
    listed = callbacks(run, prepared, training)
    _restore(run, prepared, training, listed)
    _start_logging(run, prepared, training)
    return _fit(run, prepared, training, listed)


def _learning_rate(run: Run, prepared: Prepared):
    """(the lr to train with, the range test that found it or None): `optimizer.lr`, or with
    `optimizer.lr=auto` the range test's suggestion (rank 0's in a data-parallel run), or the one a
    resumed run found before it was interrupted."""
    lr = run.cfg.optimizer.lr
    if lr != "auto":
        return lr, None
    if run.saved is not None:
        log.info("optimizer.lr=auto: using %.4g, found by the range test before the run was interrupted", run.saved["lr_used"])
        return run.saved["lr_used"], None
    log.info("optimizer.lr=auto: running the LR range test first")
    lr_test = range_test.for_config(run.cfg, prepared, run.device) if run.dist.is_main else None  # on rank 0's shard
    lr = run.dist.broadcast(lr_test.suggestion if lr_test else 0.0)
    log.info("optimizer.lr=auto: training with lr %.4g (%s)", lr, lr_test.rule if lr_test else "rank 0's range test")
    return lr, lr_test


def _training(run: Run, prepared: Prepared) -> Training:
    """The optimizer over the trainable param groups, the grad scaler, the schedule and the module stepped."""
    cfg = run.cfg
    lr, lr_test = _learning_rate(run, prepared)
    groups = freezing.param_groups(prepared.plan, lr, cfg.optimizer.get("layer_decay"))
    log.info("Instantiating optimizer <%s>", cfg.optimizer._target_)
    scaler = torch.amp.GradScaler(run.device.type, enabled=str(cfg.trainer.precision) == "16-mixed")
    optimizer = optimizer_factory(cfg.optimizer, lr, grad_scaler=scaler.is_enabled())(groups)
    steps_per_epoch = math.ceil(len(prepared.fit_train) / cfg.trainer.accumulate_grad_batches)
    schedule = build_schedule(cfg.scheduler, optimizer, steps_per_epoch, cfg.trainer.max_epochs)
    if scaler.is_enabled():  # the scaler skips the optimizer step of an overflowing batch by design; torch would warn each time
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
    stepped = prepared.trained
    if cfg.trainer.compile:
        log.info("Compiling the trained module with torch.compile (the first steps are slow)")
        stepped = torch.compile(stepped)
    if run.dist.enabled:
        stepped = distributed.DataParallel(stepped, run.device)
    return Training(optimizer, schedule, scaler, stepped, lr, steps_per_epoch, lr_test)


def callbacks(run: Run, prepared: Prepared, training: Training) -> list:
    """The loop's callbacks for this config, in the order they run (see tunelab.callbacks.base)."""
    cfg, t = run.cfg, run.cfg.trainer
    wrapper = training.stepped if run.dist.enabled else None
    probe = Probe(cfg.freeze.probe_epochs, cfg.freeze.finetune_lr_scale, prepared.after_probe) if cfg.freeze.get("probe_epochs") else None
    listed = [
        Freezing(prepared.model, prepared.plan, training.schedule, cfg.optimizer.get("layer_decay"), cfg.freeze.unfreeze_every, wrapper, probe),
        MetricLogger(run.logger),
    ]
    if t.ema_decay is not None:
        listed.append(EMA(WeightEMA(prepared.trained, t.ema_decay)))
    swa = t.get("swa") or {}
    if swa.get("start_epoch") is not None:
        listed.append(SWA(prepared.trained, training.schedule, swa_start(swa.start_epoch, t.max_epochs), swa.lr, swa.anneal_epochs,
                          swa.anneal_strategy))
    stopping = t.early_stopping
    if stopping.patience is not None:
        listed.append(EarlyStopping(stopping.patience, stopping.monitor, stopping.mode, stopping.min_delta))
    listed.append(StopSignal(StopFlag()))
    saver = checkpoints.Saver(run.run_dir, t.checkpoint_min_interval_s, cfg.monitor) if run.run_dir is not None and run.dist.is_main else None
    if saver is not None and t.keep_checkpoints == "none" and not run.logger.log_model_enabled:
        log.warning("trainer.keep_checkpoints=none and no model logged to MLflow: a finished run keeps no weights")
    listed.append(Checkpointing(saver, lambda: _checkpoint_contents(run, prepared, training), t.checkpoint_every_n_steps or 0))
    if t.test and prepared.test_loader is not None and run.dist.is_main:
        test = TestSet(prepared.model, prepared.trained, prepared.splits.test, prepared.test_loader, prepared.splits.classes,
                       prepared.mean, prepared.std, run.run_dir, switches=prepared.after_probe is not None)
        listed.append(HeldOutTest(test, run.logger, cfg.monitor, _averaged(listed, cfg.monitor)))
    elif t.test:
        log.warning("No held-out test split in this data: no test score (the README's 'Reading the results' says how to add one)")
    if t.progress and run.dist.is_main:
        listed.append(ProgressBar())
    return listed


def _checkpoint_contents(run: Run, prepared: Prepared, training: Training) -> dict:
    """What a checkpoint holds besides the loop's state, the random generators and the callbacks' state."""
    return {
        "model": prepared.model.state_dict(), "optimizer": training.optimizer.state_dict(), "schedule": training.schedule.state_dict(),
        "scaler": training.scaler.state_dict(), "frozen": prepared.plan.frozen, "run_id": run.logger.run_id, "config": run.params,
        "lr_used": training.lr, "model_info": prepared.info.to_dict(),
    }


def _averaged(listed: list, monitor: str):
    """The averaged weights a `_ema` or `_swa` monitor scores (their module), else None."""
    for suffix, kind in (("_ema", EMA), ("_swa", SWA)):
        found = _find(listed, kind)
        if monitor.endswith(suffix) and found is not None:
            return found.module
    return None


def _find(listed: list, kind):
    return next((c for c in listed if isinstance(c, kind)), None)


def _restore(run: Run, prepared: Prepared, training: Training, listed: list) -> None:
    """A resumed run: the loop's state, the unfreezing it had done, the weights, the optimizer, the
    schedule, the scaler and the EMA's and SWA's averages from the checkpoint, then its random generators."""
    saved = run.saved
    if saved is None:
        return
    state = training.state = LoopState.from_dict(saved["loop"])
    if not run.dist.is_main:  # rank 0 carries the epoch's sums so far
        state.loss_sum, state.correct, state.seen = 0.0, 0, 0
    _find(listed, Freezing).replay(state.epoch + (1 if state.batch else 0))  # so the optimizer has the saved groups
    prepared.model.load_state_dict(saved["model"])
    optimizer = training.optimizer
    optimizer.load_state_dict(saved["optimizer"])
    for group in optimizer.param_groups:  # this run's choice of update kernel (optimizer.fused), not the checkpoint's
        group.update({key: optimizer.defaults[key] for key in ("fused", "foreach") if key in optimizer.defaults})
    training.schedule.load_state_dict(saved["schedule"])
    training.scaler.load_state_dict(saved["scaler"])
    for callback in listed:  # the EMA's and SWA's averages
        key = getattr(callback, "checkpoint_key", None)
        if key is not None and saved.get(key) is not None:
            callback.load_state_dict(saved[key])
        elif key is not None:
            log.warning("%s holds no %s state (the run had no trainer.%s): it starts now", run.resume_from, key, "ema_decay" if key == "ema" else key)
    if state.epoch >= run.cfg.trainer.max_epochs or state.stop_reason:
        log.warning("%s holds a run that had finished training (%d epochs%s): nothing is trained, its results are logged again",
                    run.resume_from, state.epoch, f", {state.stop_reason}" if state.stop_reason else "")
    else:
        log.info("Resuming from %s at epoch %d, batch %d (optimizer step %d)", run.resume_from, state.epoch + 1, state.batch, state.step)
    checkpoints.set_rng_state(saved["rng"])


def _start_logging(run: Run, prepared: Prepared, training: Training) -> None:
    """Continue a resumed run's MLflow run, or start one with the params (the config as given, and
    what the run derived under `resolved.`), the tags, the config, the stage table and the range test."""
    cfg, logger = run.cfg, run.logger
    if run.saved is not None and run.saved.get("run_id"):
        logger.resume(run.saved["run_id"])
        return
    extra = {"freeze.frozen_stages": ",".join(prepared.plan.frozen_names) or "(none)"}
    if cfg.optimizer.lr == "auto":
        extra["optimizer.lr_used"] = training.lr
    derived = resolved_params(cfg, prepared, training, run.dist)
    log.info("Resolved: %s", "  ".join(f"{key}={value}" for key, value in derived.items()))
    logger.start({**run.params, **extra, **derived}, run_tags(cfg))
    logger.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    logger.log_text(prepared.plan.table() + "\n", "stages.txt")
    if training.lr_test is not None:
        import matplotlib.pyplot as plt

        fig = range_test.write(training.lr_test, run.run_dir)
        try:
            range_test.log_to(logger, training.lr_test, fig, run.run_dir)
        finally:
            plt.close(fig)


def _fit(run: Run, prepared: Prepared, training: Training, listed: list) -> float:
    """Train, then end the run: FINISHED only when every checkpoint is on disk (a write that fails
    makes it FAILED), KILLED on a stop (with the command that continues it), FAILED on an error.
    The LR curve is logged whatever the outcome, the model only on success."""
    cfg, state, saver = run.cfg, training.state, _find(listed, Checkpointing).saver
    t = cfg.trainer
    options = LoopOptions(t.max_epochs, run.device, t.accumulate_grad_batches, str(t.precision), t.channels_last, t.log_every_n_steps,
                          cfg.monitor, t.skip_nonfinite, run.dist)
    stop = _find(listed, StopSignal).flag
    with graceful_stop(stop):  # also covers the final logging: a signal then cannot leave the run RUNNING
        status = "FAILED"
        try:
            fit(training.stepped, prepared.fit_train, prepared.fit_val, training.optimizer, training.schedule, prepared.loss_fn,
                options, listed, state, training.scaler)
            if saver is not None:  # FINISHED means every checkpoint is on disk: a write that fails makes the run FAILED
                saver.close()
            status = "FINISHED"
            if state.stop_reason:
                run.logger.set_tag(EARLY_STOP_TAG, state.stop_reason)
        except (Interrupted, KeyboardInterrupt):
            status = "KILLED"
            if saver is not None:
                try:
                    saver.close()
                except checkpoints.CheckpointError:
                    status = "FAILED"
                    raise
                if (run.run_dir / checkpoints.LAST).is_file():
                    print(f"\nStopped. Continue this run with:\n  {resume_command(run.run_dir, run.dist.world_size)}\n", file=sys.stderr)
            if stop.signal is not None:  # the exit code of a signal: 128 + its number
                raise SystemExit(128 + stop.signal) from None
            raise
        finally:
            _end(run, prepared, training, listed, status)
    if saver is not None:  # the run finished and everything is stored
        checkpoints.drop_after_success(run.run_dir, t.keep_checkpoints)
    best = state.history.best(cfg.monitor)
    log.info("Best %s: %.4f%s", cfg.monitor, best, f" (run folder {run.run_dir})" if run.run_dir else "")
    if run.logger.run_id and run.logger.experiment_id and not parent_run_id():  # a sweep prints its parent's link at its end
        print("\n".join(ui_lines(run.logger.uri, run.logger.experiment_id, run.logger.run_id, f"MLflow run {run.logger.run_id}")))
    return best


def _end(run: Run, prepared: Prepared, training: Training, listed: list, status: str) -> None:
    saver = _find(listed, Checkpointing).saver
    try:
        if saver is not None:
            saver.flush()  # what the last epochs of a failing run put off
        if run.dist.is_main:  # those checkpoints are written meanwhile
            tested = _find(listed, HeldOutTest)
            chosen = tested.model if tested is not None and tested.model is not None else prepared.model  # the weights monitor chose
            _log_results(run.logger, training.state.history, training.steps_per_epoch, chosen if status == "FINISHED" else None,
                         prepared.splits, prepared.info)
    finally:
        try:
            if saver is not None:
                saver.close()
        except checkpoints.CheckpointError as err:  # only a failing run writes here: its own error is the one raised
            log.error("%s", err)
        finally:
            run.logger.finish(status)


def resolved_params(cfg: DictConfig, prepared: Prepared, training: Training, dist: distributed.Context) -> dict:
    """Every value the run derived rather than read from its config, as `resolved.*` params: the
    scheduler's arguments (those filled in for the run included), its interval and warmup, the
    steps per epoch and in all, the image size used, the global batch and the lr trained with."""
    values = {
        "scheduler": {"_target_": cfg.scheduler._target_, **training.schedule.resolved},
        "steps_per_epoch": training.steps_per_epoch,
        "trainer": {"total_steps": training.steps_per_epoch * cfg.trainer.max_epochs},
        "data": {"image_size": prepared.image_size, "global_batch_size": cfg.data.batch_size * dist.world_size},
        "optimizer": {"lr": training.lr},
    }
    return flatten(values, RESOLVED_PREFIX)


def resume_command(run_dir: Path, processes: int = 1) -> str:
    """The command that continues this run from its last checkpoint, in the same folder."""
    from hydra.core.hydra_config import HydraConfig

    overrides = []
    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("trainer.resume=", "hydra.run.dir="))]
    args = [*overrides, "trainer.resume=auto", f"hydra.run.dir={run_dir}"]
    launcher = "python"
    if processes > 1:  # torchrun's own options are not in Hydra's overrides: one node, or say what to add
        local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
        rendezvous = "--standalone" if local == processes else "<your --nnodes and --rdzv-* options>"
        launcher = f"torchrun {rendezvous} --nproc_per_node={local}"
    return f"{launcher} train.py " + " ".join(shlex.quote(a) for a in args)


def checkpoint_dir(cfg: DictConfig):
    """`trainer.checkpoint_dir`, else the Hydra run folder; None when neither exists (tests)."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.trainer.get("checkpoint_dir"):
        return Path(cfg.trainer.checkpoint_dir)
    if HydraConfig.initialized() and HydraConfig.get().runtime.get("output_dir"):
        return Path(HydraConfig.get().runtime.output_dir)
    return None


def flat_config(cfg: DictConfig) -> dict:
    return flatten(OmegaConf.to_container(cfg, resolve=True))


def _log_results(logger, history: History, steps_per_epoch: int, model, splits, info: ModelInfo) -> None:
    """The LR curve always (a failed run keeps it); the model only on success. With MLflow's
    helper process (`logger=mlflow`) the curve is drawn there while the model is logged here."""
    if history.lrs:
        logger.log_lr_curves(history.lrs, steps_per_epoch)
    if model is not None and logger.log_model_enabled:
        model.cpu().eval()
        example = torch.stack([splits.val[i][0] for i in range(min(2, len(splits.val)))]).numpy()
        logger.log_model(model, example, info)
