"""One run, top to bottom: data, model, freezing, optimizer, schedule, logger; fit; log the result."""

from __future__ import annotations

import logging
import math
import os
import random
import shlex
import signal
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from tunelab import checkpoints
from tunelab import data as data_lib
from tunelab import distributed, freezing, models
from tunelab.errors import ConfigError, build, require
from tunelab.loop import EarlyStopping, History, Interrupted, LoopState, WeightEMA, fit, training_loss
from tunelab.schedules import EPOCH_METRICS, build_schedule
from tunelab.tracking import GROUPS, KIND_TAG, flatten

log = logging.getLogger(__name__)

#: Tag of a run that early stopping ended, holding the reason.
EARLY_STOP_TAG = "tunelab.stopped_early"


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it after each optimizer step and stops cleanly there.

    A second Ctrl-C raises KeyboardInterrupt at once.
    """

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    def handle(self, signum, frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("%s received: stopping after the current optimizer step (Ctrl-C again to stop at once)", signal.Signals(signum).name)


@contextmanager
def _graceful_stop(flag: _StopFlag):
    """Route SIGINT, SIGTERM and SIGUSR2 to `flag` while training (main thread only; joblib threads skip).

    SLURM jobs sent by submitit get SIGUSR2 before their time limit or on preemption: the run then
    writes its checkpoint and ends KILLED, so `trainer.resume=auto` can continue it.
    """
    try:
        previous = {s: signal.signal(s, flag.handle) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:  # batches share one shape (the last aside): cuDNN times its algorithms once and keeps the fastest
        torch.backends.cudnn.benchmark = True


def select_device(name: str, dist: distributed.Context = distributed.SINGLE) -> torch.device:
    """`auto` = CUDA when present, else CPU; `cuda` without a GPU is an error.

    Under torchrun each process takes the GPU of its LOCAL_RANK.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if dist.enabled and name == "cuda":
        name = f"cuda:{dist.local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"trainer.device={name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        require(torch.cuda.is_available(), f"trainer.device={name}, but no CUDA GPU is available here; use trainer.device=auto or cpu")
    return device


def check_config(cfg: DictConfig) -> None:
    """Values that would only fail later (or train nonsense) fail here, naming the key."""
    def number(key: str, value, *, positive: bool = False, integer: bool = False) -> None:
        kind = int if integer else (int, float)
        ok = isinstance(value, kind) and not isinstance(value, bool)
        require(ok, f"{key}={value!r} must be {'an integer' if integer else 'a number'}")
        if positive:
            require(value > 0, f"{key}={value} must be > 0")

    if cfg.optimizer.lr != "auto":
        number("optimizer.lr", cfg.optimizer.lr, positive=True)
    for key in ("fused", "foreach"):
        value = cfg.optimizer.get(key)
        require(value is None or isinstance(value, bool), f"optimizer.{key}={value!r} must be true, false or null")
    ema_decay = cfg.trainer.ema_decay
    if ema_decay is not None:
        number("trainer.ema_decay", ema_decay)
        require(0 <= ema_decay < 1, f"trainer.ema_decay={ema_decay} must be in [0, 1) (null = no EMA); 0.999 is typical")
    monitors = {"monitor": cfg.monitor, "trainer.early_stopping.monitor": cfg.trainer.early_stopping.monitor}
    if cfg.scheduler.get("monitor"):
        monitors["scheduler.monitor"] = cfg.scheduler.monitor
    for key, name in monitors.items():
        require(name in EPOCH_METRICS, f"{key}={name} is never logged; use one of {', '.join(EPOCH_METRICS)}")
        require(not name.endswith("_ema") or ema_decay is not None, f"{key}={name} needs the EMA of the weights: set trainer.ema_decay (e.g. 0.999)")
    number("trainer.max_epochs", cfg.trainer.max_epochs, positive=True, integer=True)
    number("trainer.accumulate_grad_batches", cfg.trainer.accumulate_grad_batches, positive=True, integer=True)
    number("data.batch_size", cfg.data.batch_size, positive=True, integer=True)
    number("data.image_size", cfg.data.image_size, positive=True, integer=True)
    number("freeze.depth", cfg.freeze.depth, integer=True)
    number("seed", cfg.seed, integer=True)
    keep = cfg.trainer.keep_checkpoints
    require(keep in checkpoints.KEEP, f"trainer.keep_checkpoints={keep} must be one of {', '.join(checkpoints.KEEP)}")
    number("trainer.checkpoint_min_interval_s", cfg.trainer.checkpoint_min_interval_s)
    require(cfg.trainer.checkpoint_min_interval_s >= 0, f"trainer.checkpoint_min_interval_s={cfg.trainer.checkpoint_min_interval_s} must be >= 0 (0 = after every epoch)")
    require(str(cfg.trainer.precision) in ("32", "bf16-mixed", "16-mixed"), f"trainer.precision={cfg.trainer.precision} must be 32, bf16-mixed or 16-mixed")
    for key in ("limit_train_batches", "limit_val_batches"):
        value = cfg.trainer[key]
        if value is not None:
            number(f"trainer.{key}", value, positive=True, integer=True)
    every = cfg.freeze.get("unfreeze_every") or 0
    number("freeze.unfreeze_every", every, integer=True)
    require(every >= 0, f"freeze.unfreeze_every={every} must be >= 0: unfreeze a stage every that many epochs (0 = never)")
    workers = cfg.data.get("num_workers")
    if workers is not None:
        number("data.num_workers", workers, integer=True)
        require(workers >= 0, f"data.num_workers={workers} must be >= 0 (0 = load in the training process, null = min(4, cores - 1))")
    if cfg.model.get("weights_path"):  # its contents are checked when the model is built; a typo in the path is caught now
        models.weights_file(cfg.model.weights_path)


def _without(node: DictConfig, *keys: str) -> DictConfig:
    copy = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    for key in keys:
        copy.pop(key, None)
    return copy


#: The devices where torch has fused SGD, Adam and AdamW kernels for every version tunelab supports.
FUSED_DEVICES = ("cpu", "cuda")


def optimizer_factory(optimizer_cfg: DictConfig, lr: float | None = None, grad_scaler: bool = False):
    """The optimizer config built as a function of the param groups; `layer_decay` (tunelab's key,
    not torch's) left out, and `lr` in place of `optimizer.lr` when given.

    `fused: true` (the default of tunelab's optimizer configs) is torch's single-kernel update of all
    parameters: the same rule as the per-parameter loop, 2.5x faster for resnet18 on the CPU
    (BENCHMARKS.md). It gives way to an explicit `foreach: true`, and to parameters on a device
    without the kernel, where the loop is used and the log says so. SGD with momentum keeps the
    loop beside a grad scaler (`grad_scaler`, for 16-mixed): when the scaler skips the first step,
    torch's fused SGD leaves the momentum buffer unset, and the next step writes NaN weights.
    """
    partial_cfg = _without(optimizer_cfg, "layer_decay")
    if lr is not None:
        partial_cfg.lr = lr
    factory = build(partial_cfg, "optimizer")

    def optimizer(params):
        params, kwargs = list(params), {}
        if partial_cfg.get("fused"):
            tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
            devices = sorted({p.device.type for p in tensors} - set(FUSED_DEVICES))
            sgd_momentum = partial_cfg._target_ == "torch.optim.SGD" and partial_cfg.get("momentum")
            if partial_cfg.get("foreach") or devices or (grad_scaler and sgd_momentum):
                kwargs["fused"] = False
                if devices:
                    log.info("optimizer.fused: torch has no fused kernel here (%s); using the per-parameter update", ", ".join(devices))
        try:  # the values reach the class only now: torch checks them here
            return factory(params, **kwargs)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ConfigError(f"optimizer: could not build {partial_cfg._target_}: {err}") from None

    return optimizer


def run_tags(cfg: DictConfig) -> dict[str, str]:
    """The chosen option of each group, the command-line overrides and, in a sweep, the parent run."""
    from hydra.core.hydra_config import HydraConfig

    from tunelab.sweep import JOB_DIR_TAG, parent_run_id
    from tunelab.tracking import PARENT_RUN_TAG

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


def limit_threads_for_parallel_jobs() -> None:
    """With the joblib launcher, share the cores among the jobs instead of each taking them all;
    with submitit's, use the job's `cpus_per_task` (a SLURM job would otherwise see the whole node)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    launcher = HydraConfig.get().get("launcher") or {}
    target = str(launcher.get("_target_", ""))
    if "submitit" in target and launcher.get("cpus_per_task"):
        torch.set_num_threads(int(launcher.cpus_per_task))
        log.info("submitit launcher: %d torch threads (hydra.launcher.cpus_per_task)", launcher.cpus_per_task)
    if "joblib" not in target:
        return
    cores = os.cpu_count() or 1
    jobs = launcher.get("n_jobs") or 1
    jobs = cores if jobs < 0 else jobs
    threads = max(1, cores // jobs)
    torch.set_num_threads(threads)
    log.info("joblib launcher with n_jobs=%s: %d torch threads per job", launcher.get("n_jobs"), threads)


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
        from tunelab.tracking import NullLogger

        logging.getLogger("tunelab").setLevel(logging.WARNING)
        logger = NullLogger()

    try:
        return _train(cfg, logger, device, saved, resume_from, run_dir, params, dist)
    except BaseException:
        logger.wait_for_connection()
        raise
    finally:
        distributed.shutdown()


@dataclass
class Prepared:
    """Data, model and freezing of a run, ready for an optimizer.

    `trained` is the module the optimizer steps (the model, or only its head when the frozen
    backbone's features are cached) and `fit_train`/`fit_val` the batches it sees.
    """

    splits: data_lib.Splits
    model: torch.nn.Module
    plan: freezing.FreezePlan
    trained: torch.nn.Module
    fit_train: object
    fit_val: object
    loss_fn: torch.nn.Module
    image_size: int


def prepare(cfg: DictConfig, device: torch.device, dist: distributed.Context = distributed.SINGLE) -> Prepared:
    """Build the data (and its fold), the model with its new head, the freezing and the loss.

    In a data-parallel run the loaders give this process its shard of every epoch.
    """
    spec = models.input_spec(cfg.model)
    image_size = max(cfg.data.image_size, spec.min_size)
    if image_size != cfg.data.image_size:
        log.info("data.image_size raised from %d to %d, the smallest input %s accepts", cfg.data.image_size, image_size, cfg.model.name)
    log.info("Instantiating data <%s>", cfg.data.dataset._target_)
    splits = build(cfg.data.dataset, "data", image_size=image_size, mean=list(spec.mean), std=list(spec.std), seed=cfg.seed)
    if cfg.data.get("folds"):
        splits = data_lib.kfold(splits, cfg.data.folds, cfg.data.fold, cfg.seed)
        log.info("Cross-validation: fold %d of %d is the validation set", cfg.data.fold, cfg.data.folds)

    def loaders(train, val):
        """Shuffled training and ordered validation batches, cut to trainer.limit_*_batches; small
        in-memory sets are moved onto the GPU once."""
        train, val = data_lib.to_device(train, device), data_lib.to_device(val, device)
        args = dict(batch_size=cfg.data.batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                    rank=dist.rank, world_size=dist.world_size)
        return (
            data_lib.make_loader(train, shuffle=True, limit_batches=cfg.trainer.limit_train_batches, **args),
            data_lib.make_loader(val, shuffle=False, limit_batches=cfg.trainer.limit_val_batches, **args),
        )

    train_loader, val_loader = loaders(splits.train, splits.val)
    log.info("Data: %d train / %d val images, %d classes, %dx%d px", len(splits.train), len(splits.val), len(splits.classes), image_size, image_size)

    log.info("Instantiating model <%s> (%s)", cfg.model._target_, cfg.model.name)
    model = build(cfg.model, "model", num_classes=len(splits.classes))
    plan = freezing.freeze(model, cfg.freeze.depth, cfg.freeze.bn)
    log.info("Stages of %s:\n%s", cfg.model.name, plan.table())
    model.to(device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    log.info("Instantiating loss <%s>", cfg.loss._target_)
    loss_fn = build(cfg.loss, "loss")

    trained, fit_train, fit_val = model, train_loader, val_loader
    if cfg.freeze.cache_features:
        blocker = freezing.feature_cache_blocker(model, plan, _deterministic(splits, cfg.data), cfg.freeze.unfreeze_every)
        if blocker is None:
            log.info("Computing the frozen backbone's features once (freeze.cache_features)")
            trained = model.get_submodule(model.head_names[0])
            fit_train, fit_val = loaders(*(freezing.head_inputs(model, ds, device) for ds in (splits.train, splits.val)))
        elif plan.frozen == len(plan.stages) - 1:
            log.info("Features are not cached: %s", blocker)
    return Prepared(splits, model, plan, trained, fit_train, fit_val, loss_fn, image_size)


def range_test(cfg: DictConfig, prepared: Prepared, device: torch.device):
    """The LR range test (tunelab.lr_find) on a copy of what this config would train."""
    from tunelab.lr_find import range_test as run_test

    freezing.train_mode(prepared.model, prepared.plan)  # the copy keeps frozen BatchNorm in eval mode
    if prepared.trained is not prepared.model:
        prepared.trained.train()
    groups = freezing.param_groups(prepared.plan, 1.0, cfg.optimizer.get("layer_decay"))
    precision, channels_last = str(cfg.trainer.precision), cfg.trainer.channels_last

    def forward(module, x, y):
        return training_loss(module, x, y, prepared.loss_fn, device, precision, channels_last)[1]

    options = cfg.lr_find
    return run_test(
        prepared.trained, prepared.fit_train, groups, optimizer_factory(cfg.optimizer, 1.0), prepared.loss_fn, device,
        min_lr=options.min_lr, max_lr=options.max_lr, steps=options.steps, diverge=options.diverge,
        forward=forward, progress=cfg.trainer.progress,
    )


def find_lr(cfg: DictConfig, out_dir: Path):
    """`python -m tunelab.lr_find`: the range test alone, its plot and CSV in `out_dir`, and an MLflow run."""
    check_config(cfg)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    device = select_device(cfg.trainer.device)
    logger = build(cfg.logger, "logger")
    logger.connect_in_background()
    try:
        result = range_test(cfg, prepare(cfg, device), device)
    finally:
        logger.wait_for_connection()
    import matplotlib.pyplot as plt

    fig = _write_range_test(result, out_dir)  # on disk before MLflow is asked for anything
    try:
        logger.start(flat_config(cfg), {KIND_TAG: "lr_find", "model": str(cfg.model.name), "mlflow.runName": f"lr_find {cfg.model.name}"})
        status = "FAILED"
        try:
            for step, (lr, loss, smooth) in enumerate(zip(result.lrs, result.losses, result.smoothed)):
                logger.log_metrics({"lr_find/lr": lr, "lr_find/loss": loss, "lr_find/smoothed_loss": smooth}, step=step)
            logger.set_tag("tunelab.lr_find.stopped", result.stopped)
            _log_range_test(logger, result, fig, out_dir)
            status = "FINISHED"
        finally:
            logger.finish(status)
    finally:
        plt.close(fig)
    return result


def _train(cfg: DictConfig, logger, device: torch.device, saved, resume_from, run_dir, params, dist: distributed.Context) -> float:
    prepared = prepare(cfg, device, dist)
    splits, model, plan, trained, loss_fn = prepared.splits, prepared.model, prepared.plan, prepared.trained, prepared.loss_fn
    fit_train, fit_val = prepared.fit_train, prepared.fit_val

    lr, lr_test = cfg.optimizer.lr, None
    if lr == "auto" and saved is not None:
        lr = saved["lr_used"]
        log.info("optimizer.lr=auto: using %.4g, found by the range test before the run was interrupted", lr)
    elif lr == "auto":
        log.info("optimizer.lr=auto: running the LR range test first")
        if dist.is_main:  # on rank 0's shard; every process then trains with its suggestion
            lr_test = range_test(cfg, prepared, device)
        lr = dist.broadcast(lr_test.suggestion if lr_test else 0.0)
        log.info("optimizer.lr=auto: training with lr %.4g (%s)", lr, lr_test.rule if lr_test else "rank 0's range test")

    layer_decay = cfg.optimizer.get("layer_decay")
    groups = freezing.param_groups(plan, lr, layer_decay)
    log.info("Instantiating optimizer <%s>", cfg.optimizer._target_)
    scaler = torch.amp.GradScaler(device.type, enabled=str(cfg.trainer.precision) == "16-mixed")
    optimizer = optimizer_factory(cfg.optimizer, lr, grad_scaler=scaler.is_enabled())(groups)
    accumulate = cfg.trainer.accumulate_grad_batches
    steps_per_epoch = math.ceil(len(fit_train) / accumulate)
    schedule = build_schedule(cfg.scheduler, optimizer, steps_per_epoch, cfg.trainer.max_epochs)
    if scaler.is_enabled():  # the scaler skips the optimizer step of an overflowing batch by design; torch would warn each time
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")

    def unfreeze(epoch: int) -> None:
        every = cfg.freeze.unfreeze_every
        if every and epoch > 0 and epoch % every == 0:
            stage = freezing.unfreeze_next(plan)
            if stage is not None:
                schedule.add_param_group(stage.name, list(stage.params.values()), freezing.lr_scale(plan, stage, layer_decay))
                if dist.enabled:
                    stepped.rewrap()  # DDP averages only the parameters that were trainable when it was built
                log.info("Epoch %d: unfroze %s (%d parameters); trainable now %d", epoch + 1, stage.name, stage.numel, plan.trainable_params())

    ema = WeightEMA(trained, cfg.trainer.ema_decay) if cfg.trainer.ema_decay is not None else None
    stopping = cfg.trainer.early_stopping
    early_stopping = EarlyStopping(stopping.patience, stopping.monitor, stopping.mode, stopping.min_delta) if stopping.patience is not None else None

    if cfg.trainer.compile:
        log.info("Compiling the trained module with torch.compile (the first steps are slow)")
        trained = torch.compile(trained)
    stepped = distributed.DataParallel(trained, device) if dist.enabled else trained

    state = LoopState()
    if saved is not None:
        state = LoopState.from_dict(saved["loop"])
        if not dist.is_main:  # rank 0 carries the epoch's sums so far
            state.loss_sum, state.correct, state.seen = 0.0, 0, 0
        for epoch in range(state.epoch + (1 if state.batch else 0)):
            unfreeze(epoch)  # replay gradual unfreezing so the optimizer has the saved groups
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        for group in optimizer.param_groups:  # this run's choice of update kernel (optimizer.fused), not the checkpoint's
            group.update({key: optimizer.defaults[key] for key in ("fused", "foreach") if key in optimizer.defaults})
        schedule.load_state_dict(saved["schedule"])
        scaler.load_state_dict(saved["scaler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        if state.epoch >= cfg.trainer.max_epochs or state.stop_reason:
            log.warning("%s holds a run that had finished training (%d epochs%s): nothing is trained, its results are logged again",
                        resume_from, state.epoch, f", {state.stop_reason}" if state.stop_reason else "")
        else:
            log.info("Resuming from %s at epoch %d, batch %d (optimizer step %d)", resume_from, state.epoch + 1, state.batch, state.step)

    if saved is not None and saved.get("run_id"):
        logger.resume(saved["run_id"])
    else:
        extra = {"freeze.frozen_stages": ",".join(plan.frozen_names) or "(none)"}
        if cfg.optimizer.lr == "auto":
            extra["optimizer.lr_used"] = lr
        derived = resolved_params(cfg, prepared, schedule, lr, steps_per_epoch, dist)
        log.info("Resolved: %s", "  ".join(f"{key}={value}" for key, value in derived.items()))
        logger.start({**params, **extra, **derived}, run_tags(cfg))
        logger.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        logger.log_text(plan.table() + "\n", "stages.txt")
        if lr_test is not None:
            import matplotlib.pyplot as plt

            fig = _write_range_test(lr_test, run_dir)
            try:
                _log_range_test(logger, lr_test, fig, run_dir)
            finally:
                plt.close(fig)

    saver = checkpoints.Saver(run_dir, cfg.trainer.checkpoint_min_interval_s, cfg.monitor) if run_dir is not None and dist.is_main else None
    if saver is not None and cfg.trainer.keep_checkpoints == "none" and not logger.log_model_enabled:
        log.warning("trainer.keep_checkpoints=none and no model logged to MLflow: a finished run keeps no weights")

    def save(loop_state: LoopState, is_best: bool) -> None:
        if saver is None:
            return
        saver.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict(), "rng": checkpoints.rng_state(), "loop": loop_state.to_dict(),
            "frozen": plan.frozen, "run_id": logger.run_id, "config": params, "lr_used": lr,
            **({"ema": ema.state_dict()} if ema is not None else {}),
        }, loop_state, is_best)

    if saved is not None:
        checkpoints.set_rng_state(saved["rng"])
    stop = _StopFlag()
    with _graceful_stop(stop):  # also covers the final logging: a signal then cannot leave the run RUNNING
        status = "FAILED"
        try:
            fit(
                stepped, fit_train, fit_val, optimizer, schedule, loss_fn, logger,
                max_epochs=cfg.trainer.max_epochs, device=device, accumulate=accumulate,
                precision=str(cfg.trainer.precision), progress=cfg.trainer.progress and dist.is_main,
                log_every=cfg.trainer.log_every_n_steps, monitor=cfg.monitor,
                skip_nonfinite=cfg.trainer.skip_nonfinite, state=state, scaler=scaler, channels_last=cfg.trainer.channels_last,
                train_mode=lambda: freezing.train_mode(model, plan), trainable_params=plan.trainable_params,
                on_epoch_start=unfreeze, save=save, save_every_n_steps=cfg.trainer.checkpoint_every_n_steps or 0,
                stop_requested=stop, ema=ema, early_stopping=early_stopping, dist=dist, eval_model=trained,
            )
            if saver is not None:  # FINISHED means every checkpoint is on disk: a write that fails makes the run FAILED
                saver.close()
            status = "FINISHED"
            if state.stop_reason:
                logger.set_tag(EARLY_STOP_TAG, state.stop_reason)
        except (Interrupted, KeyboardInterrupt):
            status = "KILLED"
            if saver is not None:
                try:
                    saver.close()
                except checkpoints.CheckpointError:
                    status = "FAILED"
                    raise
                if (run_dir / checkpoints.LAST).is_file():
                    print(f"\nStopped. Continue this run with:\n  {resume_command(run_dir, dist.world_size)}\n", file=sys.stderr)
            if stop.signal is not None:
                raise SystemExit(128 + stop.signal) from None
            raise
        finally:
            try:
                if saver is not None:
                    saver.flush()  # what the last epochs of a failing run put off
                if dist.is_main:  # those checkpoints are written meanwhile
                    _log_results(logger, state.history, steps_per_epoch, model if status == "FINISHED" else None, splits)
            finally:
                try:
                    if saver is not None:
                        saver.close()
                except checkpoints.CheckpointError as err:  # only a failing run writes here: its own error is the one raised
                    log.error("%s", err)
                finally:
                    logger.finish(status)
    if saver is not None:  # the run finished and everything is stored
        checkpoints.drop_after_success(run_dir, cfg.trainer.keep_checkpoints)
    best = state.history.best(cfg.monitor)
    log.info("Best %s: %.4f%s", cfg.monitor, best, f" (run folder {run_dir})" if run_dir else "")
    return best


#: The prefix of the params that hold what tunelab derived for a run (the config params stay as given).
RESOLVED_PREFIX = "resolved."


def resolved_params(cfg: DictConfig, prepared: Prepared, schedule, lr: float, steps_per_epoch: int, dist: distributed.Context) -> dict:
    """Every value the run derived rather than read from its config, as `resolved.*` params: the
    scheduler's arguments (those filled in for the run included), its interval and warmup, the
    steps per epoch and in all, the image size used, the global batch and the lr trained with."""
    values = {
        "scheduler": {"_target_": cfg.scheduler._target_, **schedule.resolved},
        "steps_per_epoch": steps_per_epoch,
        "trainer": {"total_steps": steps_per_epoch * cfg.trainer.max_epochs},
        "data": {"image_size": prepared.image_size, "global_batch_size": cfg.data.batch_size * dist.world_size},
        "optimizer": {"lr": lr},
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


def _deterministic(splits, data_cfg: DictConfig) -> bool:
    """True when every image is the same in every epoch (in-memory tensors, or no augmentation)."""
    from torch.utils.data import TensorDataset

    in_memory = isinstance(splits.train, TensorDataset) and isinstance(splits.val, TensorDataset)
    return in_memory or data_cfg.dataset.get("augment") is False


def _write_range_test(result, folder: Path | None):
    """The range test's plot (returned, for the caller to close) and, given a folder, lr_find.png and
    lr_find.csv in it."""
    fig = result.plot()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(folder / "lr_find.png", dpi=120)
        result.write_csv(folder / "lr_find.csv")
    return fig


def _log_range_test(logger, result, fig, folder: Path | None) -> None:
    """The range test in an MLflow run: the plot, the curve's CSV (when written), the rule and the suggestion."""
    logger.log_figure(fig, "lr_find.png")
    if folder is not None:
        logger.log_artifact(folder / "lr_find.csv")
    logger.set_tag("tunelab.lr_find.rule", result.rule)
    logger.log_metrics({"lr_find/suggested_lr": result.suggestion}, step=0)


def _log_results(logger, history: History, steps_per_epoch: int, model, splits) -> None:
    """The LR curve always (a failed run keeps it); the model only on success. With MLflow's
    helper process (`logger=mlflow`) the curve is drawn there while the model is logged here."""
    if history.lrs:
        logger.log_lr_curves(history.lrs, steps_per_epoch)
    if model is not None and logger.log_model_enabled:
        model.cpu().eval()
        example = torch.stack([splits.val[i][0] for i in range(min(2, len(splits.val)))]).numpy()
        logger.log_model(model, example)
