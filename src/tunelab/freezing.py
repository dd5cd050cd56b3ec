"""Freeze depth as one number for every model: stages, freezing, the BatchNorm policy, param groups.

A model is cut into an ordered list of named stages from the stem to the head, derived from its
own structure: the top-level children in order (a `features` or `layers` container is opened), a
new stage starting at each child that downsamples with a strided convolution and ending after each
strided pooling layer. The replaced output layers form the last stage, `head`; trainable layers
between the body and the head (VGG's fully connected layers) form `classifier`.
For a ResNet this gives stem, layer1, layer2, layer3, layer4, head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tunelab.errors import require

log = logging.getLogger(__name__)

_CONTAINERS = ("features", "layers")
_CLASSIFIERS = ("classifier", "head", "fc", "last_linear")
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


@dataclass(eq=False)
class Stage:
    """A named slice of the model: its parameters (by dotted name) and its BatchNorm layers."""

    name: str
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    norms: list[_BatchNorm] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())


def _strided(module: nn.Module, kinds: tuple[type, ...]) -> bool:
    for m in module.modules():
        if isinstance(m, kinds):
            stride = m.stride if isinstance(m.stride, tuple) else (m.stride,)
            if any(s is not None and s > 1 for s in stride):
                return True
    return False


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    units = []
    for name, child in model.named_children():
        if name in _CONTAINERS and isinstance(child, (nn.Sequential, nn.ModuleList)):
            units.extend((f"{name}.{n}", c) for n, c in child.named_children())
        else:
            units.append((name, child))
    return units


def _span_name(first: str, last: str) -> str:
    if first == last:
        return first
    head_a, _, tail_a = first.rpartition(".")
    head_b, _, tail_b = last.rpartition(".")
    return f"{head_a}.{tail_a}-{tail_b}" if head_a and head_a == head_b else f"{first}-{last}"


def _structural_body(model: nn.Module, heads: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """Stages of a torchvision-style model from its children, by the rule in the module docstring."""
    head_prefixes = tuple(f"{h}." for h in heads)

    def own(path: str, module: nn.Module) -> list[str]:
        names = (f"{path}.{n}" for n, _ in module.named_parameters())
        return [n for n in names if not n.startswith(head_prefixes)]

    groups: list[list[tuple[str, nn.Module]]] = []
    current: list[tuple[str, nn.Module]] = []
    classifier: list[str] = []

    def close() -> None:
        nonlocal current
        if any(own(p, u) for p, u in current):
            groups.append(current)
        current = []

    for path, unit in _units(model):
        if path in heads:
            continue
        if path in _CLASSIFIERS:
            classifier.extend(own(path, unit))
            continue
        if _strided(unit, (nn.Conv2d,)) and any(own(p, u) for p, u in current):
            close()
        current.append((path, unit))
        if not _strided(unit, (nn.Conv2d,)) and _strided(unit, _POOLS):
            close()
    close()

    body = []
    for i, group in enumerate(groups):
        paths = [p for p, u in group if own(p, u)]
        name = "stem" if i == 0 else _span_name(paths[0], paths[-1])
        body.append((name, [n for p, u in group for n in own(p, u)]))
    if classifier:
        body.append(("classifier", classifier))
    return body


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    prefix = []
    for column in zip(*parts):
        if len(set(column)) > 1:
            break
        prefix.append(column[0])
    return ".".join(prefix)


def _main_prefix(names: list[str]) -> str:
    """The first two dotted parts most names share ("blocks.11" for a last block plus a final norm)."""
    from collections import Counter

    return Counter(".".join(n.split(".")[:2]) for n in names).most_common(1)[0][0]


def _timm_body(model: nn.Module, heads: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """Stages of a timm model: its own coarse parameter grouping (the one timm's layer decay uses)."""
    from timm.models import group_parameters

    head_prefixes = tuple(f"{h}." for h in heads)
    groups = list(group_parameters(model, model.group_matcher(coarse=True)).values())
    body = []
    for i, names in enumerate(groups):
        names = [n for n in names if not n.startswith(head_prefixes)]
        if not names:
            continue
        if not body:
            name = "stem"
        elif i == len(groups) - 1:
            name = "neck"
        else:
            name = _common_prefix(names) or _main_prefix(names)
        body.append((name, names))
    return body


def stages(model: nn.Module) -> list[Stage]:
    """The model's stages from the stem to `head` (see the module docstring for the rule)."""
    heads = tuple(getattr(model, "head_names", ()))
    require(heads, f"{type(model).__name__} has no replaced output layer (build it with tunelab.models)")
    is_timm = hasattr(model, "group_matcher") and hasattr(model, "pretrained_cfg")
    body = _timm_body(model, heads) if is_timm else _structural_body(model, heads)
    named = dict(model.named_parameters())
    result = [Stage(name, {n: named[n] for n in names}) for name, names in body]
    head = Stage("head")
    for name in heads:
        head.params.update({f"{name}.{n}": p for n, p in model.get_submodule(name).named_parameters()})
    result.append(head)

    covered = {n for s in result for n in s.params}
    leftover = [n for n in named if n not in covered]
    if leftover:  # parameters outside the walked children (rare): they belong to the stem
        result[0].params.update({n: named[n] for n in leftover})
    owner = {n: s for s in result for n in s.params}
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and f"{name}.weight" in owner:
            owner[f"{name}.weight"].norms.append(module)
    return result


@dataclass
class FreezePlan:
    """The stages of a model and how many of the leading ones are frozen right now."""

    stages: list[Stage]
    frozen: int
    bn: str

    @property
    def trainable_stages(self) -> list[Stage]:
        return self.stages[self.frozen :]

    @property
    def frozen_names(self) -> list[str]:
        return [s.name for s in self.stages[: self.frozen]]

    def trainable_params(self) -> int:
        return sum(s.numel for s in self.trainable_stages)

    def table(self) -> str:
        """The stage table: stage, parameters, frozen or trainable."""
        width = max(len(s.name) for s in self.stages)
        lines = [f"{'stage':<{width}}  {'params':>12}  state"]
        for i, s in enumerate(self.stages):
            lines.append(f"{s.name:<{width}}  {s.numel:>12,}  {'frozen' if i < self.frozen else 'trainable'}")
        return "\n".join(lines)


def freeze(model: nn.Module, depth: int, bn: str = "eval") -> FreezePlan:
    """Freeze the first `depth` stages (negative: count from the end, -1 = all but the head).

    Frozen parameters get `requires_grad=False`, so no autograd graph is built through a frozen
    prefix. With `bn="eval"` their BatchNorm layers keep fixed running statistics (see `train_mode`).
    """
    require(bn in ("eval", "train"), f"freeze.bn must be 'eval' or 'train', got {bn!r}")
    plan_stages = stages(model)
    n = len(plan_stages)
    names = ", ".join(f"{i + 1}={s.name}" for i, s in enumerate(plan_stages))
    require(
        isinstance(depth, int) and -n < depth < n,
        f"freeze.depth={depth} is out of range for {type(model).__name__}, which has {n} stages ({names}); "
        f"use 0..{n - 1} (0 = full fine-tuning) or -1..-{n - 1} (-1 = all but the head)",
    )
    frozen = depth if depth >= 0 else n + depth
    for i, stage in enumerate(plan_stages):
        for p in stage.params.values():
            p.requires_grad_(i >= frozen)
    return FreezePlan(plan_stages, frozen, bn)


def unfreeze_next(plan: FreezePlan) -> Stage | None:
    """Gradual unfreezing: make the frozen stage nearest the head trainable; None when none is left."""
    if plan.frozen == 0:
        return None
    plan.frozen -= 1
    stage = plan.stages[plan.frozen]
    for p in stage.params.values():
        p.requires_grad_(True)
    return stage


def lr_scale(plan: FreezePlan, stage: Stage, layer_decay: float | None) -> float:
    """The multiplier of a stage's lr: `layer_decay ** (stages between it and the head)`, or 1."""
    if layer_decay is None:
        return 1.0
    position = next(i for i, s in enumerate(plan.stages) if s is stage)
    return layer_decay ** (len(plan.stages) - 1 - position)


def feature_cache_blocker(model: nn.Module, plan: FreezePlan, deterministic_data: bool, unfreeze_every: int) -> str | None:
    """Why the backbone's outputs cannot be computed once and reused, or None when they can.

    Valid only when nothing but the single output layer trains, nothing before it changes from
    one pass to the next (frozen BatchNorm in eval mode, no active dropout) and every image is the
    same each epoch (no random augmentation).
    """
    heads = getattr(model, "head_names", ())
    if plan.frozen != len(plan.stages) - 1:
        return "stages other than the head train"
    if unfreeze_every:
        return "gradual unfreezing changes the backbone"
    if len(heads) != 1:
        return "the model has auxiliary heads"
    if plan.bn != "eval" and any(s.norms for s in plan.stages[:-1]):
        return "freeze.bn=train updates BatchNorm statistics"
    head_prefix = f"{heads[0]}."
    for name, module in model.named_modules():
        if name.startswith(head_prefix):
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"dropout before the head ({name}) makes the features random"
        rate = next((r for r in (getattr(module, "drop_rate", 0), getattr(module, "drop_prob", 0)) if isinstance(r, float) and r > 0), None)
        if rate is not None:  # functional dropout (DenseNet, timm's drop_rate) or stochastic depth (timm's DropPath)
            return f"dropout or stochastic depth before the head ({name or 'the model'}, {rate:g}) makes the features random"
    if not deterministic_data:
        return "random augmentation changes the images each epoch"
    return None


def head_inputs(model: nn.Module, dataset, device, batch_size: int = 256):
    """The inputs of the model's output layer for every item of `dataset`, computed once in eval mode.

    Returns a TensorDataset (features on the CPU, labels) that the head alone can train on.
    """
    import torch
    from torch.utils.data import TensorDataset

    from tunelab.data import make_loader

    head = model.get_submodule(model.head_names[0])
    captured: list = []
    hook = head.register_forward_hook(lambda module, args, output: captured.append(args[0].detach().cpu()))
    labels = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in make_loader(dataset, batch_size=batch_size, shuffle=False, seed=0):
                model(x.to(device))
                labels.append(torch.as_tensor(y))
    finally:
        hook.remove()
        model.train(was_training)
    return TensorDataset(torch.cat(captured), torch.cat(labels))


def train_mode(model: nn.Module, plan: FreezePlan) -> None:
    """`model.train()`, except BatchNorm of frozen stages stays in eval mode when `bn="eval"`."""
    model.train()
    if plan.bn == "eval":
        for stage in plan.stages[: plan.frozen]:
            for norm in stage.norms:
                norm.eval()


def param_groups(plan: FreezePlan, lr: float, layer_decay: float | None = None) -> list[dict]:
    """Optimizer param groups of the trainable stages only, each with a stable `name`.

    Without layer decay: one group "all". With `layer_decay=g`: one group per trainable stage, the
    head first at `lr` (so the `lr` metric, group 0, is the head's) and each stage k steps before
    it at `lr * g**k`.
    """
    trainable = [s for s in plan.trainable_stages if s.params]
    require(trainable, "freeze: no trainable parameters left")
    if layer_decay is None:
        return [{"name": "all", "params": [p for s in trainable for p in s.params.values()]}]
    require(0.0 < layer_decay <= 1.0, f"optimizer.layer_decay must be in (0, 1], got {layer_decay}")
    return [
        {"name": s.name, "params": list(s.params.values()), "lr": lr * lr_scale(plan, s, layer_decay)}
        for s in reversed(trainable)
    ]
