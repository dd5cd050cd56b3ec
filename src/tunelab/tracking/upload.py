"""The model upload: torch's model with tunelab's image-classifying pyfunc flavor (tunelab.serving)
into a run, with pinned pip requirements and the installed packages' map scanned beforehand by a
process of its own (`PackageScan`)."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from tunelab.tracking.children import start_python
from tunelab.tracking.tags import installed

log = logging.getLogger(__name__)


class PackageScan:
    """The map of installed packages to their modules, computed by a process at idle priority.

    MLflow checks a logged model's pip requirements against the installed packages, and for that
    maps every installed package to the modules it provides
    (`importlib_metadata.packages_distributions`, which reads each package's list of files): about
    half a second of the model upload here, and the same answer every time in one environment.
    `start` runs that scan in a separate Python process at idle priority, which takes only a core
    nothing else wants (the end of start-up, or beside the upload, which uses one core). `used()`
    hands its answer to MLflow for the duration of the upload; MLflow scans by itself when the scan
    failed or has not finished within a second of being needed (every core busy).
    """

    _process = None
    _result: dict[str, list[str]] | None = None
    _CODE = (
        "import json, os, sys\n"
        "if hasattr(os, 'sched_setscheduler'):\n"
        "    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
        "else:\n"
        "    os.nice(19)\n"
        "import importlib_metadata\n"
        "json.dump(importlib_metadata.packages_distributions(), sys.stdout)\n"
    )

    @classmethod
    def start(cls) -> None:
        """Start the scan once per process (a sweep's later jobs reuse its answer, as MLflow does)."""
        import subprocess

        if cls._process is not None or cls._result is not None:
            return
        try:
            cls._process = start_python(cls._CODE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError:
            cls._process = None

    @classmethod
    def result(cls, wait_s: float = 1.0) -> dict[str, list[str]] | None:
        """The scan's map, waiting up to `wait_s` for it; None when there is none to be had."""
        import json
        import subprocess

        if cls._result is None and cls._process is not None:
            process, cls._process = cls._process, None
            try:
                out, _ = process.communicate(timeout=wait_s)
                if process.returncode == 0:
                    cls._result = json.loads(out)
            except (subprocess.TimeoutExpired, ValueError):
                process.kill()
                process.communicate()
        return cls._result

    @classmethod
    @contextmanager
    def used(cls):
        """Within the block, `importlib_metadata.packages_distributions()` answers from the scan
        (a fresh copy each call) when it has one; the function is put back after."""
        try:
            import importlib_metadata
        except ImportError:
            yield
            return
        original = importlib_metadata.packages_distributions

        def packages_distributions():
            mapping = cls.result()
            if mapping is None:
                return original()
            return {module: list(packages) for module, packages in mapping.items()}

        importlib_metadata.packages_distributions = packages_distributions
        try:
            yield
        finally:
            importlib_metadata.packages_distributions = original


def log_pytorch_model(uri: str, run_id: str, model, input_example, info=None) -> None:
    """The model as `name="model"` into run `run_id` of the store at `uri`: torch's model
    (`mlflow.pytorch`, loadable with `mlflow.pytorch.load_model`) whose `python_function` flavor
    classifies images with the `ModelInfo` `info` (tunelab.serving; without `info`, MLflow's plain
    pytorch model, whose pyfunc takes preprocessed tensors), with explicit pip requirements
    (MLflow's own inference of them takes about 10 s).

    MLflow's safe `pt2` format (torch.export, traced on `input_example`, which should hold at
    least two images so the batch size stays dynamic) is tried first. MLflow's optional check of
    the serving example (loading the saved model back and predicting, which only warns on failure)
    is skipped there: it was a fifth of the upload's time, and on a GPU machine it loaded the
    CPU-saved model on CUDA and failed. A model torch.export cannot trace is saved in the pickle
    format instead, with a warning; MLflow loads that only with
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.models import Model

    from tunelab import serving

    with fluent_api_at(uri), PackageScan.used():
        with mlflow.start_run(run_id=run_id):
            common = dict(artifact_path=None, name="model", flavor=serving if info is not None else mlflow.pytorch, pytorch_model=model,
                          input_example=input_example, pip_requirements=pip_requirements())
            if info is not None:
                common["info"] = info
            try:
                Model.log(**common, serialization_format="pt2", validate_serving_input=False)
                return
            except Exception as err:
                log.warning(
                    "torch.export could not trace the model (%s); logging it in the pickle format, which loads only with "
                    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true", str(err).splitlines()[0][:200],
                )
                failed = mlflow.last_logged_model()  # the attempt left a FAILED model entry in the run
                if failed is not None and failed.source_run_id == run_id and failed.status == "FAILED":
                    mlflow.MlflowClient().delete_logged_model(failed.model_id)
            Model.log(**common, serialization_format="pickle")


@contextmanager
def fluent_api_at(uri: str):
    """MLflow's fluent API (`mlflow.start_run`, `mlflow.pytorch.log_model`) logs to `uri` within the block.

    It logs to `mlflow.set_tracking_uri`'s setting, else to MLFLOW_TRACKING_URI. Both are as they
    were after the block: else this process's later runs (sweep jobs, the helper's next connection)
    and its user's own MLflow calls would go to this store, or through the helper to whatever run it
    serves next. Setting the environment variable is enough unless this process has called
    `mlflow.set_tracking_uri` (MLflow then answers another URI), which is then set and set back.
    """
    import mlflow

    with environment_kept("MLFLOW_TRACKING_URI"):  # mlflow.set_tracking_uri exports it too
        os.environ["MLFLOW_TRACKING_URI"] = uri
        previous = mlflow.get_tracking_uri()
        if previous == uri:
            yield
            return
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)


@contextmanager
def environment_kept(*names: str):
    """Put these environment variables back as they were (absent ones removed) after the block."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def pip_requirements() -> list[str]:
    """The packages a logged model needs, pinned to the versions installed here."""
    found = [installed(package) for package in ("torch", "torchvision", "timm", "mlflow")]
    return [f"{distribution}=={version}" for distribution, version in filter(None, found)]
