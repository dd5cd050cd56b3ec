"""Score a trained model on a data set: its own test split, or any split of any data option.

    python -m tunelab.evaluate --run RUN_ID                      # the run's test split, with its preprocessing
    python -m tunelab.evaluate --model models:/tunelab@champion  # the sweep's registered winner
    python -m tunelab.evaluate --checkpoint outputs/2026-12-02/10-00-00/best.pt
    python -m tunelab.evaluate --run RUN_ID data=folder data.dataset.root=/data/other_photos
    python -m tunelab.evaluate --run RUN_ID --split val

`--run` takes the run's logged model, else the `best.pt` in its run folder. Without data overrides
the data is the run's own (its config, seed and split seed): `--split test` then scores the very
images the run's `test/*` metrics came from. Data overrides are those of `train.py`: `data=OPTION`
starts from that option's defaults; `data.KEY=VALUE` alone changes the run's own data. Images are
prepared as the model's validation images were (its stored preprocessing, as `predict` does);
classes are matched by name, and a data set with a class the model lacks is refused.

Prints the metrics and a per-class table; writes `per_class.csv`, `confusion_matrix.png` and
`top_losses.png` to `--out`; logs `eval/<name>/acc`, `/balanced_acc`, `/macro_f1`, `/loss` and the
three files (under `eval/<name>/`) into the source run, or with `--new-run` (or a checkpoint of no
run) into a new run tagged `tunelab.kind=evaluation` that names its source. `<name>` is the split for
the run's own data (`test`), else the data option (`folder`, and `folder_val` for another split).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from tunelab import data as data_lib
from tunelab import predictions, trained
from tunelab.errors import ConfigError, ReportedError, build, require
from tunelab.inference import class_map
from tunelab.prepare import build_loss
from tunelab.tracking import KIND_TAG, open_store, resolve_tracking_uri
from tunelab.tracking.tags import ui_lines

log = logging.getLogger(__name__)

#: The tag of an evaluation run naming the run whose model it scored.
SOURCE_TAG = "tunelab.source_run"
SPLITS = ("test", "val", "train")


@dataclass
class Scored:
    """One evaluation: its name (`eval/<name>/...`), the predictions, the metrics and the files written."""

    name: str
    found: predictions.Predictions
    scores: dict[str, float]
    files: list[Path]
    run_id: str | None = None


def data_config(run_cfg: DictConfig | None, overrides: list[str]) -> tuple[DictConfig, str | None]:
    """The config to build the data from (`data` and `seed`) and the data option overrides named, if any:
    the run's own, `data.KEY=VALUE` applied to it, or with `data=OPTION` that option's defaults."""
    from tunelab.preview import compose

    bad = [o for o in overrides if not o.lstrip("+~").startswith(("data.", "data=", "seed="))]
    require(not bad, f"{' '.join(bad)}: evaluate takes only data overrides (data=..., data.KEY=...) and seed=...")
    group = next((o.split("=", 1)[1] for o in overrides if o.startswith("data=")), None)
    if run_cfg is None or group is not None:
        fresh = compose(overrides)
        cfg = OmegaConf.create(OmegaConf.to_container(fresh, resolve=True))
        return cfg, group or str(cfg.data.dataset._target_).rsplit(".", 1)[-1]
    cfg = OmegaConf.create({"data": OmegaConf.to_container(run_cfg.data, resolve=True), "seed": run_cfg.get("seed", 0),
                            "loss": OmegaConf.to_container(run_cfg.loss, resolve=True) if "loss" in run_cfg else None})
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
    changed = [o for o in overrides if o.startswith("data")]
    return cfg, (str(cfg.data.dataset._target_).rsplit(".", 1)[-1] if changed else None)


def evaluate(model: trained.Trained, cfg: DictConfig, split: str, name: str, out: Path, device: torch.device) -> Scored:
    """Score `model` on `split` of the data `cfg` describes; write the table and the two figures to `out`."""
    info = model.classifier.info
    splits = build(cfg.data.dataset, "data", image_size=info.image_size, mean=list(info.mean), std=list(info.std), seed=cfg.seed)
    if cfg.data.get("folds"):
        splits = data_lib.kfold(splits, cfg.data.folds, cfg.data.fold, cfg.seed)
    dataset = getattr(splits, split)
    require(dataset is not None, f"--split {split}: this data has no {split} split (a folder with train/ and val/ but no test/)")
    if getattr(dataset, "transform", None) is not None:  # image files: prepared as the model's validation images were (as predict does)
        dataset = copy.copy(dataset)
        dataset.transform = info.transform
    mapping = torch.tensor(class_map(info.classes, splits.classes, f"The data ({cfg.data.dataset._target_})"))
    loader = data_lib.make_loader(dataset, int(cfg.data.batch_size), False, int(cfg.seed), cfg.data.get("num_workers"))
    found = predictions.predict(model.classifier.module, loader, device)
    found = predictions.Predictions(found.logits, mapping[found.targets])
    same_classes = list(splits.classes) == list(info.classes)
    loss_cfg = cfg.get("loss") or OmegaConf.create({"_target_": "torch.nn.CrossEntropyLoss"})
    loss_fn = build_loss(loss_cfg, splits, device) if same_classes else torch.nn.CrossEntropyLoss()
    scores = found.scores(loss_fn, f"eval/{name}")
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "per_class.csv", out / "confusion_matrix.png", out / "top_losses.png"]
    files[0].write_text(predictions.per_class_csv({name: found}, info.classes))
    _figures(found, dataset, info, name, files[1:])
    return Scored(name, found, scores, files)


def _figures(found: predictions.Predictions, dataset, info, name: str, paths: list[Path]) -> None:
    from tunelab.plots import pyplot

    plt = pyplot()
    wrong = {i: dataset[i][0] for i in predictions.most_confidently_wrong(found)}
    figures = [predictions.confusion_figure(found, info.classes, f"Confusion matrix: {name}"),
               predictions.top_losses_figure(found, wrong.__getitem__, info.classes, info.mean, info.std,
                                             f"{name}: the images the model got most confidently wrong")]
    for figure, path in zip(figures, paths):
        figure.savefig(path, dpi=110)
        plt.close(figure)


def log_scored(client, experiment_id: str, model: trained.Trained, scored: Scored, new_run: bool) -> str:
    """The metrics and files into the source run, or into a new evaluation run naming it; its id."""
    from mlflow.entities import Metric

    run_id = model.run_id
    if new_run or run_id is None:
        tags = {KIND_TAG: "evaluation", "mlflow.runName": f"evaluate {scored.name}: {model.source}"[:250]}
        if run_id is not None:
            tags[SOURCE_TAG] = run_id
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        created = True
    else:
        created = False
    import time

    now = int(time.time() * 1000)
    status = "FAILED"
    try:
        client.log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in scored.scores.items()])
        for path in scored.files:
            client.log_artifact(run_id, str(path), artifact_path=f"eval/{scored.name}")
        status = "FINISHED"
    finally:
        if created:  # a run this made never stays RUNNING
            client.set_terminated(run_id, status)
    return run_id


def table(scored: Scored, classes: list[str]) -> str:
    """The metrics on one line, then one line per class: precision, recall, F1, support."""
    from tunelab import metrics

    lines = ["  ".join(f"{key.rsplit('/', 1)[-1]} {value:.4f}" for key, value in scored.scores.items()),
             f"{'class':>16} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for name, row in zip(classes, metrics.per_class(scored.found.confusion())):
        lines.append(f"{name[:16]:>16} {row['precision']:9.4f} {row['recall']:7.4f} {row['f1']:7.4f} {row['support']:8d}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tunelab.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="an MLflow run id: its logged model, else its best.pt")
    source.add_argument("--model", help="an MLflow model URI: runs:/<id>/model, models:/<name>@champion, models:/<name>/<version>")
    source.add_argument("--checkpoint", help="a tunelab checkpoint file (best.pt, last.pt)")
    parser.add_argument("overrides", nargs="*", help="data overrides as for train.py: data=folder data.dataset.root=/data/photos")
    parser.add_argument("--split", choices=SPLITS, default="test", help="which split to score (default: test)")
    parser.add_argument("--new-run", action="store_true", help="log into a new run tagged tunelab.kind=evaluation, not the source run")
    parser.add_argument("--out", default=None, help="folder of the table and figures (default: outputs/evaluate/<name>-<run id>)")
    parser.add_argument("--tracking-uri", default=None, help="the MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db)")
    parser.add_argument("--experiment", default="tunelab", help="the experiment of a new evaluation run (default: tunelab)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
        uri = resolve_tracking_uri(args.tracking_uri)
        client, experiment_id = open_store(uri, args.experiment)
        if args.checkpoint:
            model = trained.from_checkpoint(args.checkpoint, device)
        elif args.model:
            model = trained.from_uri(args.model, device, client)
        else:
            model = trained.from_run(args.run, device, client)
        cfg, changed = data_config(model.config, args.overrides)
        name = args.split if changed is None else changed + ("" if args.split == "test" else f"_{args.split}")
        out = Path(args.out or Path("outputs") / "evaluate" / f"{name}-{model.run_id or 'checkpoint'}")
        scored = evaluate(model, cfg, args.split, name, out, device)
        run_id = log_scored(client, experiment_id, model, scored, args.new_run)
    except (ConfigError, ReportedError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    print(f"{model.source} on {name} ({len(scored.found.targets)} images):")
    print(table(scored, model.classifier.info.classes))
    print(f"\nWrote {', '.join(str(p) for p in scored.files)}")
    experiment = client.get_run(run_id).info.experiment_id
    print("\n".join(ui_lines(uri, experiment, run_id, f"eval/{name}/* logged to run {run_id}")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
