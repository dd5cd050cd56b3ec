"""From a trained model to its use: what the model carries, evaluate, predict, the pyfunc model and
MLflow's model server."""

from __future__ import annotations

import base64
import csv
import io
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, SERVER_ENV, SMALL, free_port, mlflow_command, mlflow_runs, run_train, stop
from tunelab import evaluate, models, predict
from tunelab.data import digits_arrays, image_folder
from tunelab.inference import INFO_KEY, ModelInfo, decode
from tunelab.tracking.upload import fluent_api_at


def _cli(module: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = {**os.environ, **SERVER_ENV, **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One short digits run that logs its model: (folder, tracking URI, run, its best.pt)."""
    folder = tmp_path_factory.mktemp("digits_run")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    proc = run_train([*SMALL, "model=resnet18", "trainer.max_epochs=2", "trainer.limit_train_batches=8",
                      "trainer.limit_val_batches=null", f"hydra.run.dir={folder / 'run'}"], cwd=folder, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = mlflow_runs(uri)
    assert len(runs) == 1
    return folder, uri, runs[0], folder / "run" / "best.pt", proc


def _digit_images(count: int) -> list[np.ndarray]:
    """Digits as the uint8 8x8 grey images a user would have (0-16 scaled to 0-255)."""
    pixels, _ = digits_arrays()
    return [np.round(pixels[i] * 255 / 16).astype(np.uint8) for i in range(count)]


def test_the_logged_model_and_the_checkpoints_carry_classes_and_preprocessing(digits_run):
    from mlflow.models import Model

    folder, uri, run, best, proc = digits_run
    import mlflow

    with fluent_api_at(uri):
        local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model")
    model = Model.load(local)
    info = ModelInfo.from_dict(model.metadata[INFO_KEY])
    assert info.classes == [str(d) for d in range(10)] and info.image_size == 32 and info.resize == "square"
    assert info.mean == models.IMAGENET_MEAN and info.model_config["name"] == "resnet18" and info.data == "digits"
    assert model.flavors["python_function"]["loader_module"] == "tunelab.serving"
    assert "pytorch" in model.flavors
    assert [c.name for c in model.signature.outputs.inputs][:3] == ["class", "probability", "prob_0"]
    saved = torch.load(best, weights_only=True)
    assert ModelInfo.from_dict(saved["model_info"]) == info
    # the run's last lines: the UI command and the link into MLflow's training view
    assert "mlflow ui --backend-store-uri" in proc.stdout
    assert f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning" in proc.stdout


def test_evaluate_on_the_runs_own_test_split_equals_its_test_metrics(digits_run, tmp_path):
    folder, uri, run, best, _ = digits_run
    code = evaluate.main(["--run", run.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "eval")])
    assert code == 0
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    metrics = client.get_run(run.info.run_id).data.metrics
    for key in ("acc", "balanced_acc", "macro_f1"):
        assert metrics[f"eval/test/{key}"] == pytest.approx(metrics[f"test/{key}"], abs=1e-9)
    assert metrics["eval/test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-4)
    assert {"eval/test/per_class.csv", "eval/test/confusion_matrix.png", "eval/test/top_losses.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "eval/test")}
    with open(tmp_path / "eval" / "per_class.csv") as f:
        assert sum(int(row["support"]) for row in csv.DictReader(f)) == 360  # digits' test split: 20 % of 1,797

    # the same weights from best.pt, into a new evaluation run that names its source
    code = evaluate.main(["--checkpoint", str(best), "--tracking-uri", uri, "--new-run", "--out", str(tmp_path / "ckpt")])
    assert code == 0
    _, runs = mlflow_runs(uri)
    evaluation = [r for r in runs if r.data.tags.get("tunelab.kind") == "evaluation"][-1]
    assert evaluation.data.tags["tunelab.source_run"] == run.info.run_id
    assert evaluation.data.metrics["eval/test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-9)


def test_predict_the_pyfunc_model_and_the_model_agree(digits_run, tmp_path):
    import mlflow

    folder, uri, run, best, _ = digits_run
    images = _digit_images(12)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"digit{i:02d}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "preds.csv"
    proc = _cli("tunelab.predict", f"runs:/{run.info.run_id}/model", str(tmp_path), "--out", str(out), "--top-k", "3",
                cwd=folder, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 1, proc.stderr[-2000:]  # one file could not be read: listed, the rest classified
    assert "broken.png" in proc.stderr and "Skipped 1" in proc.stderr
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == [f"digit{i:02d}.png" for i in range(12)]

    # the model itself on the validation preprocessing of the same images
    saved = torch.load(best, weights_only=True)
    info = ModelInfo.from_dict(saved["model_info"])
    model = models.torchvision_model("resnet18", 10)
    model.load_state_dict(saved["model"])
    model.eval()
    with torch.no_grad():
        expected = model(torch.stack([info.transform(Image.fromarray(image)) for image in images])).softmax(1)
    top = expected.max(1)
    assert [r["class"] for r in rows] == [info.classes[i] for i in top.indices.tolist()]
    assert [float(r["probability"]) for r in rows] == pytest.approx(top.values.tolist(), abs=1e-5)

    # the pyfunc model: uint8 arrays, encoded bytes and base64 text give the same answer
    with fluent_api_at(uri):
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    from_arrays = pyfunc.predict(np.stack([np.repeat(i[..., None], 3, axis=2) for i in images]))
    encoded = [(tmp_path / f"digit{i:02d}.png").read_bytes() for i in range(12)]
    import pandas as pd

    from_bytes = pyfunc.predict(pd.DataFrame({"image": encoded}))
    from_text = pyfunc.predict(pd.DataFrame({"image": [base64.b64encode(b).decode() for b in encoded]}))
    for answer in (from_arrays, from_bytes, from_text):
        assert list(answer["class"]) == [r["class"] for r in rows]
        assert answer["probability"].tolist() == pytest.approx(top.values.tolist(), abs=1e-5)
        assert answer[[f"prob_{c}" for c in info.classes]].to_numpy().sum(1) == pytest.approx(np.ones(12), abs=1e-5)


def _class_folders(root: Path, classes: dict[str, tuple[int, int, int]], per_class: int = 6) -> None:
    rng = np.random.default_rng(0)
    for name, colour in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-40, 40, (30 + 3 * i, 44, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=90)


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_predict_on_files_is_the_models_softmax_on_the_validation_preprocessing(kind, tmp_path):
    """Folder data: the preprocessing of predict equals the validation split's, and predict gives
    the argmax and softmax of the model on it, with the class names."""
    root = tmp_path / "photos"
    _class_folders(root, {"cat": (200, 60, 60), "dog": (60, 200, 60), "owl": (60, 60, 200)})
    torch.manual_seed(0)
    model = models.torchvision_model("mobilenet_v3_small", 3) if kind == "torchvision" else models.timm_model("resnet18", 3)
    model.eval()
    config = {"_target_": f"tunelab.models.{kind}_model", "name": "mobilenet_v3_small" if kind == "torchvision" else "resnet18"}
    splits = image_folder(str(root), 48, models.IMAGENET_MEAN, models.IMAGENET_STD, seed=0)
    info = ModelInfo(splits.classes, 48, models.IMAGENET_MEAN, models.IMAGENET_STD, "shorter_side", config, "image_folder")
    checkpoint = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "model_info": info.to_dict(), "config": {}}, checkpoint)

    paths = [Path(p) for p, _ in splits.val.samples]
    val = torch.stack([splits.val[i][0] for i in range(len(paths))])
    assert torch.equal(torch.stack([info.transform(decode(p)) for p in paths]), val)  # bit for bit
    with torch.no_grad():
        expected = model(val).softmax(1)
    out = tmp_path / "preds.csv"
    assert predict.main([str(checkpoint), *map(str, paths), "--out", str(out), "--top-k", "2", "--device", "cpu", "--quiet"]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]) for r in rows] == paths
    assert [r["class"] for r in rows] == [splits.classes[i] for i in expected.argmax(1).tolist()]
    assert [float(r["probability"]) for r in rows] == pytest.approx(expected.max(1).values.tolist(), abs=1e-5)
    assert all(len(r["top_k"].split(";")) == 2 for r in rows)


def test_evaluate_matches_classes_by_name_and_refuses_unknown_ones(digits_run, tmp_path, capsys):
    folder, uri, run, best, _ = digits_run
    # a folder of two of the model's classes, in another order: scored, classes matched by name
    images = _digit_images(200)
    _, labels = digits_arrays()
    root = tmp_path / "some_digits"
    for i, image in enumerate(images):
        if labels[i] in (3, 7):
            (root / str(labels[i])).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / str(labels[i]) / f"{i}.png")
    code = evaluate.main(["--run", run.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "e"), "--new-run",
                          "data=folder", f"data.dataset.root={root}", "data.dataset.test_fraction=0.5", "data.dataset.val_fraction=0.25"])
    assert code == 0, capsys.readouterr().err
    assert "eval/folder/acc" in mlflow_runs(uri)[1][-1].data.metrics
    # a class the model does not know
    (root / "seven").mkdir()
    for i in range(5):
        Image.fromarray(images[i]).save(root / "seven" / f"{i}.png")
    code = evaluate.main(["--run", run.info.run_id, "--tracking-uri", uri, "data=folder", f"data.dataset.root={root}"])
    err = capsys.readouterr().err
    assert code == 2 and "classes the model was not trained on: seven" in err and "Traceback" not in err


def test_a_csv_data_set_evaluates_as_predict_classifies_it(digits_run, tmp_path):
    """evaluate on `data=csv` (a split column) scores the test rows as predict classifies their files."""
    folder, uri, run, best, _ = digits_run
    images = _digit_images(300)
    _, labels = digits_arrays()
    rows = []
    for i, image in enumerate(images):
        if labels[i] in (1, 4):
            Image.fromarray(image).save(tmp_path / f"{i}.png")
            rows.append((f"{i}.png", str(labels[i]), ("train", "val", "test")[i % 3]))
    (tmp_path / "labels.csv").write_text("path,label,split\n" + "".join(",".join(r) + "\n" for r in rows))
    code = evaluate.main(["--run", run.info.run_id, "--tracking-uri", uri, "--new-run", "--out", str(tmp_path / "e"),
                          "data=csv", f"data.dataset.path={tmp_path / 'labels.csv'}"])
    assert code == 0
    scored = mlflow_runs(uri)[1][-1].data.metrics["eval/csv/acc"]
    test_rows = [r for r in rows if r[2] == "test"]
    out = tmp_path / "preds.csv"
    assert predict.main([f"runs:/{run.info.run_id}/model", *(str(tmp_path / r[0]) for r in test_rows), "--out", str(out),
                         "--tracking-uri", uri, "--quiet", "--device", "cpu"]) == 0
    with open(out) as f:
        predicted = [row["class"] for row in csv.DictReader(f)]
    assert scored == pytest.approx(np.mean([p == r[1] for p, r in zip(predicted, test_rows)]), abs=1e-12)
    # without a split column: the rows are split three ways (the test rows by data.split_seed), then scored
    (tmp_path / "unsplit.csv").write_text("path,label\n" + "".join(f"{r[0]},{r[1]}\n" for r in rows))
    code = evaluate.main(["--run", run.info.run_id, "--tracking-uri", uri, "--new-run", "--out", str(tmp_path / "u"),
                          "data=csv", f"data.dataset.path={tmp_path / 'unsplit.csv'}"])
    assert code == 0
    with open(tmp_path / "u" / "per_class.csv") as f:
        supports = {row["class"]: int(row["support"]) for row in csv.DictReader(f)}
    from tunelab.data import csv_images

    expected = csv_images(str(tmp_path / "unsplit.csv"), 32, models.IMAGENET_MEAN, models.IMAGENET_STD, seed=0).test
    assert sum(supports.values()) == len(expected) < len(rows) and supports["1"] > 0 and supports["4"] > 0


def test_predict_and_evaluate_refuse_bad_input_in_one_paragraph(tmp_path, capsys):
    assert predict.main([str(tmp_path / "missing.pt"), str(tmp_path)]) == 2
    assert "no image found" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert predict.main([str(tmp_path / "missing.pt"), str(tmp_path / "a.png")]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err
    old = tmp_path / "old.pt"
    torch.save({"model": {}}, old)
    assert evaluate.main(["--checkpoint", str(old), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert "before tunelab stored the class names" in capsys.readouterr().err


@pytest.mark.slow
def test_mlflow_models_serve_answers_as_predict_does(digits_run, tmp_path):
    import os

    folder, uri, run, best, _ = digits_run
    images = _digit_images(6)
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    import mlflow

    with fluent_api_at(uri):
        expected = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict(encoded)
    port = free_port()
    server = subprocess.Popen([*mlflow_command(), "models", "serve", "-m", f"runs:/{run.info.run_id}/model", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], cwd=folder, env={**os.environ, **SERVER_ENV, "MLFLOW_TRACKING_URI": uri,
                                                 "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"},  # its uvicorn
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"), start_new_session=True)
    try:
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(e).decode()] for e in encoded]}}).encode()
        answer = None
        deadline = time.monotonic() + 120
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
            except OSError:
                time.sleep(1)
        assert answer is not None, (tmp_path / "serve.log").read_text()[-3000:]
        predictions = answer["predictions"]
        assert [p["class"] for p in predictions] == list(expected["class"])
        assert [p["probability"] for p in predictions] == pytest.approx(list(expected["probability"]), abs=1e-6)
    finally:
        stop(server)
