"""The logged model as MLflow sees it: torch's model (the `pytorch` flavor, unchanged) whose
`python_function` flavor classifies images, so `mlflow.pyfunc.load_model(...).predict(images)` and
`mlflow models serve` answer class names and probabilities.

`save_model` is the flavor MLflow's `Model.log` calls (tunelab.tracking.upload passes this module as
the flavor): it saves the model with `mlflow.pytorch.save_model`, stores the `ModelInfo` (classes,
preprocessing) in the MLmodel's `metadata` under `tunelab`, sets a signature whose outputs are the
answer's columns, and points the `python_function` flavor's loader at this module. MLflow then calls
`_load_pyfunc(data folder)` to load it, in `mlflow.pyfunc.load_model` and in the model server.

What `predict` takes: a batch of images as uint8 arrays (N x H x W x C, or a list of H x W x C), encoded
image bytes (JPEG, PNG, ...), base64 text of such bytes (a JSON request:
`{"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}`), a DataFrame with an `image`
column of either, or float inputs already preprocessed (N x 3 x H x W). What it returns: a DataFrame,
one row per image: `class` (the most probable), `probability`, and `prob_<class>` for every class.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from tunelab.inference import INFO_KEY, Classifier, ModelInfo, decode, images_of, is_preprocessed

#: The column prefix of each class's probability in the answer.
PROBABILITY_PREFIX = "prob_"


def signature(info: ModelInfo):
    """The answer's columns (MLflow records them; the inputs vary in kind, so none are declared)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    columns = [ColSpec("string", "class"), ColSpec("double", "probability")]
    columns += [ColSpec("double", f"{PROBABILITY_PREFIX}{name}") for name in info.classes]
    return ModelSignature(inputs=None, outputs=Schema(columns))


def save_model(path, mlflow_model, pytorch_model, info: ModelInfo, **kwargs) -> None:
    """`mlflow.pytorch.save_model` into `path`, then this module as the `python_function` loader,
    the model info as metadata and the answer's columns as the signature's outputs."""
    import mlflow.pytorch
    from mlflow import pyfunc
    from mlflow.models.model import MLMODEL_FILE_NAME

    kwargs.pop("validate_serving_input", None)  # Model.log's own option (torch.save would get it in the pickle format)
    metadata = {**(kwargs.pop("metadata", None) or {}), INFO_KEY: info.to_dict()}
    mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, metadata=metadata, **kwargs)
    flavor = mlflow_model.flavors.get(pyfunc.FLAVOR_NAME, {})
    pyfunc.add_to_model(mlflow_model, loader_module=__name__, data=flavor.get("data", "data"), code=flavor.get(pyfunc.CODE),
                        conda_env=flavor.get(pyfunc.ENV, {}).get("conda", "conda.yaml"),
                        python_env=flavor.get(pyfunc.ENV, {}).get("virtualenv", "python_env.yaml"))
    mlflow_model.signature = signature(info)
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


class ImageClassifierModel:
    """What `mlflow.pyfunc.load_model` wraps: `predict(images)` -> a DataFrame of classes and probabilities."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier

    def predict(self, model_input, params=None):
        import pandas as pd

        c = self.classifier
        if is_preprocessed(model_input):
            probabilities = c.probabilities(torch.as_tensor(np.asarray(model_input, dtype=np.float32)))
        else:
            batch_size = int((params or {}).get("batch_size", 64))
            probabilities = c.classify((decode(item) for item in images_of(model_input)), batch_size)
        best, index = probabilities.max(1)
        table = {"class": [c.info.classes[i] for i in index.tolist()], "probability": best.double().numpy()}
        for i, name in enumerate(c.info.classes):
            table[f"{PROBABILITY_PREFIX}{name}"] = probabilities[:, i].double().numpy()
        return pd.DataFrame(table)


def load_model_dir(model_dir: str | Path, device: torch.device | None = None) -> Classifier:
    """The classifier of a saved model folder (the one holding `MLmodel`), on `device`."""
    import mlflow.pytorch
    from mlflow.models import Model

    metadata = Model.load(str(model_dir)).metadata or {}
    if INFO_KEY not in metadata:
        from tunelab.errors import ConfigError

        raise ConfigError(f"the model at {model_dir} carries no class names and preprocessing (it was logged before tunelab stored them); "
                          "use the run's best.pt (--checkpoint) or log the model again")
    device = device or torch.device("cpu")
    module = mlflow.pytorch.load_model(str(model_dir), device=str(device) if device.type != "cpu" else None)
    if isinstance(module, torch.nn.Module):
        try:
            module.eval()
        except (NotImplementedError, RuntimeError):  # torch.export's modules were traced in eval mode and refuse the call
            pass
    return Classifier(module, ModelInfo.from_dict(metadata[INFO_KEY]), device)


def _load_pyfunc(path: str, model_config=None):
    """MLflow's entry to this flavor: `path` is the model's data folder (beside the MLmodel file)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return ImageClassifierModel(load_model_dir(Path(path).parent, device))
