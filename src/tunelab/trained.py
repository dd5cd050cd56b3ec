"""A trained model, found where tunelab left it: a checkpoint file (`best.pt`, `last.pt`), an MLflow
run (its logged model, else its `best.pt`), or an MLflow model URI (`runs:/<id>/model`,
`models:/<name>@champion`, `models:/<name>/<version>`). Each gives a `Classifier` (the model and its
classes and preprocessing) and, where known, the run it came from and that run's config.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from tunelab import checkpoints
from tunelab.errors import ConfigError, build, require
from tunelab.inference import Classifier, ModelInfo
from tunelab.serving import load_model_dir
from tunelab.tracking.tags import JOB_DIR_TAG
from tunelab.tracking.upload import environment_kept, fluent_api_at

log = logging.getLogger(__name__)


@dataclass
class Trained:
    """A loaded classifier, the MLflow run it came from (None for a bare checkpoint without one) and
    the run's resolved config (None when unknown), with a phrase naming what was loaded."""

    classifier: Classifier
    run_id: str | None
    config: DictConfig | None
    source: str


def from_checkpoint(path: str | Path, device: torch.device) -> Trained:
    """The model of a tunelab checkpoint, rebuilt from the model config stored with it (no pretrained
    weights are fetched: the checkpoint holds every weight)."""
    path = Path(path).expanduser()
    require(path.is_file(), f"--checkpoint {path}: no such file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{path}: not a readable tunelab checkpoint ({str(err).splitlines()[0]})") from None
    require(isinstance(saved, dict) and "model" in saved, f"{path}: not a tunelab checkpoint (no model weights in it)")
    require("model_info" in saved, f"{path} was written before tunelab stored the class names and preprocessing with "
                                   "its checkpoints; train again, or use the run's logged model (--run / runs:/<id>/model)")
    info = ModelInfo.from_dict(saved["model_info"])
    node = OmegaConf.create({**info.model_config, "pretrained": False, "weights_path": None})
    module = build(node, "model", num_classes=len(info.classes))
    module.load_state_dict(saved["model"])
    module.to(device).eval()
    config = OmegaConf.create(unflatten(saved["config"])) if isinstance(saved.get("config"), dict) else None
    return Trained(Classifier(module, info, device), saved.get("run_id"), config, f"checkpoint {path}")


def from_uri(uri: str, device: torch.device, client) -> Trained:
    """An MLflow model (`runs:/...`, `models:/...`) of the store `client` talks to."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        with fluent_api_at(client.tracking_uri):  # where download_artifacts and get_model_info resolve runs:/ and models:/
            folder = mlflow.artifacts.download_artifacts(artifact_uri=uri)
            run_id = mlflow.models.get_model_info(uri).run_id
    except (MlflowException, OSError) as err:
        raise ConfigError(f"{uri}: no such model in {client.tracking_uri} ({str(err).splitlines()[0][:300]})") from None
    classifier = load_model_dir(folder, device)
    return Trained(classifier, run_id, _run_config(client, run_id), f"model {uri}")


def from_run(run_id: str, device: torch.device, client) -> Trained:
    """A run's logged model, else the `best.pt` in its run folder."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"--run {run_id}: no such run in {client.tracking_uri}") from None
    if logged_model_id(client, run) is not None:
        return from_uri(f"runs:/{run_id}/model", device, client)
    folder = run.data.tags.get(JOB_DIR_TAG) or run.data.params.get("trainer.checkpoint_dir")
    best = Path(folder) / checkpoints.BEST if folder else None
    require(best is not None and best.is_file(),
            f"--run {run_id} logged no model (logger.log_model=false) and its best.pt is not at {best or 'a known run folder'}; "
            "give --checkpoint PATH")
    found = from_checkpoint(best, device)
    return Trained(found.classifier, run_id, _run_config(client, run_id) or found.config, f"{best} of run {run_id}")


def load(source: str, device: torch.device, client) -> Trained:
    """What `python -m tunelab.predict MODEL` names: a file is a checkpoint, `runs:/` and `models:/`
    are MLflow models, and anything else is taken for a run id."""
    if source.startswith(("runs:/", "models:/")):
        return from_uri(source, device, client)
    if Path(source).expanduser().is_file() or source.endswith(".pt"):
        return from_checkpoint(source, device)
    return from_run(source, device, client)


def logged_model_id(client, run) -> str | None:
    """The id of the run's logged model named `model` that finished uploading, None when it has none."""
    outputs = run.outputs.model_outputs if run.outputs is not None else []
    for output in outputs or []:
        try:
            model = client.get_logged_model(output.model_id)
        except Exception:
            continue
        if model.name == "model" and str(model.status).endswith("READY"):
            return model.model_id
    return None


def _run_config(client, run_id: str | None) -> DictConfig | None:
    """The run's resolved config (its artifact `config.yaml`), None when it has none."""
    import tempfile

    if not run_id:
        return None
    try:
        with tempfile.TemporaryDirectory() as folder, environment_kept("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # one small file: no progress bar
            return OmegaConf.load(client.download_artifacts(run_id, "config.yaml", folder))
    except Exception:
        return None


def unflatten(flat: dict) -> dict:
    """{'optimizer.lr': 0.1} -> {'optimizer': {'lr': 0.1}} (the inverse of tracking's `flatten`)."""
    nested: dict = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


