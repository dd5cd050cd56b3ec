"""The config's values checked before any work: what would only fail later, or train nonsense, fails
here with one sentence naming the key."""

from __future__ import annotations

from omegaconf import DictConfig

from tunelab.choices import AUGMENT, EPOCH_METRICS, KEEP_CHECKPOINTS
from tunelab.errors import require


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
    _check_swa(cfg, monitors)
    _check_probe(cfg)
    number("trainer.max_epochs", cfg.trainer.max_epochs, positive=True, integer=True)
    number("trainer.accumulate_grad_batches", cfg.trainer.accumulate_grad_batches, positive=True, integer=True)
    number("data.batch_size", cfg.data.batch_size, positive=True, integer=True)
    number("data.image_size", cfg.data.image_size, positive=True, integer=True)
    number("freeze.depth", cfg.freeze.depth, integer=True)
    number("seed", cfg.seed, integer=True)
    keep = cfg.trainer.keep_checkpoints
    require(keep in KEEP_CHECKPOINTS, f"trainer.keep_checkpoints={keep} must be one of {', '.join(KEEP_CHECKPOINTS)}")
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
    _check_augment(cfg.data)
    workers = cfg.data.get("num_workers")
    if workers is not None:
        number("data.num_workers", workers, integer=True)
        require(workers >= 0, f"data.num_workers={workers} must be >= 0 (0 = load in the training process, null = min(4, cores - 1))")
    if cfg.model.get("weights_path"):  # its contents are checked when the model is built; a typo in the path is caught now
        from tunelab.models import weights_file  # torch: only a run that loads weights imports it this early

        weights_file(cfg.model.weights_path)


def _check_augment(data: DictConfig) -> None:
    """`data.augment` on image files; data held as tensors (digits, fake) is the same each epoch."""
    augment = data.get("augment")
    shown = str(augment).lower() if isinstance(augment, bool) else augment
    if "cache" in data:  # image files
        require(augment in AUGMENT, f"data.augment={shown} must be true, false, randaugment or trivialaugment")
    else:
        option = str(data.dataset._target_).rsplit(".", 1)[-1]
        require(augment in (None, False), f"data.augment={shown}: data={option} holds its images as tensors, the same every epoch, and "
                                          "tunelab does not augment them; augmentation is for image files (data=folder, csv or cifar10)")


def _check_swa(cfg: DictConfig, monitors: dict[str, str]) -> None:
    """`trainer.swa.*`, and the `_swa` metrics only where they exist: from SWA's first epoch on."""
    swa = cfg.trainer.get("swa") or {}
    start = swa.get("start_epoch")
    max_epochs = cfg.trainer.max_epochs
    if start is not None:
        require(isinstance(start, (int, float)) and not isinstance(start, bool) and start >= 0 and (start < 1 or float(start).is_integer()),
                f"trainer.swa.start_epoch={start!r} must be an epoch (0, 1, 2, ...) or a fraction of the run in (0, 1) (0.75 = the last quarter)")
        lr = swa.get("lr")
        require(lr is None or (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0),
                f"trainer.swa.lr={lr!r} must be a learning rate > 0, or null (the lr the schedule has reached when SWA starts)")
        epochs = swa.get("anneal_epochs")
        require(isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 0, f"trainer.swa.anneal_epochs={epochs!r} must be a whole number of epochs >= 0")
        require(swa.get("anneal_strategy") in ("cos", "linear"), f"trainer.swa.anneal_strategy={swa.get('anneal_strategy')!r} must be cos or linear")
    runs = start is not None and swa_start(start, max_epochs) < max_epochs
    for key, name in monitors.items():
        if not name.endswith("_swa"):
            continue
        require(key == "monitor" or (key.startswith("trainer.early_stopping") and cfg.trainer.early_stopping.patience is None),
                f"{key}={name}: the SWA metrics exist only from trainer.swa.start_epoch on; watch val/acc or val/loss here")
        require(runs, f"{key}={name} needs SWA within the run: set trainer.swa.start_epoch below trainer.max_epochs={max_epochs} (e.g. 0.75)")


def swa_start(value: float, max_epochs: int) -> int:
    """`trainer.swa.start_epoch` as an epoch index: a fraction in (0, 1) of the run, or the epoch itself."""
    return int(round(value * max_epochs)) if 0 < value < 1 else int(value)


def _check_probe(cfg: DictConfig) -> None:
    """LP-FT's `freeze.probe_epochs` and `freeze.finetune_lr_scale` (freeze=lp_ft)."""
    probe = cfg.freeze.get("probe_epochs")
    if not probe:
        return
    max_epochs = cfg.trainer.max_epochs
    require(isinstance(probe, int) and not isinstance(probe, bool) and 0 < probe < max_epochs,
            f"freeze.probe_epochs={probe!r} must be a whole number of epochs from 1 to trainer.max_epochs - 1 ({max_epochs - 1}): "
            "the head trains alone for that many epochs, then everything")
    scale = cfg.freeze.get("finetune_lr_scale")
    require(isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0,
            f"freeze.finetune_lr_scale={scale!r} must be a number > 0: the body's lr as a multiple of the head's once everything trains")
    require(not cfg.freeze.get("unfreeze_every"), "freeze.unfreeze_every and freeze.probe_epochs (LP-FT) both unfreeze; use one of them")
    require(cfg.freeze.depth != 0, "freeze.probe_epochs (LP-FT) needs something frozen while the head probes: freeze.depth=-1 (all but the head)")
