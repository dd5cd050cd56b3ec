"""Behaviour of the speed options and the logging path (no timing asserts: see benchmarks/)."""

from __future__ import annotations

import pytest
import torch

from conftest import metric_series, mlflow_runs
from tunelab import loop, models, run
from tunelab.optimizers import optimizer_factory
from tunelab.data import make_loader


def train_and_check(cfg, tracking_uri, monkeypatch) -> dict:
    """Train `cfg`; check the run finished with a finite loss at each of its 8 steps and the weights
    moved. Returns what the loop was given: the model and the first training batch."""
    seen = {}
    real = loop.fit

    def spy(model, train_loader, *args, **kwargs):
        seen["model"], seen["batch"] = model, next(iter(train_loader))
        seen["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        return real(model, train_loader, *args, **kwargs)

    monkeypatch.setattr(run, "fit", spy)
    run.train(cfg)
    client, runs = mlflow_runs(tracking_uri)
    assert runs[0].info.status == "FINISHED"
    losses = [v for _, v in metric_series(client, runs[0].info.run_id, "train/loss")]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    after = seen["model"].state_dict()
    assert any(not torch.equal(after[k], seen["before"][k]) for k in after if k.endswith("weight"))
    return seen


@pytest.mark.parametrize("options", [["trainer.precision=bf16-mixed"], ["trainer.precision=16-mixed"], ["trainer.channels_last=true"]])
def test_precision_and_channels_last_train_on_the_cpu(options, small_cfg, tracking_uri, monkeypatch):
    train_and_check(small_cfg(*options), tracking_uri, monkeypatch)


def test_every_step_metric_arrives_also_when_the_run_raises(small_cfg, tracking_uri, second_validation_fails):
    """log_every_n_steps=3 over 4+4 steps: partial batches are flushed at epoch end and at the failure."""
    with pytest.raises(RuntimeError, match="boom"):
        run.train(small_cfg("trainer.log_every_n_steps=3"))
    client, runs = mlflow_runs(tracking_uri)
    assert runs[0].info.status == "FAILED"
    for key in ("lr", "train/loss"):
        assert [s for s, _ in metric_series(client, runs[0].info.run_id, key)] == list(range(8)), key


def test_evaluation_does_not_change_the_model():
    from tunelab import data

    model = models.torchvision_model("resnet18", 10)
    model.train()
    splits = data.fake(32, [0.5] * 3, [0.5] * 3, seed=0, train_size=8, val_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = loop.evaluate(model, make_loader(splits.val, 8, False, 0), torch.nn.CrossEntropyLoss(), torch.device("cpu"))
    assert 0.0 <= metrics["val/acc"] <= 1.0
    assert model.training  # mode restored
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN buffers included


def test_in_memory_batches_are_slices_of_prepared_tensors():
    from torch.utils.data import TensorDataset

    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    loader = make_loader(TensorDataset(x, y), batch_size=4, shuffle=True, seed=3)
    loader.sampler.set_epoch(1)
    first = [b[1].tolist() for b in loader]
    loader.sampler.set_epoch(1)
    assert [b[1].tolist() for b in loader] == first  # same order for the same (seed, epoch)
    assert sorted(sum(first, [])) == list(range(10)) and [len(b) for b in first] == [4, 4, 2]


def test_data_stays_where_it_is_without_a_gpu():
    from torch.utils.data import TensorDataset

    from tunelab.data import to_device

    dataset = TensorDataset(torch.zeros(4, 1), torch.arange(4))
    assert to_device(dataset, torch.device("cpu")) is dataset
    loader = make_loader(dataset, batch_size=2, shuffle=False, seed=0, pin_memory=True)  # no CUDA: nothing to pin for
    assert [b[1].tolist() for b in loader] == [[0, 1], [2, 3]]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_in_memory_sets_are_batched_on_the_gpu_in_the_same_order():
    from torch.utils.data import TensorDataset

    from tunelab.data import to_device

    x, y = torch.randn(50, 3, 8, 8), torch.arange(50)
    on_gpu = to_device(TensorDataset(x, y), torch.device("cuda"))
    assert all(t.is_cuda for t in on_gpu.tensors)
    host = make_loader(TensorDataset(x, y), 16, True, 5)
    gpu = make_loader(on_gpu, 16, True, 5)
    for a, b in zip(host, gpu, strict=True):
        assert b[0].is_cuda and torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())
    pinned = make_loader(TensorDataset(x, y), 16, True, 5, pin_memory=True)
    assert all(b[0].is_pinned() for b in pinned)
    # a set larger than the allowed share of free memory stays on the host
    assert to_device(TensorDataset(x, y), torch.device("cuda"), share=0.0).tensors[0].device.type == "cpu"


@cuda
@pytest.mark.parametrize("options", [
    ["trainer.precision=32"], ["trainer.precision=bf16-mixed", "trainer.channels_last=true"],
    ["trainer.precision=16-mixed", "trainer.channels_last=true"], ["trainer.precision=bf16-mixed", "trainer.compile=true"],
])
def test_gpu_options_train_on_the_gpu(options, small_cfg, tracking_uri, monkeypatch):
    seen = train_and_check(small_cfg("trainer.device=cuda", *options), tracking_uri, monkeypatch)
    assert all(t.is_cuda for t in seen["batch"])  # digits moved onto the GPU once


def test_digits_are_read_and_split_without_importing_scikit_learn_once_cached(tmp_path):
    """The first run splits with scikit-learn and caches the split; later runs read the package's
    CSV and the cached split, never importing scikit-learn, and get the very same sets."""
    import os
    import subprocess
    import sys

    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    script = (
        "import sys, numpy as np\n"
        "from tunelab import data\n"
        "s = data.digits(8, [0.0] * 3, [1.0] * 3, seed=7)\n"
        "np.save(sys.argv[1], s.train.tensors[1].numpy())\n"
        "print('sklearn' in sys.modules)\n"
    )
    env = {**os.environ, "TUNELAB_CACHE": str(tmp_path / "cache")}
    imported = []
    for i in range(2):
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"y{i}.npy")], env=env, capture_output=True, text=True, check=True)
        imported.append(out.stdout.strip())
    assert imported == ["True", "False"]
    bunch = load_digits()
    rest, _ = train_test_split(np.arange(len(bunch.target)), test_size=360, random_state=0, stratify=bunch.target)  # test: split_seed 0
    train, _ = train_test_split(rest, test_size=360, random_state=7, stratify=bunch.target[rest])  # val: seed 7
    for i in range(2):
        assert np.array_equal(np.load(tmp_path / f"y{i}.npy"), bunch.target[train])


def test_a_broken_split_cache_is_computed_again(tmp_path, monkeypatch):
    import numpy as np

    from tunelab import data

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    labels = np.array([0, 1] * 10)
    first = data.stratified_split(np.arange(20), labels, 3, test_size=0.25)
    (cached,) = tmp_path.glob("split-*.npz")
    cached.write_bytes(b"not a zip file")
    again = data.stratified_split(np.arange(20), labels, 3, test_size=0.25)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert np.load(cached)["train"].tolist() == first[0].tolist()  # and written back


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_the_fused_update_is_the_per_parameter_rule(name):
    """tunelab's optimizer configs ask for torch's fused kernel; three steps of it leave the same
    weights as the per-parameter loop of `optimizer.fused=false`, to rounding."""
    from omegaconf import OmegaConf

    from conftest import ROOT

    cfg = OmegaConf.load(ROOT / "conf" / "optimizer" / f"{name}.yaml")
    assert cfg.fused is True
    torch.manual_seed(0)
    first = models.torchvision_model("resnet18", 10)
    second = models.torchvision_model("resnet18", 10)
    second.load_state_dict(first.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for model, fused in ((first, True), (second, False)):
        optimizer = optimizer_factory(OmegaConf.merge(cfg, {"fused": fused}))([{"params": list(model.parameters())}])
        assert optimizer.param_groups[0]["fused"] is fused
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for a, b in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # the same rule, summed in another order


def test_fused_gives_way_to_foreach_and_to_devices_without_the_kernel(caplog):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "fused": True})
    on_cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert not optimizer_factory(OmegaConf.merge(cfg, {"foreach": True}))(on_cpu).param_groups[0]["fused"]
    with caplog.at_level("INFO", logger="tunelab.optimizers"):
        optimizer = optimizer_factory(cfg)([torch.nn.Parameter(torch.zeros(3, device="meta"))])
    assert not optimizer.param_groups[0]["fused"]
    assert "no fused kernel here (meta)" in caplog.text


def test_a_resumed_run_uses_this_runs_update_kernel(small_cfg, tracking_uri, tmp_path, monkeypatch):
    """The checkpoint's param groups carry `fused`; resuming with optimizer.fused=false (allowed, as
    the rule is the same) must not bring the checkpoint's choice back."""
    run.train(small_cfg(f"trainer.checkpoint_dir={tmp_path}"))
    assert torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]["fused"] is True
    seen = {}
    real = loop.fit

    def spy(model, train_loader, val_loader, optimizer, *args, **kwargs):
        seen["fused"] = [group["fused"] for group in optimizer.param_groups]
        return real(model, train_loader, val_loader, optimizer, *args, **kwargs)

    monkeypatch.setattr(run, "fit", spy)
    run.train(small_cfg(f"trainer.checkpoint_dir={tmp_path}", "trainer.resume=auto", "optimizer.fused=false"))
    assert seen["fused"] == [False]


def test_sgd_with_momentum_keeps_the_loop_beside_a_grad_scaler():
    """torch's fused SGD after a first step the scaler skipped (an overflow) writes NaN weights; the
    per-parameter loop does not. Adam keeps its fused kernel."""
    from omegaconf import OmegaConf

    sgd = OmegaConf.create({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "momentum": 0.9, "fused": True})
    adam = OmegaConf.create({"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.1, "fused": True})
    param = torch.nn.Parameter(torch.ones(100_000))
    optimizer = optimizer_factory(sgd, grad_scaler=True)([param])
    assert not optimizer.param_groups[0]["fused"]
    assert optimizer_factory(adam, grad_scaler=True)([param]).param_groups[0]["fused"]
    assert optimizer_factory(sgd)([param]).param_groups[0]["fused"]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    for gradient in (float("inf"), 2.0, 2.0):
        scaler.scale(torch.tensor(1.0))
        param.grad = torch.full_like(param, gradient * scaler.get_scale())
        scaler.step(optimizer)
        scaler.update()
    assert torch.isfinite(param).all()
