"""`ProcessLogger`: the logger of `logger=mlflow`, whose MLflow work is done by the helper process."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from tunelab.tracking.helper import get_helper
from tunelab.tracking.logger import NullLogger
from tunelab.tracking.plugin import helper_store_uri
from tunelab.tracking.upload import log_pytorch_model

log = logging.getLogger(__name__)


class ProcessLogger(NullLogger):
    """MlflowLogger with its work done in a helper process (`tunelab.tracking.helper`).

    The training process then never imports MLflow for logging (over a second of start-up) and
    never runs the tracking store's Python code beside its loop: a step's metrics are a list
    append, a flush one message through a pipe. Only `log_model` runs here, as it needs the model,
    and it reaches the database through the helper's open connection (`HelperStore`).
    """

    def __init__(self, tracking_uri: str | None, experiment_name: str, run_name: str | None = None, log_model: bool = True):
        self._kwargs = dict(tracking_uri=tracking_uri, experiment_name=experiment_name, run_name=run_name, log_model=log_model)
        self.experiment_name = experiment_name
        self.log_model_enabled = log_model
        self.run_id = None
        self.uri: str | None = None  # the URI the helper logs to, once the run has started
        self._pending: list[tuple[dict[str, float], int]] = []
        self._helper = get_helper()
        self._announced = False

    def connect_in_background(self) -> None:
        """The helper imports MLflow and opens the store while this process builds data and model."""
        if not self._announced:
            env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
            self._helper.send("new", self._kwargs, env, os.getcwd())
            self._announced = True

    def wait_for_connection(self) -> None:
        if self._announced:
            self._helper.call("wait_for_connection")

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        self.connect_in_background()
        self.run_id, self.uri, self.experiment_id = self._helper.call("start", dict(params), dict(tags))
        log.info("MLflow run %s in experiment '%s' at %s", self.run_id, self.experiment_name, self.uri)

    def resume(self, run_id: str) -> None:
        self.connect_in_background()
        self.run_id, self.uri, self.experiment_id = self._helper.call("resume", run_id)
        log.info("Continuing MLflow run %s at %s", run_id, self.uri)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._pending.append(({key: float(value) for key, value in metrics.items()}, step))

    def flush(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            self._helper.send("metrics", batch)

    def log_text(self, text: str, name: str) -> None:
        self._helper.call("log_text", text, name)

    def set_tag(self, key: str, value: str) -> None:
        self._helper.call("set_tag", key, str(value))

    def log_figure(self, figure, name: str) -> None:
        import io

        buffer = io.BytesIO()
        figure.savefig(buffer, format=Path(name).suffix.lstrip(".") or "png")
        self._helper.call("log_bytes", buffer.getvalue(), name)

    def log_lr_curves(self, curves: Mapping[str, list[float]], steps_per_epoch: int, name: str = "lr_curve.png") -> None:
        """Drawn and stored by the helper process, without a reply, while this process goes on (to
        log the model, on the other core); an error there is reported by `finish`."""
        self._helper.send("log_lr_curves", dict(curves), steps_per_epoch, name)

    def log_test_figures(self, figures) -> None:
        """Drawn and stored by the helper process, without a reply (an error is reported by `finish`)."""
        self._helper.send("log_test_figures", figures)

    def log_artifact(self, path: str | Path) -> None:
        self._helper.call("log_artifact", str(Path(path).resolve()))

    def log_model(self, model, input_example, info=None) -> None:
        """Logged here, where the model is, through the helper's open store where MLflow can be told
        to use it (`HelperStore`): opening a database store here would import its SQL layer anew."""
        log_pytorch_model(helper_store_uri(self.uri), self.run_id, model, input_example, info)

    def finish(self, status: str) -> None:
        if self.run_id is None:
            return
        self.flush()
        self._helper.call("finish", status)
