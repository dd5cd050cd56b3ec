"""A catalogue of bad inputs: each ends with a short message naming the key or file, exit code != 0,
no traceback, and no MLflow run left RUNNING."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from conftest import SMALL, mlflow_runs, run_train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image(path, color=(200, 30, 30)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), color).save(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    photos = root / "photos"  # class "b" has no images in train/
    _image(photos / "train" / "a" / "1.png")
    (photos / "train" / "b").mkdir(parents=True)
    _image(photos / "val" / "a" / "1.png")
    _image(photos / "val" / "b" / "1.png")
    from tunelab import models

    torch.save(models.torchvision_model("mobilenet_v2", 10).state_dict(), root / "mobilenet_v2.pth")
    return root


CATALOGUE = {
    "unknown model": (["model=resnet19"], "model", 1),
    "unknown scheduler": (["scheduler=cosinus"], "scheduler", 1),
    "unknown optimizer": (["optimizer=adamax"], "optimizer", 1),
    "unknown freeze": (["freeze=all"], "freeze", 1),
    "unknown data": (["data=mnist"], "data", 1),
    "unknown trainer": (["trainer=fast"], "trainer", 1),
    "unknown logger": (["logger=wandb"], "logger", 1),
    "unknown key": (["optimizer.lrr=0.1"], "optimizer.lrr", 1),
    "wrong type": (["optimizer.lr=abc"], "optimizer.lr", 2),
    "lr <= 0": (["optimizer.lr=0"], "optimizer.lr", 2),
    "no epochs": (["trainer.max_epochs=0"], "trainer.max_epochs", 2),
    "missing data folder": (["data=folder", "data.dataset.root={root}/nowhere"], "nowhere", 2),
    "class without images": (["data=folder", "data.dataset.root={root}/photos", "data.image_size=32"], "b", 2),
    "CIFAR-10 not on disk (no download here)": (["data=cifar10", "data.dataset.root={root}/nocifar"], "no intact CIFAR-10", 2),
    "missing weights file": (["model.weights_path={root}/missing.pth"], "missing.pth", 2),
    "weights of another architecture": (["model.weights_path={root}/mobilenet_v2.pth"], "mobilenet_v2.pth", 2),
    "freeze depth too large": (["freeze.depth=9"], "freeze.depth=9", 2),
    "cuda without a GPU": (["trainer.device=cuda"], "trainer.device=cuda", 2),
    "scheduler key its class does not take": (["+scheduler.gamma=0.5"], "scheduler", 2),
    "optimizer value its class rejects": (["optimizer.weight_decay=-1"], "optimizer: could not build torch.optim.SGD", 2),
    "optimizer key its class does not take": (["+optimizer.betas=[0.9,0.99]"], "optimizer: could not build torch.optim.SGD", 2),
    "unreachable tracking server": (["logger.tracking_uri=http://127.0.0.1:{port}"], "127.0.0.1", 2),
    "in_process not a boolean": (["logger.in_process=maybe"], "logger.in_process", 2),
    "resume path that does not exist": (["trainer.resume={root}/runs/none/last.pt"], "trainer.resume", 2),
    "warmup longer than the run": (["scheduler.warmup_epochs=3", "trainer.max_epochs=2"], "scheduler.warmup_epochs", 2),
    "EMA decay of 1": (["trainer.ema_decay=1"], "trainer.ema_decay", 2),
    "fold outside the folds": (["data.folds=5", "data.fold=5"], "data.fold=5", 2),
    "early stopping without patience": (["trainer.early_stopping.patience=-1"], "trainer.early_stopping.patience", 2),
    "early stopping with a patience of 0": (["trainer.early_stopping.patience=0"], "trainer.early_stopping.patience", 2),
    "negative unfreeze_every": (["freeze.depth=2", "freeze.unfreeze_every=-1"], "freeze.unfreeze_every", 2),
    "fractional unfreeze_every": (["freeze.depth=2", "freeze.unfreeze_every=1.5"], "freeze.unfreeze_every", 2),
    "negative num_workers": (["data.num_workers=-1"], "data.num_workers", 2),
    "fused not a boolean": (["optimizer.fused=yes please"], "optimizer.fused", 2),
    "unknown keep_checkpoints": (["trainer.keep_checkpoints=last"], "trainer.keep_checkpoints", 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input(case, files, tmp_path):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    overrides, named, code = CATALOGUE[case]
    overrides = [o.format(root=files, port=_free_port()) for o in overrides]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri} if "tracking_uri" not in " ".join(overrides) else {"MLFLOW_TRACKING_URI": ""}
    proc = run_train([*SMALL, *overrides], cwd=tmp_path, env=env, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, output[-2000:]
    assert named in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in output
    if code == 2:  # tunelab's own message (Hydra's errors are Hydra's): once on the terminal, and in the job's log file
        message = next(line for line in proc.stderr.splitlines() if line.startswith("Error: "))
        assert output.count(message) == 1
    if (tmp_path / "mlflow.db").exists():
        _, runs = mlflow_runs(uri)
        assert all(r.info.status != "RUNNING" for r in runs)


def test_a_bad_value_is_reported_before_torch_is_imported(tmp_path):
    """The config's values are checked before train.py imports torch (3-4 s of a run's start): a
    `torch` that cannot be imported stands in for the real one, and the bad value is still named."""
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("torch was imported before the config was checked")\n')
    env = {"PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = run_train(["optimizer.lr=0", "trainer.device=cpu"], cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Error: optimizer.lr=0 must be > 0" in proc.stderr
    assert "torch was imported" not in proc.stdout + proc.stderr
