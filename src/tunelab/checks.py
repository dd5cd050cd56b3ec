"""The config's values checked before any work: what would only fail later, or train nonsense, fails
here with one sentence naming the key."""

from __future__ import annotations

from omegaconf import DictConfig

from tunelab import checkpoints, models
from tunelab.errors import require
from tunelab.schedules import EPOCH_METRICS


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
