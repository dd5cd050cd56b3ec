"""The runs to compare, read from MLflow into rows, and split by the data they were evaluated on."""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

from tunelab.compare_stats import METRIC, TEST_METRIC, Row
from tunelab.tracking.tags import ERROR_TAG, GROUPS, KIND_TAG, SWEEP_TAG

#: Override keys (fnmatch patterns) that do not change what is learnt: display, logging and
#: checkpoints, where the run runs, and the optimizer's kernel (fused or foreach: the same update
#: rule). They never make a configuration and never appear in its name.
NOT_LEARNT = (
    "trainer.progress", "trainer.log_every_n_steps", "trainer.checkpoint_dir", "trainer.checkpoint_every_n_steps",
    "trainer.checkpoint_min_interval_s", "trainer.keep_checkpoints", "trainer.resume", "trainer.device",
    "logger", "logger.*", "data.num_workers", "optimizer.fused", "optimizer.foreach", "hydra.*", "hydra/*",
)
#: Logged data keys that do not change the data a run is evaluated on (batching, loading, the
#: training set's augmentation and size, the fold, a repeat key): runs that differ only in these are
#: on the same data set and are compared with each other.
DATA_KEYS_NOT_EVALUATED = (
    "data.batch_size", "data.num_workers", "data.fold", "data.augment", "data.dataset.augment", "data.dataset.max_train_samples",
    "data.dataset.skip_bad_files", "data.dataset.download",
)
#: The image size a run actually used (the configured one may be raised to the model's minimum).
RESOLVED_IMAGE_SIZE = "resolved.data.image_size"


def parse_overrides(text: str) -> dict[str, str]:
    """The key=value pairs of an `overrides` tag that can make a configuration (none of NOT_LEARNT)."""
    pairs = {}
    for token in (text or "").split():
        if "=" in token:
            key, value = token.lstrip("+~").split("=", 1)
            if not any(fnmatchcase(key, pattern) for pattern in NOT_LEARNT):
                pairs[key] = value
    return pairs


def children(client, parent_id: str) -> list:
    """The runs of the sweep whose parent run is `parent_id`, in the order they started."""
    parent = client.get_run(parent_id)
    return client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        order_by=["attributes.start_time ASC"], max_results=5000,
    )


def latest_sweep(client, experiment_id: str) -> str | None:
    """The parent run id of the experiment's latest sweep; None when it has none."""
    sweeps = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 'true'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    return sweeps[0].info.run_id if sweeps else None


def read_rows(client, runs) -> list[Row]:
    """One Row per run that trained: not a sweep's parent run, not an LR range test."""
    trained = [r for r in runs if r.data.tags.get(SWEEP_TAG) != "true" and r.data.tags.get(KIND_TAG) != "lr_find"]
    return [_row(client, r) for r in trained]


def _row(client, run) -> Row:
    history = sorted(client.get_metric_history(run.info.run_id, METRIC), key=lambda m: m.step)
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "val/loss")]
    lrs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)]
    curve = [m.value for m in history]
    end = run.info.end_time or run.info.start_time
    overrides = parse_overrides(run.data.tags.get("overrides", ""))
    return Row(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id[:8],
        status=run.info.status,
        overrides=overrides,
        seed=overrides.get("seed", run.data.params.get("seed", "")),
        fold=overrides.get("data.fold", run.data.params.get("data.fold", "")),
        best=max(curve) if curve else math.nan,
        final=curve[-1] if curve else math.nan,
        best_loss=min(losses) if losses else math.nan,
        epochs=len(curve),
        seconds=(end - run.info.start_time) / 1000 if run.info.start_time else math.nan,
        error=run.data.tags.get(ERROR_TAG, ""),
        test_acc=run.data.metrics.get(TEST_METRIC, math.nan),
        curve=curve,
        lrs=lrs,
        settings={**run.data.params, **{g: run.data.tags[g] for g in GROUPS if g in run.data.tags}},
    )


def data_identity(row: Row) -> dict[str, str]:
    """What the run was evaluated on, from what it logged: its `data` option and `data.*` params, less
    DATA_KEYS_NOT_EVALUATED, with the image size it used where it logged that. Empty when it logged none."""
    identity = {k: v for k, v in row.settings.items()
                if (k == "data" or k.startswith("data.")) and k not in DATA_KEYS_NOT_EVALUATED}
    if RESOLVED_IMAGE_SIZE in row.settings:
        identity["data.image_size"] = row.settings[RESOLVED_IMAGE_SIZE]
    return identity


def data_sets(rows: list[Row]) -> list[tuple[str, list[Row]]]:
    """The runs split by data_identity, in the order they started, each with its label: the data keys
    whose values differ between the sets ("" when all runs are on one data set)."""
    sets: dict[tuple, list[Row]] = {}
    unknown = []  # runs that logged no data params (a job that failed before it started): listed with the largest set
    rows_with_params = any(any(k.startswith("data.") for k in r.settings) for r in rows)
    for r in rows:
        identity = tuple(sorted(data_identity(r).items()))
        logged = any(key.startswith("data.") for key, _ in identity)  # the `data` tag alone says too little
        (sets.setdefault(identity, []) if logged or not rows_with_params else unknown).append(r)
    if unknown:
        largest = max(sets.values(), key=len) if sets else sets.setdefault((), [])
        largest.extend(unknown)
        largest.sort(key=rows.index)
    if len(sets) <= 1:
        return [("", rows)]
    identities = [dict(identity) for identity in sets]
    differing = sorted(k for k in {k for i in identities for k in i} if len({i.get(k) for i in identities}) > 1)

    def label(identity: dict[str, str]) -> str:
        return " ".join(f"{k}={identity[k]}" for k in differing if k in identity) or "(no data params logged)"

    return [(label(identity), set_rows) for identity, set_rows in zip(identities, sets.values())]


