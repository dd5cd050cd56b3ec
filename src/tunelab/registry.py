"""The sweep's winner in MLflow's Model Registry: the best run of the winning configuration becomes
a version of the registered model `logger.registered_model_name` (default: the experiment's name),
tagged with the sweep and its metrics, and the alias `champion` moves to it, so
`models:/<name>@champion` always names the latest sweep's winner. `logger.register=false` turns it off.

A job that logged no model (`./multirun.sh` turns uploads off) has its `best.pt` logged once, here,
into its run; then it is registered.
"""

from __future__ import annotations

import logging

import torch

from tunelab import trained
from tunelab.compare_stats import METRIC, TEST_METRIC
from tunelab.tracking.upload import fluent_api_at, log_pytorch_model

log = logging.getLogger(__name__)

#: The alias the registry gives the latest sweep's winner.
CHAMPION = "champion"


def register_winner(client, uri: str, comparison, parent_id: str, logger_cfg) -> str | None:
    """Register the best run of the winning configuration of `comparison`; its version, or None
    when registering is off or no run finished."""
    if logger_cfg.get("register", True) is False:
        return None
    report = comparison.main
    ranked = report.ranked()
    if not ranked or not ranked[0].finished:
        log.warning("No finished run in the sweep: nothing registered")
        return None
    winner = ranked[0]
    best = max(winner.finished, key=lambda row: row.best)
    name = logger_cfg.get("registered_model_name") or logger_cfg.experiment_name
    model_id = trained.logged_model_id(client, client.get_run(best.run_id))
    if model_id is None:
        found = trained.from_run(best.run_id, torch.device("cpu"), client)  # its best.pt
        info = found.classifier.info
        log.info("Logging the winner's best.pt into its run %s, to register it", best.run_id)
        log_pytorch_model(uri, best.run_id, found.classifier.module, info.example(), info)
        model_id = trained.logged_model_id(client, client.get_run(best.run_id))
    tags = {"tunelab.sweep_run": parent_id, "tunelab.configuration": report.label(winner), f"best {METRIC}": f"{best.best:.6f}"}
    if best.test_acc == best.test_acc:  # not NaN
        tags[TEST_METRIC] = f"{best.test_acc:.6f}"
    import mlflow

    with fluent_api_at(uri):
        version = mlflow.register_model(f"models:/{model_id}", name, tags=tags).version
    client.set_registered_model_alias(name, CHAMPION, version)
    return str(version)


def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"
