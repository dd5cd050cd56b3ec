"""model.drop_rate and model.drop_path_rate reach the model, and keep the feature cache honest."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import compose_config
from tunelab import freezing
from tunelab.errors import ConfigError, build


def _model(*overrides: str) -> nn.Module:
    cfg = compose_config(list(overrides), "sqlite://")
    return build(cfg.model, "model", num_classes=3)  # as the run builds it


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "alexnet", "squeezenet1_0", "inception_v3"])
def test_drop_rate_sets_a_torchvision_models_dropout(name):
    model = _model(f"model={name}", "model.drop_rate=0.35")
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.35}


def test_drop_rate_is_densenets_drop_rate_and_blocks_the_feature_cache():
    model = _model("model=densenet161", "model.drop_rate=0.2")
    assert {m.drop_rate for m in model.modules() if hasattr(m, "drop_rate")} == {0.2}
    plan = freezing.freeze(model, -1)
    assert "0.2" in freezing.feature_cache_blocker(model, plan, True, 0)


def test_a_model_without_dropout_refuses_drop_rate():
    with pytest.raises(ConfigError, match=r"model\.drop_rate: resnet18 has no dropout"):
        _model("model=resnet18", "model.drop_rate=0.3")


def test_drop_rate_zero_lets_mobilenet_cache_its_features():
    model = _model("model=mobilenet_v3_small", "model.drop_rate=0")
    plan = freezing.freeze(model, -1)
    assert freezing.feature_cache_blocker(model, plan, True, 0) is None
    assert "dropout" in freezing.feature_cache_blocker(_model("model=mobilenet_v3_small"), freezing.freeze(_model("model=mobilenet_v3_small"), -1), True, 0)


def test_timm_drop_path_rate_is_stochastic_depth_rising_with_depth():
    model = _model("model=timm", "model.name=resnet18", "model.drop_path_rate=0.2", "model.drop_rate=0.1")
    probs = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert len(probs) == 7 and probs == sorted(probs) and probs[-1] == pytest.approx(0.2) and probs[0] < 0.2
    assert model.drop_rate == 0.1
    model.train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.equal(a, model(x))  # blocks are skipped at random in training
    model.eval()
    assert torch.equal(model(x), model(x))
    blocker = freezing.feature_cache_blocker(model, freezing.freeze(model, -1), True, 0)
    assert blocker is not None and "stochastic depth" in blocker


@pytest.mark.parametrize("key", ["drop_rate", "drop_path_rate"])
def test_a_rate_outside_0_1_names_the_key(key):
    with pytest.raises(ConfigError, match=rf"model\.{key}"):
        _model("model=timm", "model.name=resnet18", f"model.{key}=1.5")
