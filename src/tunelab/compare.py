"""Compare runs: which scheduler and which freeze depth won, and by how much.

    python -m tunelab.compare                          # the latest sweep of experiment "tunelab"
    python -m tunelab.compare --parent RUN_ID          # one sweep
    python -m tunelab.compare --experiment NAME --out outputs/compare   # every run of an experiment

Writes comparison.csv, comparison.md and comparison.png (LR curves per scheduler, validation
accuracy per epoch, a heat map of the best validation accuracy over the two swept keys, and the
ranking) to the output folder and, for a sweep, logs them to the parent run. Made automatically at
the end of every `-m` sweep.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

METRIC = "val/acc"


@dataclass
class Row:
    """One run of the comparison."""

    run_id: str
    name: str
    status: str
    overrides: dict[str, str]
    best: float
    final: float
    best_loss: float
    epochs: int
    seconds: float
    error: str
    curve: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "FINISHED" and not math.isnan(self.best)


@dataclass
class Report:
    rows: list[Row]
    swept: list[str]
    csv: Path
    markdown: Path
    png: Path

    def ranked(self) -> list[Row]:
        return sorted((r for r in self.rows if r.ok), key=lambda r: -r.best)

    def label(self, row: Row) -> str:
        return ", ".join(f"{k}={row.overrides.get(k, '')}" for k in self.swept) or row.name

    def summary(self) -> str:
        ranked = self.ranked()
        failed = [r for r in self.rows if not r.ok]
        if not ranked:
            return f"No run finished ({len(failed)} failed)."
        win = ranked[0]
        text = f"Winner: {self.label(win)}  best {METRIC} {win.best:.4f}"
        if len(ranked) > 1:
            text += f", {win.best - ranked[1].best:+.4f} over {self.label(ranked[1])} ({ranked[1].best:.4f})"
        if failed:
            text += f"\n{len(failed)} of {len(self.rows)} runs failed: " + "; ".join(f"{self.label(r)}: {r.error or r.status}" for r in failed)
        return text


def parse_overrides(text: str) -> dict[str, str]:
    pairs = {}
    for token in (text or "").split():
        if "=" in token and not token.startswith("hydra."):
            key, value = token.lstrip("+~").split("=", 1)
            pairs[key] = value
    return pairs


def children(client, parent_id: str) -> list:
    parent = client.get_run(parent_id)
    return client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        order_by=["attributes.start_time ASC"], max_results=5000,
    )


def _row(client, run) -> Row:
    history = sorted(client.get_metric_history(run.info.run_id, METRIC), key=lambda m: m.step)
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "val/loss")]
    lrs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)]
    curve = [m.value for m in history]
    end = run.info.end_time or run.info.start_time
    return Row(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id[:8],
        status=run.info.status,
        overrides=parse_overrides(run.data.tags.get("overrides", "")),
        best=max(curve) if curve else math.nan,
        final=curve[-1] if curve else math.nan,
        best_loss=min(losses) if losses else math.nan,
        epochs=len(curve),
        seconds=(end - run.info.start_time) / 1000 if run.info.start_time else math.nan,
        error=run.data.tags.get("tunelab.error", ""),
        curve=curve,
        lrs=lrs,
    )


def swept_keys(rows: list[Row]) -> list[str]:
    """Override keys whose value differs between runs, scheduler and freeze first."""
    keys = {k for r in rows for k in r.overrides}
    varying = [k for k in keys if len({r.overrides.get(k) for r in rows}) > 1]
    order = {"scheduler": 0, "freeze": 1, "freeze.depth": 2}
    return sorted(varying, key=lambda k: (order.get(k, 9), k))


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def write_tables(report: Report) -> None:
    rows = report.ranked() + [r for r in report.rows if not r.ok]
    header = ["rank", *report.swept, f"best {METRIC}", f"final {METRIC}", "best val/loss", "epochs", "seconds", "status", "error", "run_id"]
    with open(report.csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, r in enumerate(rows):
            writer.writerow([i + 1 if r.ok else "", *(r.overrides.get(k, "") for k in report.swept), _fmt(r.best), _fmt(r.final),
                             _fmt(r.best_loss), r.epochs, f"{r.seconds:.1f}", r.status, r.error, r.run_id])
    lines = [report.summary().replace("\n", "\n\n"), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, r in enumerate(rows):
        cells = [str(i + 1) if r.ok else "", *(r.overrides.get(k, "") for k in report.swept), _fmt(r.best), _fmt(r.final),
                 _fmt(r.best_loss), str(r.epochs), f"{r.seconds:.1f}", r.status, r.error.replace("|", "/"), r.run_id]
        lines.append("| " + " | ".join(cells) + " |")
    report.markdown.write_text("\n".join(lines) + "\n")


def draw(report: Report):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, swept = report.rows, report.swept
    fig, axes = plt.subplots(2, 2, figsize=(15, 10.5), constrained_layout=True)
    ax_lr, ax_acc, ax_heat, ax_rank = axes.flat
    key_a = swept[0] if swept else None
    key_b = swept[1] if len(swept) > 1 else None
    values_a = sorted({r.overrides.get(key_a, "") for r in rows}, key=_sort_key) if key_a else [""]
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(values_a)}
    styles = ["-", "--", ":", "-."]
    values_b = sorted({r.overrides.get(key_b, "") for r in rows}, key=_sort_key) if key_b else [""]

    shown = set()  # one LR curve per value of the first swept key (the scheduler, in a scheduler sweep)
    for r in rows:
        va = r.overrides.get(key_a, "") if key_a else ""
        if r.lrs and va not in shown:
            ax_lr.plot(r.lrs, color=colors[va], label=f"{key_a}={va}" if key_a else r.name)
            shown.add(va)
    ax_lr.set(title="Learning rate per optimizer step", xlabel="optimizer step", ylabel="lr")
    if shown:
        ax_lr.legend(fontsize=8)

    for r in rows:
        if r.curve:
            va = r.overrides.get(key_a, "") if key_a else ""
            vb = r.overrides.get(key_b, "") if key_b else ""
            ax_acc.plot(range(len(r.curve)), r.curve, color=colors[va], linestyle=styles[values_b.index(vb) % len(styles)],
                        marker="o", markersize=3, label=report.label(r))
    ax_acc.set(title=f"{METRIC} per epoch", xlabel="epoch", ylabel=METRIC)
    if len(rows) <= 24:
        ax_acc.legend(fontsize=7, ncol=2)

    grid = np.full((len(values_a), len(values_b)), np.nan)
    failed = np.zeros_like(grid, dtype=bool)
    for r in rows:
        i = values_a.index(r.overrides.get(key_a, "")) if key_a else 0
        j = values_b.index(r.overrides.get(key_b, "")) if key_b else 0
        if r.ok:
            grid[i, j] = r.best if np.isnan(grid[i, j]) else max(grid[i, j], r.best)
        else:
            failed[i, j] = True
    image = ax_heat.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax_heat, label=f"best {METRIC}")
    ax_heat.set_xticks(range(len(values_b)), [_depth_label(key_b, v) for v in values_b])
    ax_heat.set_yticks(range(len(values_a)), values_a)
    ax_heat.set(xlabel=key_b or "", ylabel=key_a or "", title=f"Best {METRIC}" + (f": {key_a} x {key_b}" if key_b else ""))
    finite = grid[np.isfinite(grid)]
    best_cell = finite.max() if finite.size else None
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                weight = "bold" if grid[i, j] == best_cell else "normal"
                color = "black" if grid[i, j] > middle else "white"
                ax_heat.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color=color, fontweight=weight)
            elif failed[i, j]:
                ax_heat.text(j, i, "failed", ha="center", va="center", color="red")

    ranked = report.ranked()[:15]
    if ranked:
        labels = [report.label(r) for r in ranked][::-1]
        values = [r.best for r in ranked][::-1]
        ax_rank.barh(labels, values, color=[colors[r.overrides.get(key_a, "")] if key_a else "C0" for r in ranked][::-1])
        low = min(values)
        ax_rank.set_xlim(max(0.0, low - (max(values) - low) * 0.5 - 0.01), min(1.0, max(values) + 0.01))
        for y, v in enumerate(values):
            ax_rank.text(v, y, f" {v:.4f} ({v - ranked[0].best:+.4f})", va="center", fontsize=8)
    ax_rank.set(title=f"Ranking by best {METRIC} (difference to the winner)", xlabel=f"best {METRIC}")
    ax_rank.tick_params(axis="y", labelsize=8)
    fig.suptitle(report.summary().splitlines()[0], fontsize=13)
    return fig


def _sort_key(value: str):
    """Numbers ascending, negative ones (freeze depths counted from the head) after them, then text."""
    try:
        number = float(value)
    except ValueError:
        return (2, 0.0, value)
    return (0 if number >= 0 else 1, number, value)


def _depth_label(key: str | None, value: str) -> str:
    return f"{value} (head)" if key == "freeze.depth" and value == "-1" else value


def compare_runs(client, runs, out_dir: Path, parent_id: str | None = None) -> Report:
    """Build the tables and the figure for `runs`; write them to `out_dir` and log them to the parent."""
    import matplotlib.pyplot as plt

    from tunelab.sweep import SWEEP_TAG

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [_row(client, r) for r in runs if r.data.tags.get(SWEEP_TAG) != "true"]
    report = Report(rows, swept_keys(rows), out_dir / "comparison.csv", out_dir / "comparison.md", out_dir / "comparison.png")
    write_tables(report)
    fig = draw(report)
    fig.savefig(report.png, dpi=110)
    plt.close(fig)
    if parent_id:
        for path in (report.csv, report.markdown, report.png):
            client.log_artifact(parent_id, str(path))
        ranked = report.ranked()
        if ranked:
            client.log_metric(parent_id, f"best {METRIC}".replace(" ", "_"), ranked[0].best)
            client.set_tag(parent_id, "tunelab.winner", report.label(ranked[0]))
    return report


def main(argv: list[str] | None = None) -> int:
    from mlflow import MlflowClient

    from tunelab.sweep import SWEEP_TAG
    from tunelab.tracking import resolve_tracking_uri

    parser = argparse.ArgumentParser(prog="python -m tunelab.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///outputs/mlflow.db)")
    parser.add_argument("--experiment", default="tunelab", help="experiment name (default: tunelab)")
    parser.add_argument("--parent", default=None, help="a sweep's parent run id (default: the latest sweep)")
    parser.add_argument("--all", action="store_true", help="compare every run of the experiment instead of one sweep")
    parser.add_argument("--out", default=None, help="output folder (default: outputs/compare/<parent or experiment>)")
    args = parser.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"Error: no experiment {args.experiment!r} at {uri}", file=sys.stderr)
        return 2
    parent = args.parent
    if args.all:
        runs = client.search_runs([experiment.experiment_id], max_results=5000, order_by=["attributes.start_time ASC"])
    else:
        if parent is None:
            sweeps = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 'true'",
                                        order_by=["attributes.start_time DESC"], max_results=1)
            if not sweeps:
                print(f"Error: no sweep in experiment {args.experiment!r}; pass --all to compare its runs", file=sys.stderr)
                return 2
            parent = sweeps[0].info.run_id
        try:
            runs = children(client, parent)
        except Exception:
            print(f"Error: --parent {parent}: no such run at {uri}", file=sys.stderr)
            return 2
    out = Path(args.out or f"outputs/compare/{parent or args.experiment}")
    report = compare_runs(client, runs, out, parent_id=parent)
    print(report.summary())
    print(f"wrote {report.png}, {report.markdown} and {report.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
