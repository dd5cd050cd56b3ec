"""Every model of the subject builds, replaces its head, trains a step, and freezes by stages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import options
from tunelab import freezing, models
from tunelab.errors import ConfigError
from tunelab.loop import AUX_LOSS_WEIGHT

R = [f"features.{i}" for i in range(40)]
#: Stages of each model written out by hand from its torchvision definition: the modules (dotted
#: names) whose parameters each stage holds, stem first; the last entry is the replaced head(s).
RESNET = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"], ["fc"]]
EXPECTED = {
    "resnet18": RESNET, "resnet50": RESNET, "resnext50_32x4d": RESNET, "wide_resnet50_2": RESNET,
    "alexnet": [["features.0"], ["features.3"], ["features.6", "features.8", "features.10"], ["classifier.1", "classifier.4"], ["classifier.6"]],
    "vgg16": [R[0:5], R[5:10], R[10:17], R[17:24], R[24:31], ["classifier.0", "classifier.3"], ["classifier.6"]],
    "squeezenet1_0": [R[0:3], R[3:7], R[7:12], R[12:13], ["classifier.1"]],
    "densenet161": [
        ["features.conv0", "features.norm0"], ["features.denseblock1", "features.transition1"],
        ["features.denseblock2", "features.transition2"], ["features.denseblock3", "features.transition3"],
        ["features.denseblock4", "features.norm5"], ["classifier"],
    ],
    "inception_v3": [
        ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"], ["Conv2d_3b_1x1", "Conv2d_4a_3x3"],
        ["Mixed_5b", "Mixed_5c", "Mixed_5d"], ["Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"],
        ["Mixed_7a", "Mixed_7b", "Mixed_7c"], ["fc"],
    ],
    "inception_v3+aux": [
        ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"], ["Conv2d_3b_1x1", "Conv2d_4a_3x3"],
        ["Mixed_5b", "Mixed_5c", "Mixed_5d"],
        ["Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "AuxLogits.conv0", "AuxLogits.conv1"],
        ["Mixed_7a", "Mixed_7b", "Mixed_7c"], ["AuxLogits.fc", "fc"],
    ],
    "googlenet": [
        ["conv1"], ["conv2", "conv3"], ["inception3a", "inception3b"],
        ["inception4a", "inception4b", "inception4c", "inception4d", "inception4e"],
        ["inception5a", "inception5b", "aux1.conv", "aux1.fc1", "aux2.conv", "aux2.fc1"],
        ["aux1.fc2", "aux2.fc2", "fc"],
    ],
    "shufflenet_v2_x1_0": [["conv1"], ["stage2"], ["stage3"], ["stage4", "conv5"], ["fc"]],
    "mobilenet_v2": [R[0:2], R[2:4], R[4:7], R[7:14], R[14:19], ["classifier.1"]],
    "mobilenet_v3_large": [R[0:2], R[2:4], R[4:7], R[7:13], R[13:17], ["classifier.0"], ["classifier.3"]],
    "mobilenet_v3_small": [R[0:1], R[1:2], R[2:4], R[4:9], R[9:13], ["classifier.0"], ["classifier.3"]],
    "mnasnet1_0": [[f"layers.{i}" for i in range(8)], ["layers.8"], ["layers.9"], ["layers.10", "layers.11"],
                   [f"layers.{i}" for i in range(12, 17)], ["classifier.1"]],
}
TORCHVISION = [o for o in options("model") if o != "timm"]


def _numel(model: nn.Module, prefixes: list[str], exclude: list[str]) -> int:
    return sum(
        p.numel() for n, p in model.named_parameters()
        if any(n.startswith(f"{x}.") for x in prefixes) and not any(n.startswith(f"{x}.") for x in exclude)
    )


def test_every_torchvision_option_is_covered():
    assert sorted(k for k in EXPECTED if "+" not in k) == sorted(TORCHVISION)
    assert len(TORCHVISION) == 15


def _config(option: str) -> dict:
    from omegaconf import OmegaConf

    from conftest import CONF

    return OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{option}.yaml"))


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_model_builds_freezes_and_trains(case):
    torch.manual_seed(0)
    option, _, aux = case.partition("+")
    cfg = {**_config(option), **({"aux_logits": True} if aux else {})}
    name = cfg["name"]
    model = models.torchvision_model(name, num_classes=7, aux_logits=cfg.get("aux_logits"))
    expected = EXPECTED[case]
    heads = expected[-1]
    assert list(model.head_names) == heads
    for head in heads:
        layer = model.get_submodule(head)
        assert (layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels) == 7
    total = sum(p.numel() for p in model.parameters())
    assert sum(_numel(model, s, heads if s is not heads else []) for s in expected) == total
    n = len(expected)
    for depth in [*range(n), -1]:
        plan = freezing.freeze(model, depth)
        frozen = depth if depth >= 0 else n - 1
        want = sum(_numel(model, s, heads if s is not heads else []) for s in expected[frozen:])
        assert plan.trainable_params() == want == sum(p.numel() for p in model.parameters() if p.requires_grad), depth
    assert [len(s.params) > 0 for s in plan.stages] == [True] * n

    plan = freezing.freeze(model, -1)  # feature extraction: a step changes only the head
    size = models.input_spec(cfg).min_size
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 6])
    freezing.train_mode(model, plan)
    outputs = model(x)
    main, *aux = outputs if isinstance(outputs, tuple) else (outputs,)
    assert main.shape == (2, 7)
    loss = nn.functional.cross_entropy(main, y) + AUX_LOSS_WEIGHT * sum(nn.functional.cross_entropy(a, y) for a in aux if a is not None)
    loss.backward()
    with_grad = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(any(n == h or n.startswith(f"{h}.") for h in heads) for n in with_grad)


def test_timm_model_stages_follow_timms_grouping():
    model = models.timm_model("resnet18", num_classes=4)
    plan = freezing.freeze(model, 2)
    assert [s.name for s in plan.stages] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert model.head_names == ("fc",)
    assert plan.trainable_params() == sum(
        p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("layer2", "layer3", "layer4", "fc")
    )
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_timm_unknown_name_suggests_close_ones():
    with pytest.raises(ConfigError, match=r"model.name=resnet_18 .*resnet18"):
        models.timm_model("resnet_18", num_classes=4)


def test_depth_too_large_lists_the_stage_names():
    model = models.torchvision_model("resnet18", num_classes=4)
    with pytest.raises(ConfigError, match=r"freeze.depth=6 .*6 stages .*1=stem, 2=layer1.*6=head"):
        freezing.freeze(model, 6)


def test_weights_path_roundtrip_gives_identical_outputs(tmp_path):
    source = models.torchvision_model("resnet18", num_classes=4).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    loaded = models.torchvision_model("resnet18", num_classes=4, weights_path=str(path)).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(source(x), loaded(x))


def test_weights_of_another_class_count_keep_the_new_head(tmp_path):
    imagenet_like = models.torchvision_model("resnet18", num_classes=1000)
    path = tmp_path / "imagenet.pth"
    torch.save(imagenet_like.state_dict(), path)
    model = models.torchvision_model("resnet18", num_classes=4, weights_path=str(path))
    assert torch.equal(model.layer4[1].conv2.weight, imagenet_like.layer4[1].conv2.weight)
    assert model.fc.out_features == 4


def test_weights_of_another_architecture_name_the_keys(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(models.torchvision_model("mobilenet_v2", num_classes=4).state_dict(), path)
    with pytest.raises(ConfigError, match=r"weights_path=.*mobilenet\.pth.*missing keys: conv1\.weight.*unexpected keys: features\.0\.0\.weight"):
        models.torchvision_model("resnet18", num_classes=4, weights_path=str(path))


@pytest.mark.parametrize("kind,message", [
    ("random bytes", r"not a torch file: neither a torch\.save archive nor a pickle of tensors$"),
    ("text", r"not a torch file"),
    ("whole model", r"holds a pickled torchvision\.models\.resnet\.ResNet object, not a state dict.*model\.state_dict\(\)"),
    ("cut short", r"a damaged torch archive"),
])
def test_unreadable_weights_file_says_what_it_is_in_one_sentence(kind, message, tmp_path):
    path = tmp_path / "weights.pth"
    if kind == "random bytes":
        path.write_bytes(bytes(range(256)) * 20)
    elif kind == "text":
        path.write_text("hello\n")
    else:
        torch.save(models.torchvision_model("resnet18", num_classes=4), path)
        if kind == "cut short":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match=message) as caught:
        models.torchvision_model("resnet18", num_classes=4, weights_path=str(path))
    assert "\n" not in str(caught.value) and "weights_only` set to `False`" not in str(caught.value)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model.weights_path=.*nope\.pth: no such file"):
        models.torchvision_model("resnet18", num_classes=4, weights_path=str(tmp_path / "nope.pth"))


def test_pretrained_loads_torchvisions_cached_weights_offline(tmp_path, monkeypatch):
    """A weights file in the torch hub cache is what model.pretrained=true uses, no network needed."""
    from torchvision.models import get_model_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = get_model_weights("resnet18").DEFAULT
    reference = models.torchvision_model("resnet18", num_classes=1000)
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoints / weights.url.rsplit("/", 1)[-1])
    model = models.torchvision_model("resnet18", num_classes=4, pretrained=True)
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    spec = models.input_spec({"name": "resnet18", "pretrained": True})
    assert spec.mean == tuple(weights.transforms().mean)


def test_pretrained_offline_without_cache_says_where_to_put_weights(tmp_path, monkeypatch):
    import urllib.error

    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError, match=rf"{tmp_path}/hub/checkpoints.*model.weights_path="):
        models.torchvision_model("resnet18", num_classes=4, pretrained=True)


def test_timm_pretrained_offline_without_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path), raising=False)
    with pytest.raises(ConfigError, match=r"model.pretrained=true: timm's weights for resnet18 .*model.weights_path="):
        models.timm_model("resnet18", num_classes=4, pretrained=True)
