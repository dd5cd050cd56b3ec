"""What a run trains, built from the config: the data (and its fold), the model with its new head,
the freezing, the loss, and the batches the optimizer sees (cached backbone features when only the
head trains)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from tunelab import data as data_lib
from tunelab import distributed, freezing, models
from tunelab.data import mixing
from tunelab.errors import build, require
from tunelab.inference import ModelInfo

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
    #: The held-out test batches (None when the data has no test split): built, never read before training ends.
    test_loader: object = None
    mean: tuple = ()
    std: tuple = ()
    #: What the trained model needs to be used on new images (its classes and preprocessing).
    info: ModelInfo | None = None
    #: LP-FT whose probe trains the head on cached features: (the model, its image loaders), what
    #: training switches to when the probe ends; None otherwise.
    after_probe: tuple | None = None


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
    splits, resize_to = _decoded_once(splits, cfg.data, image_size, spec)

    def loaders(train, val):
        """Shuffled training and ordered validation batches, cut to trainer.limit_*_batches; small
        in-memory sets are moved onto the GPU once."""
        train, val = data_lib.to_device(train, device), data_lib.to_device(val, device)
        args = dict(batch_size=cfg.data.batch_size, seed=cfg.seed, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                    rank=dist.rank, world_size=dist.world_size)
        return (
            data_lib.make_loader(train, shuffle=True, sampler=cfg.data.get("sampler"), limit_batches=cfg.trainer.limit_train_batches, **args),
            data_lib.make_loader(val, shuffle=False, limit_batches=cfg.trainer.limit_val_batches, **args),
        )

    train_loader, val_loader = loaders(splits.train, splits.val)
    test = splits.test
    test_loader = data_lib.make_loader(data_lib.to_device(test, device), cfg.data.batch_size, False, cfg.seed, cfg.data.num_workers,
                                       pin_memory=device.type == "cuda") if test is not None else None
    log.info("Data: %d train / %d val / %s test images, %d classes, %dx%d px", len(splits.train), len(splits.val),
             len(test) if test is not None else "no", len(splits.classes), image_size, image_size)

    log.info("Instantiating model <%s> (%s)", cfg.model._target_, cfg.model.name)
    model = build(cfg.model, "model", num_classes=len(splits.classes))
    plan = freezing.freeze(model, cfg.freeze.depth, cfg.freeze.bn)
    log.info("Stages of %s:\n%s", cfg.model.name, plan.table())
    model.to(device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(cfg.loss, splits, device)

    mix = mixing.mixer(cfg.data.get("mixup"), cfg.data.get("cutmix"), len(splits.classes))
    if mix is not None:
        log.info("Training batches are mixed: %s", mix)
        train_loader = mixing.MixedBatches(train_loader, mix)
    trained, fit_train, fit_val, after_probe = model, train_loader, val_loader, None
    if cfg.freeze.cache_features:
        deterministic = _deterministic(splits, cfg.data) and mix is None
        blocker = freezing.feature_cache_blocker(model, plan, deterministic, cfg.freeze.unfreeze_every) or _probe_blocker(cfg, dist)
        if blocker is None:
            log.info("Computing the frozen backbone's features once (freeze.cache_features%s)", ", while probing" if _probing(cfg) else "")
            trained = model.get_submodule(model.head_names[0])
            fit_train, fit_val = loaders(*(freezing.head_inputs(model, ds, device) for ds in (splits.train, splits.val)))
            after_probe = (model, train_loader, val_loader) if _probing(cfg) else None
        elif plan.frozen == len(plan.stages) - 1:
            log.info("Features are not cached: %s", blocker)
    return Prepared(splits, model, plan, trained, fit_train, fit_val, loss_fn, image_size, test_loader, tuple(spec.mean), tuple(spec.std),
                    _model_info(cfg, splits, image_size, spec, resize_to), after_probe)


def _probing(cfg: DictConfig) -> bool:
    return bool(cfg.freeze.get("probe_epochs"))


def _probe_blocker(cfg: DictConfig, dist: distributed.Context) -> str | None:
    """Why LP-FT's probe cannot train on cached features: what needs one module for the whole run."""
    if not _probing(cfg):
        return None
    t = cfg.trainer
    if t.ema_decay is not None or (t.get("swa") or {}).get("start_epoch") is not None:
        return "the EMA or SWA averages the whole model from the start, and LP-FT trains it after the probe"
    if t.compile or dist.enabled:
        return "torch.compile and torchrun wrap one module for the whole run, and LP-FT trains the whole model after the probe"
    return None


#: The data options held as tensors, resized to a square once (the others resize the shorter side and crop).
_SQUARE_DATA = ("tunelab.data.digits", "tunelab.data.fake")


def _decoded_once(splits: data_lib.Splits, data_cfg: DictConfig, image_size: int, spec: models.InputSpec):
    """File-backed splits read from their decoded pixels (`data.cache`, unless off), and the shorter
    side validation images are resized to (None: image_size)."""
    if "cache" not in data_cfg:  # the data options held as tensors
        return splits, None
    dataset = data_cfg.dataset
    return data_lib.cached_splits(splits, data_cfg.cache, data_cfg.get("cache_scale", 256 / 224), image_size, list(spec.mean), list(spec.std),
                                  dataset.get("augment", True), bool(dataset.get("skip_bad_files", False)))


def _model_info(cfg: DictConfig, splits: data_lib.Splits, image_size: int, spec: models.InputSpec, resize_to: int | None) -> ModelInfo:
    target = str(cfg.data.dataset._target_)
    return ModelInfo(list(splits.classes), image_size, tuple(spec.mean), tuple(spec.std), "square" if target in _SQUARE_DATA else "shorter_side",
                     OmegaConf.to_container(cfg.model, resolve=True), target.rsplit(".", 1)[-1], resize_to=resize_to)


def build_loss(loss_cfg: DictConfig, splits: data_lib.Splits, device: torch.device) -> torch.nn.Module:
    """The configured loss; `loss.class_weights=balanced` weighs each class by its inverse frequency
    in the training split (scikit-learn's "balanced" class weights)."""
    weights = loss_cfg.get("class_weights")
    require(weights in (None, "balanced"), f"loss.class_weights={weights} must be balanced or null (every class weighs 1)")
    node = OmegaConf.create({k: v for k, v in OmegaConf.to_container(loss_cfg, resolve=True).items() if k != "class_weights"})
    log.info("Instantiating loss <%s>%s", node._target_, " with balanced class weights" if weights else "")
    if weights is None:
        return build(node, "loss")
    weight = data_lib.class_weights(splits.train, len(splits.classes)).to(device)
    log.info("Class weights: %s", ", ".join(f"{name} {w:.3f}" for name, w in zip(splits.classes, weight.tolist())))
    return build(node, "loss", weight=weight)


def _deterministic(splits, data_cfg: DictConfig) -> bool:
    """True when every image is the same in every epoch (in-memory tensors, or no augmentation)."""
    from torch.utils.data import TensorDataset

    in_memory = isinstance(splits.train, TensorDataset) and isinstance(splits.val, TensorDataset)
    return in_memory or data_cfg.dataset.get("augment") is False
