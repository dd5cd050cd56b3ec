"""One run, top to bottom: data, model, freezing, optimizer, schedule, logger; fit; log the result."""

from __future__ import annotations

import logging
import math
import os
import random
import signal
from contextlib import contextmanager

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from tunelab import data as data_lib
from tunelab import freezing, models
from tunelab.errors import ConfigError, build, require
from tunelab.loop import History, fit
from tunelab.schedules import EPOCH_METRICS, build_schedule

log = logging.getLogger(__name__)

GROUPS = ("model", "scheduler", "optimizer", "freeze", "data", "trainer", "logger")


class Terminated(BaseException):
    """SIGTERM arrived: the run ends KILLED, like Ctrl-C."""


@contextmanager
def _sigterm_as_exception():
    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a joblib worker thread): nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def select_device(name: str) -> torch.device:
    """`auto` = CUDA when present, else CPU; `cuda` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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

    number("optimizer.lr", cfg.optimizer.lr, positive=True)
    number("trainer.max_epochs", cfg.trainer.max_epochs, positive=True, integer=True)
    number("trainer.accumulate_grad_batches", cfg.trainer.accumulate_grad_batches, positive=True, integer=True)
    number("data.batch_size", cfg.data.batch_size, positive=True, integer=True)
    number("data.image_size", cfg.data.image_size, positive=True, integer=True)
    number("freeze.depth", cfg.freeze.depth, integer=True)
    number("seed", cfg.seed, integer=True)
    require(str(cfg.trainer.precision) in ("32", "bf16-mixed", "16-mixed"), f"trainer.precision={cfg.trainer.precision} must be 32, bf16-mixed or 16-mixed")
    require(cfg.monitor in EPOCH_METRICS, f"monitor={cfg.monitor} is never logged; use one of {', '.join(EPOCH_METRICS)}")
    for key in ("limit_train_batches", "limit_val_batches"):
        value = cfg.trainer[key]
        if value is not None:
            number(f"trainer.{key}", value, positive=True, integer=True)


def _without(node: DictConfig, *keys: str) -> DictConfig:
    copy = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    for key in keys:
        copy.pop(key, None)
    return copy


def run_tags(cfg: DictConfig) -> dict[str, str]:
    """The chosen option of each group and the command-line overrides (from Hydra, when present)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.get()
    tags = {g: str(hydra.runtime.choices.get(g)) for g in GROUPS if g in hydra.runtime.choices}
    tags["overrides"] = " ".join(hydra.overrides.task) or "(none)"
    return tags


def train(cfg: DictConfig) -> float:
    """Run one fine-tuning job as configured; return the best value of `cfg.monitor`."""
    check_config(cfg)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    device = select_device(cfg.trainer.device)

    spec = models.input_spec(cfg.model)
    image_size = max(cfg.data.image_size, spec.min_size)
    if image_size != cfg.data.image_size:
        log.info("data.image_size raised from %d to %d, the smallest input %s accepts", cfg.data.image_size, image_size, cfg.model.name)
    log.info("Instantiating data <%s>", cfg.data.dataset._target_)
    splits = build(cfg.data.dataset, "data", image_size=image_size, mean=list(spec.mean), std=list(spec.std), seed=cfg.seed)
    loader_args = dict(batch_size=cfg.data.batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    train_loader = data_lib.make_loader(splits.train, shuffle=True, limit_batches=cfg.trainer.limit_train_batches, **loader_args)
    val_loader = data_lib.make_loader(splits.val, shuffle=False, limit_batches=cfg.trainer.limit_val_batches, **loader_args)
    log.info("Data: %d train / %d val images, %d classes, %dx%d px", len(splits.train), len(splits.val), len(splits.classes), image_size, image_size)

    log.info("Instantiating model <%s> (%s)", cfg.model._target_, cfg.model.name)
    model = build(cfg.model, "model", num_classes=len(splits.classes))
    plan = freezing.freeze(model, cfg.freeze.depth, cfg.freeze.bn)
    log.info("Stages of %s:\n%s", cfg.model.name, plan.table())
    model.to(device)

    layer_decay = cfg.optimizer.get("layer_decay")
    groups = freezing.param_groups(plan, cfg.optimizer.lr, layer_decay)
    log.info("Instantiating optimizer <%s>", cfg.optimizer._target_)
    optimizer = build(_without(cfg.optimizer, "layer_decay"), "optimizer")(groups)
    accumulate = cfg.trainer.accumulate_grad_batches
    steps_per_epoch = math.ceil(len(train_loader) / accumulate)
    schedule = build_schedule(cfg.scheduler, optimizer, steps_per_epoch, cfg.trainer.max_epochs)
    log.info("Instantiating loss <%s>", cfg.loss._target_)
    loss_fn = build(cfg.loss, "loss")

    trained, fit_train, fit_val = model, train_loader, val_loader
    if cfg.freeze.cache_features:
        blocker = freezing.feature_cache_blocker(model, plan, _deterministic(splits, cfg.data), cfg.freeze.unfreeze_every)
        if blocker is None:
            log.info("Computing the frozen backbone's features once (freeze.cache_features)")
            trained = model.get_submodule(model.head_names[0])
            cached = [freezing.head_inputs(model, ds, device) for ds in (splits.train, splits.val)]
            fit_train = data_lib.make_loader(cached[0], shuffle=True, limit_batches=cfg.trainer.limit_train_batches, **loader_args)
            fit_val = data_lib.make_loader(cached[1], shuffle=False, limit_batches=cfg.trainer.limit_val_batches, **loader_args)
        elif plan.frozen == len(plan.stages) - 1:
            log.info("Features are not cached: %s", blocker)

    def unfreeze(epoch: int) -> None:
        every = cfg.freeze.unfreeze_every
        if every and epoch > 0 and epoch % every == 0:
            stage = freezing.unfreeze_next(plan)
            if stage is not None:
                schedule.add_param_group(stage.name, list(stage.params.values()), freezing.lr_scale(plan, stage, layer_decay))
                log.info("Epoch %d: unfroze %s (%d parameters); trainable now %d", epoch + 1, stage.name, stage.numel, plan.trainable_params())

    log.info("Instantiating logger <%s>", cfg.logger._target_)
    logger = build(cfg.logger, "logger")
    params = {**flat_config(cfg), "freeze.frozen_stages": ",".join(plan.frozen_names) or "(none)"}
    logger.start(params, run_tags(cfg))
    logger.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    logger.log_text(plan.table() + "\n", "stages.txt")
    history = History()
    status = "FAILED"
    try:
        with _sigterm_as_exception():
            fit(
                trained, fit_train, fit_val, optimizer, schedule, loss_fn, logger,
                max_epochs=cfg.trainer.max_epochs, device=device, accumulate=accumulate,
                precision=str(cfg.trainer.precision), progress=cfg.trainer.progress,
                log_every=cfg.trainer.log_every_n_steps, history=history,
                train_mode=lambda: freezing.train_mode(model, plan),
                trainable_params=plan.trainable_params, on_epoch_start=unfreeze,
            )
        status = "FINISHED"
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    finally:
        try:
            _log_results(logger, history, steps_per_epoch, model if status == "FINISHED" else None, splits)
        finally:
            logger.finish(status)
    run_dir = checkpoint_dir(cfg)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict()}, run_dir / "last.pt")
        log.info("Weights saved to %s", run_dir / "last.pt")
    best = history.best(cfg.monitor)
    log.info("Best %s: %.4f", cfg.monitor, best)
    return best


def checkpoint_dir(cfg: DictConfig):
    """`trainer.checkpoint_dir`, else the Hydra run folder; None when neither exists (tests)."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    if cfg.trainer.get("checkpoint_dir"):
        return Path(cfg.trainer.checkpoint_dir)
    if HydraConfig.initialized() and HydraConfig.get().runtime.get("output_dir"):
        return Path(HydraConfig.get().runtime.output_dir)
    return None


def flat_config(cfg: DictConfig) -> dict:
    from tunelab.tracking import flatten

    return flatten(OmegaConf.to_container(cfg, resolve=True))


def _deterministic(splits, data_cfg: DictConfig) -> bool:
    """True when every image is the same in every epoch (in-memory tensors, or no augmentation)."""
    from torch.utils.data import TensorDataset

    in_memory = isinstance(splits.train, TensorDataset) and isinstance(splits.val, TensorDataset)
    return in_memory or data_cfg.dataset.get("augment") is False


def _log_results(logger, history: History, steps_per_epoch: int, model, splits) -> None:
    """The LR curve always (a failed run keeps it); the model only on success."""
    from tunelab import plots

    if history.lrs:
        fig = plots.lr_curves(history.lrs, steps_per_epoch)
        logger.log_figure(fig, "lr_curve.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
    if model is not None and logger.log_model_enabled:
        model.cpu().eval()
        example = torch.stack([splits.val[i][0] for i in range(min(2, len(splits.val)))]).numpy()
        logger.log_model(model, example)
