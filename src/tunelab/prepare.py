"""What a run trains, built from the config: the data (and its fold), the model with its new head,
the freezing, the loss, and the batches the optimizer sees (cached backbone features when only the
head trains)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from tunelab import data as data_lib
from tunelab import distributed, freezing, models
from tunelab.errors import build

log = logging.getLogger(__name__)


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


def _deterministic(splits, data_cfg: DictConfig) -> bool:
    """True when every image is the same in every epoch (in-memory tensors, or no augmentation)."""
    from torch.utils.data import TensorDataset

    in_memory = isinstance(splits.train, TensorDataset) and isinstance(splits.val, TensorDataset)
    return in_memory or data_cfg.dataset.get("augment") is False
