"""Build a classifier: a zoo model with its output layer replaced for the data set's classes.

Config options name a torchvision (or timm) model; `hydra.utils.instantiate` calls the builders
below with `num_classes` supplied by the run. Each built model carries `head_names`, the dotted
names of the layers that were replaced (the main output layer last), which freezing relies on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from tunelab.errors import ConfigError, require

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Smallest square input each torchvision model accepts (the rest take 32 px).
_MIN_SIZE = {"inception_v3": 75, "alexnet": 63}
#: Inception v3's auxiliary head pools a 17x17 map: with it the model needs 299 px inputs.
_INCEPTION_AUX_MIN_SIZE = 299
#: Models with auxiliary heads (used in training only), switched by `aux_logits`.
_AUX_MODELS = ("inception_v3", "googlenet")


def _min_size(model_cfg: Mapping[str, Any]) -> int:
    name = model_cfg["name"]
    if name == "inception_v3" and model_cfg.get("aux_logits"):
        return _INCEPTION_AUX_MIN_SIZE
    return _MIN_SIZE.get(name, _DEFAULT_MIN_SIZE)
_DEFAULT_MIN_SIZE = 32


@dataclass(frozen=True)
class InputSpec:
    """What the data needs to know about a model before it is built."""

    min_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def input_spec(model_cfg: Mapping[str, Any]) -> InputSpec:
    """The minimum input size and the normalization the model expects (its weights' when pretrained)."""
    name = model_cfg["name"]
    if model_cfg.get("_target_") == "tunelab.models.timm_model":
        cfg = _timm_pretrained_cfg(name)
        size = cfg.get("input_size", (3, 224, 224))[-1] if cfg.get("fixed_input_size") else _DEFAULT_MIN_SIZE
        if model_cfg.get("pretrained"):
            return InputSpec(size, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))
        return InputSpec(size, IMAGENET_MEAN, IMAGENET_STD)
    if model_cfg.get("pretrained"):
        from torchvision.models import get_model_weights

        transforms = get_model_weights(name).DEFAULT.transforms()
        return InputSpec(_min_size(model_cfg), tuple(transforms.mean), tuple(transforms.std))
    return InputSpec(_min_size(model_cfg), IMAGENET_MEAN, IMAGENET_STD)


#: The constructor argument that is `model.drop_rate` for the torchvision families that call it otherwise.
_DROP_ARGUMENT = {"densenet": "drop_rate"}


def _check_rate(key: str, value: Any) -> None:
    """A dropout or stochastic-depth rate: a probability in [0, 1)."""
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1, f"model.{key}={value!r} must be a probability in [0, 1)")


def _drop_kwargs(name: str, drop_rate: float | None) -> dict[str, Any]:
    """`model.drop_rate` as the torchvision constructor's argument (`dropout`, DenseNet's `drop_rate`)."""
    if drop_rate is None:
        return {}
    _check_rate("drop_rate", drop_rate)
    family = next((f for f in _DROP_ARGUMENT if name.startswith(f)), None)
    return {_DROP_ARGUMENT[family] if family else "dropout": float(drop_rate)}


def torchvision_model(
    name: str, num_classes: int, pretrained: bool = False, weights_path: str | None = None, aux_logits: bool | None = None,
    drop_rate: float | None = None,
) -> nn.Module:
    """A torchvision model (`torchvision.models.get_model`) with a new `num_classes` output layer.

    `pretrained=True` asks torchvision for `weights="DEFAULT"` (from its cache, or downloaded);
    `weights_path` loads a state dict from a file afterwards (see `load_weights`). `aux_logits`
    keeps (True) or drops (False) the auxiliary heads of Inception v3 and GoogLeNet. `drop_rate`
    sets the model's dropout probability where it has one (its `dropout` argument; DenseNet's
    `drop_rate`); a model without one (ResNets, ShuffleNet) refuses it.
    """
    import inspect

    from torchvision import models as tvm

    available = tvm.list_models(module=tvm)
    require(name in available, f"model.name={name} is not a torchvision classification model; choose one of: {', '.join(available)}")
    kwargs: dict[str, Any] = _drop_kwargs(name, drop_rate)
    if kwargs:
        builder = tvm.get_model_builder(name)
        model_class = inspect.signature(builder).return_annotation
        takes = inspect.signature(getattr(tvm, model_class) if isinstance(model_class, str) else model_class).parameters
        require(set(kwargs) <= set(takes), f"model.drop_rate: {name} has no dropout to set (its arguments: {', '.join(takes)}); leave model.drop_rate=null")
    if name in _AUX_MODELS:
        kwargs["aux_logits"] = True if aux_logits is None else bool(aux_logits)
        if not pretrained:
            kwargs["init_weights"] = True
    try:
        model = tvm.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    except (OSError, RuntimeError) as err:  # URLError is an OSError: offline with nothing cached
        if not pretrained:
            raise
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise ConfigError(
            f"model.pretrained=true: torchvision's weights for {name} are not in {cache} and could not be "
            f"downloaded ({err}). Copy the .pth file into {cache}, or download it elsewhere and pass "
            f"model.weights_path=/path/to/file.pth with model.pretrained=false."
        ) from None
    model.head_names = replace_heads(model, num_classes)
    if weights_path:
        load_weights(model, weights_path)
    return model


def _timm_pretrained_cfg(name: str) -> dict:
    """timm's default pretrained config of a model name (no weights fetched); checks the name."""
    import timm

    require(isinstance(name, str) and name, "model.name must name a timm model, e.g. model.name=resnet18")
    if not timm.is_model(name.split(".")[0]):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; list them with python -c 'import timm; print(timm.list_models())'"
        raise ConfigError(f"model.name={name} is not a timm model{hint}")
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def timm_model(name: str, num_classes: int, pretrained: bool = False, weights_path: str | None = None, drop_rate: float | None = None,
               drop_path_rate: float | None = None) -> nn.Module:
    """Any timm model (`timm.create_model`), its classifier reset to `num_classes` outputs.

    `pretrained=True` asks timm for its default weights (the Hugging Face cache, or downloaded).
    `drop_rate` (dropout before the classifier) and `drop_path_rate` (stochastic depth: the largest
    probability of skipping a residual block, rising linearly with depth) go to timm's model; null
    keeps its default.
    """
    import timm

    _timm_pretrained_cfg(name)
    rates = {key: value for key, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)) if value is not None}
    for key, value in rates.items():
        _check_rate(key, value)
    try:
        model = timm.create_model(name, pretrained=pretrained, **rates)
    except TypeError as err:  # a model class without that argument
        raise ConfigError(f"model: timm's {name} does not take {', '.join(f'model.{k}' for k in rates)} ({err}); leave it null") from None
    except Exception as err:
        if not pretrained:
            raise
        from huggingface_hub.constants import HF_HUB_CACHE

        raise ConfigError(
            f"model.pretrained=true: timm's weights for {name} are not in the Hugging Face cache {HF_HUB_CACHE} "
            f"and could not be downloaded ({str(err).splitlines()[0][:200]}). Copy them there (HF_HOME moves it), "
            f"or download the state dict elsewhere and pass model.weights_path=/path/to/file with model.pretrained=false."
        ) from None
    model.reset_classifier(num_classes)
    head = model.get_classifier()
    names = [n for n, m in model.named_modules() if m is head]
    require(bool(names) and any(True for _ in head.parameters()), f"timm model {name} has no classifier layer to replace")
    model.head_names = (names[0],)
    if weights_path:
        load_weights(model, weights_path)
    return model


def _output_layers(model: nn.Module) -> list[str]:
    """Dotted names of the layers that produce class scores: the last Linear/Conv2d and its twins.

    The main output layer is the last Linear or Conv2d registered (a ResNet's `fc`, VGG's
    `classifier.6`, SqueezeNet's final 1x1 conv); auxiliary heads (Inception, GoogLeNet) are the
    other layers of that type with the same number of outputs.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    main_name, main = layers[-1]
    out = main.out_features if isinstance(main, nn.Linear) else main.out_channels
    twins = [
        n for n, m in layers[:-1]
        if type(m) is type(main) and (m.out_features if isinstance(m, nn.Linear) else m.out_channels) == out
        and (isinstance(m, nn.Linear) or m.kernel_size == (1, 1))
    ]
    return [*twins, main_name]


def replace_heads(model: nn.Module, num_classes: int) -> tuple[str, ...]:
    """Replace every output layer (main and auxiliary) by a fresh one with `num_classes` outputs."""
    require(num_classes >= 2, f"the data set must have at least 2 classes, got {num_classes}")
    names = _output_layers(model)
    for name in names:
        old = model.get_submodule(name)
        if isinstance(old, nn.Linear):
            new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        else:
            new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return tuple(names)


def _unreadable(err: Exception) -> str:
    """What a failed `torch.load(weights_only=True)` says about the file, in one sentence (torch's
    own text is a page long and suggests turning the safe loading off)."""
    import re

    text = str(err)
    pickled = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if pickled:
        return (f"holds a pickled {pickled.group(1)} object, not a state dict; tunelab loads tensors only (the safe "
                "torch.load(weights_only=True)). Save the weights with torch.save(model.state_dict(), path)")
    if "central directory" in text or "PytorchStreamReader" in text:
        return "a damaged torch archive (cut short or changed after it was saved); save or download it again"
    if "WeightsUnpickler" in text or isinstance(err, (KeyError, EOFError)) or type(err).__name__ == "UnpicklingError":
        return "not a torch file: neither a torch.save archive nor a pickle of tensors"
    return f"not a readable torch state dict ({text.splitlines()[0][:300] if text else type(err).__name__})"


def weights_file(path: str | Path) -> Path:
    """`model.weights_path` as a path, or ConfigError when there is no such file."""
    file = Path(str(path)).expanduser()
    require(file.is_file(), f"model.weights_path={path}: no such file")
    return file


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict from `path` (`torch.load(weights_only=True)`) into `model`.

    The output layers are loaded only when their shapes match (a tunelab checkpoint for the same
    classes); a file made for other classes (ImageNet's 1000) leaves the new head as it is.
    A tunelab checkpoint (a dict with a "model" entry) works too. Any other missing, unexpected or
    mis-shaped key is an error naming the keys.
    """
    file = weights_file(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"model.weights_path={path}: {_unreadable(err)}") from None
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    require(isinstance(state, Mapping), f"model.weights_path={path}: expected a state dict, got {type(state).__name__}")
    own = model.state_dict()
    heads = tuple(f"{h}." for h in getattr(model, "head_names", ()))
    skipped = [k for k in state if k.startswith(heads) and k in own and state[k].shape != own[k].shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = [k for k in own if k not in state and not k.startswith(heads)]
    # keys of an auxiliary head this model was built without (torchvision sets it to None)
    unexpected = [k for k in state if k not in own and getattr(model, k.split(".")[0], model) is not None]
    state = {k: v for k, v in state.items() if k in own}
    mismatched = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})" for k in state if k in own and state[k].shape != own[k].shape]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label}: {shown}")
    require(not problems, f"model.weights_path={path} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
    log.info("Loaded %d tensors from %s%s", len(state), file, f" (kept the new head; skipped {len(skipped)} head tensors)" if skipped else "")
