"""Compare runs: which scheduler and which freeze depth won, and by more than the noise or not.

    python -m tunelab.compare                          # the latest sweep of experiment "tunelab"
    python -m tunelab.compare --parent RUN_ID          # one sweep
    python -m tunelab.compare --experiment NAME --out outputs/compare   # every run of an experiment

Only runs on the same data are compared: the runs are first split into data sets by what they
logged of their data (the `data` option and the `data.*` params, less DATA_KEYS_NOT_EVALUATED), and
each data set is ranked on its own, with its own winner.

A configuration is the set of values of the keys that some run overrode, each read from what the
run logged (the param, or the group's option tag), so a run that left a key at its default matches
one that set it to the same value. Keys that do not change what is learnt (NOT_LEARNT) never make a
configuration. Runs that differ only by `seed` and/or `data.fold` are repeats
of one configuration. Per configuration the comparison gives n, the mean, the standard deviation and the 95 % confidence
interval (Student t) of the best and the final val/acc and of the test/acc, and the optimism (the mean of best
val/acc minus test/acc); configurations are ranked by their mean best val/acc alone, and each one is tested
against the winner (see RULE). The test/acc is reported, never chosen on.

Writes comparison.csv (one row per configuration), comparison_runs.csv (one row per run),
comparison.md and comparison.png (LR curves per scheduler, mean validation accuracy per epoch, a heat
map of the mean best validation accuracy over the two swept keys, and the ranking of every configuration
with its mean test accuracy beside, each with its interval; one block of these per data set) to the
output folder and, for a sweep, logs them to the parent run. Made automatically at the end of every `-m` sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tunelab.compare_figure import write_figure
from tunelab.compare_report import Comparison, Report
from tunelab.compare_rows import children, data_sets, latest_sweep, read_rows
from tunelab.compare_stats import METRIC, TEST_METRIC, group, rank, swept_keys
from tunelab.compare_tables import write_tables
from tunelab.tracking import open_store, resolve_tracking_uri


def compare_runs(client, runs, out_dir: Path, parent_id: str | None = None) -> Comparison:
    """Build the tables and the figure for `runs`, ranking each data set's runs on their own; write them to
    `out_dir` and log them to the parent with the winner's mean best val/acc (metric `best_val/acc`), its mean
    test/acc (metric `test/acc`, when its runs logged one) and its label (tag `tunelab.winner`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = []
    for data, rows in data_sets(read_rows(client, runs)):
        swept = swept_keys(rows)
        reports.append(Report(rows, swept, rank(group(rows, swept)), data))
    comparison = Comparison(reports, out_dir / "comparison.csv", out_dir / "comparison_runs.csv",
                            out_dir / "comparison.md", out_dir / "comparison.png")
    write_tables(comparison)
    write_figure(comparison)
    if parent_id:
        for path in (comparison.csv, comparison.runs_csv, comparison.markdown, comparison.png):
            client.log_artifact(parent_id, str(path))
        # One number and one name for the sweep: those of the data set with the most runs (a sweep's runs
        # are usually all on one; the others, if any, are in the comparison's files).
        main = comparison.main
        ranked = main.ranked()
        if ranked:
            client.log_metric(parent_id, f"best {METRIC}".replace(" ", "_"), ranked[0].best.mean)
            client.set_tag(parent_id, "tunelab.winner", main.label(ranked[0]))
            if ranked[0].test_acc.n:
                client.log_metric(parent_id, TEST_METRIC, ranked[0].test_acc.mean)
    return comparison


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunelab.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///outputs/mlflow.db)")
    parser.add_argument("--experiment", default="tunelab", help="experiment name (default: tunelab)")
    parser.add_argument("--parent", default=None, help="a sweep's parent run id (default: the latest sweep)")
    parser.add_argument("--all", action="store_true", help="compare every run of the experiment instead of one sweep")
    parser.add_argument("--out", default=None, help="output folder (default: outputs/compare/<parent or experiment>)")
    args = parser.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    client, _ = open_store(uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"Error: no experiment {args.experiment!r} at {uri}", file=sys.stderr)
        return 2
    parent = args.parent
    if args.all:
        runs = client.search_runs([experiment.experiment_id], max_results=5000, order_by=["attributes.start_time ASC"])
    else:
        parent = parent or latest_sweep(client, experiment.experiment_id)
        if parent is None:
            print(f"Error: no sweep in experiment {args.experiment!r}; pass --all to compare its runs", file=sys.stderr)
            return 2
        try:
            runs = children(client, parent)
        except Exception:
            print(f"Error: --parent {parent}: no such run at {uri}", file=sys.stderr)
            return 2
    out = Path(args.out or f"outputs/compare/{parent or args.experiment}")
    comparison = compare_runs(client, runs, out, parent_id=parent)
    print(comparison.summary())
    print(f"wrote {comparison.png}, {comparison.markdown}, {comparison.csv} and {comparison.runs_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
