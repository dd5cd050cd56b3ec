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


@dataclass
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


def stages(model: nn.Module) -> list[Stage]:
    """The model's stages from the stem to `head` (see the module docstring for the rule)."""
    heads = tuple(getattr(model, "head_names", ()))
    require(heads, f"{type(model).__name__} has no replaced output layer (build it with tunelab.models)")
    head_prefixes = tuple(f"{h}." for h in heads)

    def own_params(path: str, module: nn.Module) -> dict[str, nn.Parameter]:
        named = ((f"{path}.{n}", p) for n, p in module.named_parameters())
        return {n: p for n, p in named if not n.startswith(head_prefixes)}

    def norms(path: str, module: nn.Module) -> list[_BatchNorm]:
        return [m for n, m in module.named_modules() if isinstance(m, _BatchNorm) and not f"{path}.{n}".startswith(head_prefixes)]

    groups: list[list[tuple[str, nn.Module]]] = []
    current: list[tuple[str, nn.Module]] = []
    classifier: list[tuple[str, nn.Module]] = []

    def close() -> None:
        nonlocal current
        if current:
            groups.append(current)
        current = []

    for path, unit in _units(model):
        if path in heads:
            continue
        if path in _CLASSIFIERS:
            if own_params(path, unit):
                classifier.append((path, unit))
            continue
        if _strided(unit, (nn.Conv2d,)) and any(own_params(p, u) for p, u in current):
            close()
        current.append((path, unit))
        if not _strided(unit, (nn.Conv2d,)) and _strided(unit, _POOLS):
            close()
    close()
    groups = [g for g in groups if any(own_params(p, u) for p, u in g)]

    result = []
    for i, group in enumerate(groups):
        named = [path for path, unit in group if own_params(path, unit)]
        name = "stem" if i == 0 else _span_name(named[0], named[-1])
        stage = Stage(name)
        for path, unit in group:
            stage.params.update(own_params(path, unit))
            stage.norms.extend(norms(path, unit))
        result.append(stage)
    if classifier:
        stage = Stage("classifier")
        for path, unit in classifier:
            stage.params.update(own_params(path, unit))
            stage.norms.extend(norms(path, unit))
        result.append(stage)
    head = Stage("head")
    for name in heads:
        module = model.get_submodule(name)
        head.params.update({f"{name}.{n}": p for n, p in module.named_parameters()})
    result.append(head)

    covered = {id(p) for s in result for p in s.params.values()}
    leftover = [n for n, p in model.named_parameters() if id(p) not in covered]
    if leftover:  # parameters outside the walked children (rare): they belong to the stem
        named = dict(model.named_parameters())
        result[0].params.update({n: named[n] for n in leftover})
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
    last = len(plan.stages) - 1
    index = {id(s): i for i, s in enumerate(plan.stages)}
    return [
        {"name": s.name, "params": list(s.params.values()), "lr": lr * layer_decay ** (last - index[id(s)])}
        for s in reversed(trainable)
    ]
