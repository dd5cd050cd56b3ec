"""The optimizer: the config's torch optimizer built over the run's param groups, with torch's fused
kernel where it is safe."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from tunelab.errors import ConfigError, build

log = logging.getLogger(__name__)


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
