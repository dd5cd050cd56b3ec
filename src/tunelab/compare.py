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
interval (Student t) of the best and the final val/acc; configurations are ranked by their mean best
val/acc, and each one is tested against the winner (see RULE).

Writes comparison.csv (one row per configuration), comparison_runs.csv (one row per run),
comparison.md and comparison.png (LR curves per scheduler, mean validation accuracy per epoch, a heat
map of the mean best validation accuracy over the two swept keys, and the ranking with its
intervals; one block of these per data set) to the output folder and, for a sweep, logs them to the
parent run. Made automatically at the end of every `-m` sweep.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
from scipy import stats

log = logging.getLogger(__name__)

METRIC = "val/acc"
#: Override keys that repeat a configuration instead of making a new one.
REPEAT_KEYS = ("seed", "data.fold")
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
    "data.batch_size", "data.num_workers", "data.fold", "data.dataset.augment", "data.dataset.max_train_samples",
    "data.dataset.skip_bad_files", "data.dataset.download",
)
#: The image size a run actually used (the configured one may be raised to the model's minimum).
RESOLVED_IMAGE_SIZE = "resolved.data.image_size"
ALPHA = 0.05
RULE = (f"each configuration's best {METRIC} is compared with the winner's by a paired t-test over runs with the same "
        f"seed and fold (when at least 2 pairs match), otherwise by Welch's t-test (when both have n >= 2); "
        f"distinguishable when p < {ALPHA}")
NOT_DISTINGUISHABLE = "not distinguishable"
HOW_TO_READ = (
    f"How to read: one row per configuration over its repeats (seeds, folds), n = its finished runs; mean ± 95 % CI = "
    f"mean ± t(0.975, n-1) · sd / √n (no sd or interval with n=1); p compares its best {METRIC} with the winner's "
    f"(paired t-test over matching seed and fold, else Welch's t-test; alpha {ALPHA}). *{NOT_DISTINGUISHABLE}*: the "
    f"difference is within the noise between repeats; more seeds or folds may separate them, otherwise treat them as "
    f"equally good. One row per run: comparison_runs.csv."
)


@dataclass
class Row:
    """One run of the comparison."""

    run_id: str
    name: str
    status: str
    overrides: dict[str, str]
    seed: str
    fold: str
    best: float
    final: float
    best_loss: float
    epochs: int
    seconds: float
    error: str
    curve: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "FINISHED" and not math.isnan(self.best)

    def value(self, key: str) -> str:
        """The run's value of a config key: its logged param or group tag, else its override."""
        return self.settings.get(key, self.overrides.get(key, ""))


@dataclass
class Stats:
    """n, mean, sample standard deviation and 95 % interval of some values; NaN where n is too small."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2


def describe(values: list[float]) -> Stats:
    """mean ± t(0.975, n-1) * sd / sqrt(n); sd with ddof=1. One value has no sd and no interval."""
    n = len(values)
    if n == 0:
        return Stats(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(np.mean(values))
    if n == 1:
        return Stats(1, mean, math.nan, math.nan, math.nan)
    sd = float(np.std(values, ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return Stats(n, mean, sd, mean - half, mean + half)


@dataclass
class Config:
    """The runs of one configuration: the same values of the swept keys."""

    values: dict[str, str]
    runs: list[Row]
    rank: int | None = None
    p: float = math.nan
    test: str = ""
    verdict: str = ""

    @property
    def finished(self) -> list[Row]:
        return [r for r in self.runs if r.ok]

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.runs if not r.ok]

    @property
    def best(self) -> Stats:
        return describe([r.best for r in self.finished])

    @property
    def final(self) -> Stats:
        return describe([r.final for r in self.finished])


@dataclass
class Report:
    """The comparison of the runs on one data set."""

    rows: list[Row]
    swept: list[str]
    configs: list[Config]
    #: The data set's label: the data keys whose values differ from the other data sets' ("" when there is one).
    data: str = ""

    def ranked(self) -> list[Config]:
        return [c for c in self.configs if c.rank is not None]

    @property
    def top(self) -> float:
        """The winner's mean best val/acc; NaN when no run finished."""
        ranked = self.ranked()
        return ranked[0].best.mean if ranked else math.nan

    def label(self, config: Config) -> str:
        if self.swept:
            return ", ".join(f"{k}={config.values[k]}" for k in self.swept)
        fixed = {k: v for k, v in config.runs[0].overrides.items() if k not in REPEAT_KEYS}
        return " ".join(f"{k}={v}" for k, v in fixed.items()) or "(no overrides)"

    def run_label(self, config: Config, row: Row) -> str:
        """The configuration's label, with the run's seed and fold when the configuration was repeated."""
        repeat = ", ".join(f"{k}={v}" for k, v in (("seed", row.seed), ("fold", row.fold)) if v)
        return self.label(config) + (f" ({repeat})" if repeat and len(config.runs) > 1 else "")

    def summary(self, rule: bool = True) -> str:
        """The winner, how it relates to the others and the failed runs; with the test's rule unless `rule` is False."""
        ranked = self.ranked()
        failed = [(c, r) for c in self.configs for r in c.failed]
        if not ranked:
            text = f"No run finished ({len(failed)} failed)."
        else:
            win = ranked[0]
            text = f"Winner: {self.label(win)}  mean best {METRIC} {_mean_and_interval(win.best)}"
            if len(ranked) == 1:
                text += "; one configuration only: not distinguishable against itself, nothing else to compare it with"
            else:
                text += "; " + self._versus_text(ranked[1])
            if len(ranked) > 2:
                close = sum(c.verdict == NOT_DISTINGUISHABLE for c in ranked[1:])
                text += f"\n{close} of the {len(ranked) - 1} other configurations are {NOT_DISTINGUISHABLE} from the winner."
            if rule:
                text += f"\nRule: {RULE}."
        if failed:
            text += f"\n{len(failed)} of {len(self.rows)} runs failed: " + "; ".join(f"{self.run_label(c, r)}: {r.error or r.status}" for c, r in failed)
        return text

    def _versus_text(self, other: Config) -> str:
        """How the winner relates to `other`, in words."""
        name, gap = self.label(other), self.top - other.best.mean
        if other.verdict == NOT_DISTINGUISHABLE:
            return f"{NOT_DISTINGUISHABLE} from {name} ({gap:.4f} ahead, {other.test}, {_p_text(other.p)})"
        if other.verdict == "distinguishable":
            return f"distinguishable from {name}, {gap:.4f} ahead ({other.test}, {_p_text(other.p)})"
        return f"{gap:.4f} ahead of {name}, too few runs to tell whether that is more than noise"


@dataclass
class Comparison:
    """The reports of the data sets the runs were on (usually one) and the files written for them.

    With one data set its attributes are that report's; with several, the rows, configurations and
    swept keys of all of them.
    """

    reports: list[Report]
    csv: Path
    runs_csv: Path
    markdown: Path
    png: Path

    @property
    def rows(self) -> list[Row]:
        return [row for report in self.reports for row in report.rows]

    @property
    def configs(self) -> list[Config]:
        return [config for report in self.reports for config in report.configs]

    @property
    def swept(self) -> list[str]:
        return sorted({key for report in self.reports for key in report.swept}, key=_swept_order)

    @property
    def main(self) -> Report:
        """The data set with the most runs (the first of those): the one a sweep's parent run reports."""
        return max(self.reports, key=lambda report: len(report.rows))

    def ranked(self) -> list[Config]:
        return [config for report in self.reports for config in report.ranked()]

    def label(self, config: Config) -> str:
        return next(report for report in self.reports if any(c is config for c in report.configs)).label(config)

    def summary(self) -> str:
        if len(self.reports) == 1:
            return self.reports[0].summary()
        lines = [f"{_separately(len(self.reports))}:"]
        for report in self.reports:
            lines.append(f"{report.data} ({_runs_text(report)}):")
            lines += ["  " + line for line in report.summary(rule=False).splitlines()]
        return "\n".join([*lines, f"Rule: {RULE}."])


def _separately(count: int) -> str:
    return f"Runs on {count} different data sets are ranked separately (accuracies on different data are not comparable)"


def _runs_text(report: Report) -> str:
    return f"{len(report.rows)} run" + ("s" if len(report.rows) != 1 else "")


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
    parent = client.get_run(parent_id)
    return client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        order_by=["attributes.start_time ASC"], max_results=5000,
    )


def _row(client, run) -> Row:
    from tunelab.tracking import GROUPS

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
        error=run.data.tags.get("tunelab.error", ""),
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
    for r in rows:
        sets.setdefault(tuple(sorted(data_identity(r).items())), []).append(r)
    if len(sets) <= 1:
        return [("", rows)]
    identities = [dict(identity) for identity in sets]
    differing = sorted(k for k in {k for i in identities for k in i} if len({i.get(k) for i in identities}) > 1)

    def label(identity: dict[str, str]) -> str:
        return " ".join(f"{k}={identity[k]}" for k in differing if k in identity) or "(no data params logged)"

    return [(label(identity), set_rows) for identity, set_rows in zip(identities, sets.values())]


def swept_keys(rows: list[Row]) -> list[str]:
    """Overridden keys whose value differs between runs, scheduler and freeze first; not the repeat keys."""
    keys = {k for r in rows for k in r.overrides if k not in REPEAT_KEYS}
    return sorted((k for k in keys if len({r.value(k) for r in rows}) > 1), key=_swept_order)


def _swept_order(key: str) -> tuple[int, str]:
    return {"scheduler": 0, "freeze": 1, "freeze.depth": 2}.get(key, 9), key


def group(rows: list[Row], swept: list[str]) -> list[Config]:
    """One Config per combination of swept values, in the order the runs started."""
    configs: dict[tuple, Config] = {}
    for r in rows:
        values = {k: r.value(k) for k in swept}
        configs.setdefault(tuple(values.values()), Config(values, [])).runs.append(r)
    return list(configs.values())


def rank(configs: list[Config]) -> list[Config]:
    """Rank by mean best val/acc and test each configuration against the winner; those with no
    finished run come last, unranked."""
    ranked = sorted((c for c in configs if c.finished), key=lambda c: -c.best.mean)
    for i, config in enumerate(ranked, start=1):
        config.rank = i
    if len(ranked) == 1:
        ranked[0].verdict = f"{NOT_DISTINGUISHABLE} (one configuration only)"
    elif ranked:
        ranked[0].verdict = "winner"
        for config in ranked[1:]:
            config.p, config.test, config.verdict = versus(ranked[0], config)
    unfinished = [c for c in configs if not c.finished]
    for config in unfinished:
        config.verdict = "no finished run"
    return ranked + unfinished


def versus(winner: Config, other: Config) -> tuple[float, str, str]:
    """p-value, test and verdict for `other`'s best val/acc against the winner's (RULE).

    A spread of zero leaves t undefined (0/0) or infinite: p is then 1 when the values are equal
    and 0 when they are not, instead of scipy's NaN.
    """
    pairs = _pairs(winner, other)
    a, b = [r.best for r in winner.finished], [r.best for r in other.finished]
    if len(pairs) >= 2:
        differences = [x - y for _, x, y in pairs]
        if np.ptp(differences) == 0:
            p = 1.0 if differences[0] == 0 else 0.0
        else:
            p = float(stats.ttest_rel([x for _, x, _ in pairs], [y for _, _, y in pairs]).pvalue)
        test = f"paired t-test over {len(pairs)} {_pairs_word([key for key, _, _ in pairs])}"
    elif len(a) >= 2 and len(b) >= 2:
        if np.ptp(a) == 0 and np.ptp(b) == 0:
            p = 1.0 if a[0] == b[0] else 0.0
        else:
            p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
        test = "Welch's t-test"
    else:
        return math.nan, "", "too few runs to tell"
    return p, test, "distinguishable" if p < ALPHA else NOT_DISTINGUISHABLE


def _pairs(winner: Config, other: Config) -> list[tuple[tuple[str, str], float, float]]:
    """((seed, fold), winner's best, other's best) for each repeat both finished; none when a
    (seed, fold) occurs twice within one configuration, since the pairing is then ambiguous."""
    mine = {(r.seed, r.fold): r.best for r in winner.finished}
    theirs = {(r.seed, r.fold): r.best for r in other.finished}
    if len(mine) < len(winner.finished) or len(theirs) < len(other.finished):
        return []
    return [(key, mine[key], theirs[key]) for key in mine if key in theirs]


def _pairs_word(keys: list[tuple[str, str]]) -> str:
    seeds, folds = len({seed for seed, _ in keys}), len({fold for _, fold in keys})
    if seeds > 1 and folds > 1:
        return "seed/fold pairs"
    return "folds" if folds > 1 else "seeds"


def _fmt(value: float, digits: int = 4) -> str:
    return "" if math.isnan(value) else f"{value:.{digits}f}"


def _p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def _mean_and_interval(s: Stats) -> str:
    if s.n < 2:
        return f"{s.mean:.4f} (n=1, no interval)"
    return f"{s.mean:.4f} ± {s.half_width:.4f} (95 % CI, n={s.n})"


def write_tables(comparison: Comparison) -> None:
    """comparison.csv (one row per configuration), comparison_runs.csv (one row per run) and comparison.md;
    with runs on several data sets, a leading `data` column and one section of comparison.md per data set."""
    _write_configs_csv(comparison)
    _write_runs_csv(comparison)
    comparison.markdown.write_text("\n".join(_markdown(comparison)) + "\n")


def _data_column(comparison: Comparison) -> list[str]:
    """The leading `data` column's header, when the runs were on several data sets."""
    return ["data"] if len(comparison.reports) > 1 else []


def _data_cells(comparison: Comparison, report: Report) -> list[str]:
    """The `data` column's cell, when the runs were on several data sets."""
    return [report.data] if len(comparison.reports) > 1 else []


def _write_configs_csv(comparison: Comparison) -> None:
    stat_names = ("mean", "sd", "ci_low", "ci_high")
    swept = comparison.swept
    header = [*_data_column(comparison), "rank", *swept, "n",
              *(f"best {METRIC} {s}" for s in stat_names), *(f"final {METRIC} {s}" for s in stat_names),
              "difference to winner", "p vs winner", "test", "verdict", "failed", "run_ids"]
    with open(comparison.csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for report in comparison.reports:
            for c in report.configs:
                best, final = c.best, c.final
                writer.writerow([*_data_cells(comparison, report), c.rank or "", *(c.values.get(k, "") for k in swept), best.n,
                                 *(_fmt(v, 6) for v in (best.mean, best.sd, best.ci_low, best.ci_high)),
                                 *(_fmt(v, 6) for v in (final.mean, final.sd, final.ci_low, final.ci_high)),
                                 _fmt(best.mean - report.top, 6), "" if math.isnan(c.p) else f"{c.p:.4g}", c.test, c.verdict,
                                 len(c.failed), " ".join(r.run_id for r in c.runs)])


def _write_runs_csv(comparison: Comparison) -> None:
    swept = comparison.swept
    header = [*_data_column(comparison), "rank", *swept, "seed", "fold", f"best {METRIC}",
              f"final {METRIC}", "best val/loss", "epochs", "seconds", "status", "error", "run_id"]
    with open(comparison.runs_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for report in comparison.reports:
            for c in report.configs:
                for r in c.finished + c.failed:
                    writer.writerow([*_data_cells(comparison, report), c.rank if r.ok else "", *(c.values.get(k, "") for k in swept),
                                     r.seed, r.fold, _fmt(r.best), _fmt(r.final), _fmt(r.best_loss), r.epochs,
                                     f"{r.seconds:.1f}", r.status, r.error, r.run_id])


def _markdown(comparison: Comparison) -> list[str]:
    """comparison.md's lines: the summary, how to read it and the tables; one section per data set when there are several."""
    reports = comparison.reports
    if len(reports) == 1:
        return [reports[0].summary().replace("\n", "\n\n"), "", HOW_TO_READ, "", *_md_tables(reports[0])]
    lines = [f"{_separately(len(reports))}: one section per data set below, each named by the data settings that "
             f"differ between them, each with its own winner.", "", f"Rule: {RULE}.", "", HOW_TO_READ]
    for report in reports:
        lines += ["", f"## {report.data} ({_runs_text(report)})", "", report.summary(rule=False).replace("\n", "\n\n"), "",
                  *_md_tables(report)]
    return lines


def _md_tables(report: Report) -> list[str]:
    """One data set's table of configurations, and its failed runs."""
    keys = report.swept or ["configuration"]  # with no swept key, the one configuration's overrides
    table = ["rank", *keys, "n", f"best {METRIC} (mean ± 95 % CI)", "sd", f"final {METRIC} (mean ± 95 % CI)", "sd",
             "vs winner", "p", "test", "verdict", "failed"]
    lines = [_md_row(table), "|" + "---|" * len(table)]
    for c in report.configs:
        best, final = c.best, c.final
        lines.append(_md_row([str(c.rank or ""), *(list(c.values.values()) or [report.label(c)]), str(best.n), _interval_cell(best), _fmt(best.sd),
                              _interval_cell(final), _fmt(final.sd), _signed(best.mean - report.top) if c.rank else "",
                              "" if math.isnan(c.p) else f"{c.p:.3g}", c.test, c.verdict, str(len(c.failed))]))
    failed = [(c, r) for c in report.configs for r in c.failed]
    if failed:
        lines += ["", "Failed runs:", "", _md_row([*report.swept, "seed", "fold", "status", "error", "run_id"]), "|" + "---|" * (len(report.swept) + 5)]
        lines += [_md_row([*c.values.values(), r.seed, r.fold, r.status, r.error, r.run_id]) for c, r in failed]
    return lines


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |"


def _interval_cell(s: Stats) -> str:
    if s.n < 2:
        return _fmt(s.mean)
    return f"{s.mean:.4f} ± {s.half_width:.4f} [{s.ci_low:.4f}, {s.ci_high:.4f}]"


def _signed(value: float) -> str:
    return "" if math.isnan(value) else f"{value:+.4f}"


def figure(comparison: Comparison):
    """comparison.png's figure: the four panels of `draw`, one block of them per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = comparison.reports
    fig = plt.figure(figsize=(15, 10.5 * len(reports)), layout="constrained")
    if len(reports) == 1:
        draw(reports[0], fig)
        return fig
    fig.suptitle(f"{_separately(len(reports))}:", fontsize=14, fontweight="bold")
    for i, (report, block) in enumerate(zip(reports, fig.subfigures(len(reports), 1))):
        block.set_facecolor("0.94" if i % 2 else "white")
        draw(report, block, heading=f"{report.data} ({_runs_text(report)})")
    return fig


def draw(report: Report, fig, heading: str = ""):
    """One data set's panels on `fig` (a figure or a subfigure): LR curves, mean val/acc per epoch, the
    heat map over the two swept keys and the ranking; its title says who won, under `heading` if given."""
    import matplotlib.pyplot as plt

    swept, configs = report.swept, report.configs
    ax_lr, ax_acc, ax_heat, ax_rank = fig.subplots(2, 2).flat
    key_a = swept[0] if swept else None
    key_b = swept[1] if len(swept) > 1 else None
    values_a = sorted({c.values.get(key_a, "") for c in configs}, key=_sort_key) if key_a else [""]
    values_b = sorted({c.values.get(key_b, "") for c in configs}, key=_sort_key) if key_b else [""]
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(values_a)}

    def color(config: Config):
        return colors[config.values.get(key_a, "")] if key_a else "C0"

    _lr_panel(ax_lr, report.rows, key_a, colors)
    _accuracy_panel(ax_acc, report, key_a, values_a, key_b, values_b, colors, color)
    _heat_panel(fig, ax_heat, configs, key_a, values_a, key_b, values_b)
    _ranking_panel(ax_rank, report, color)
    title = report.summary().splitlines()[0].replace("; ", ";\n", 1)
    fig.suptitle(f"{heading}\n{title}" if heading else title, fontsize=12)
    return fig


STYLES = ["-", "--", ":", "-."]


def _lr_panel(ax, rows: list[Row], key_a: str | None, colors: dict) -> None:
    """One LR curve per value of the first swept key (the scheduler, in a scheduler sweep)."""
    shown = set()
    for r in rows:
        va = r.value(key_a) if key_a else ""
        if r.lrs and va not in shown:
            ax.plot(r.lrs, color=colors[va], label=f"{key_a}={va}" if key_a else r.name)
            shown.add(va)
    ax.set(title="Learning rate per optimizer step", xlabel="optimizer step", ylabel="lr")
    if shown:
        ax.legend(fontsize=8)


def _accuracy_panel(ax, report: Report, key_a: str | None, values_a: list[str], key_b: str | None, values_b: list[str],
                    colors: dict, color) -> None:
    """Mean val/acc per epoch of each configuration: color by the first swept key, line style by the second."""
    for c in report.configs:
        curves = [r.curve for r in c.finished if r.curve]
        if not curves:
            continue
        padded = np.full((len(curves), max(map(len, curves))), np.nan)
        for i, curve in enumerate(curves):
            padded[i, :len(curve)] = curve
        epochs = np.arange(padded.shape[1])
        style = STYLES[values_b.index(c.values.get(key_b, "")) % len(STYLES)] if key_b else "-"
        ax.plot(epochs, np.nanmean(padded, axis=0), color=color(c), linestyle=style, marker="o", markersize=3,
                label=f"{report.label(c)} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(epochs, np.nanmin(padded, axis=0), np.nanmax(padded, axis=0), color=color(c), alpha=0.15)
    ax.set(title=f"Mean {METRIC} per epoch (band: min..max over the repeats)", xlabel="epoch", ylabel=METRIC)
    if len(report.configs) <= 8:  # two columns unless the names are long (a weights path, say)
        ax.legend(fontsize=7, ncol=2 if max((len(line.get_label()) for line in ax.get_lines()), default=0) <= 48 else 1)
    elif key_a:  # many lines: name the colors and the line styles once instead of every line
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=colors[v], label=f"{key_a}={v}") for v in values_a]
        if key_b:
            handles += [Line2D([], [], color="0.3", linestyle=STYLES[i % len(STYLES)], label=f"{key_b}={v}") for i, v in enumerate(values_b)]
        ax.legend(handles=handles, fontsize=7, ncol=2, loc="lower right")


def _heat_panel(fig, ax, configs: list[Config], key_a: str | None, values_a: list[str], key_b: str | None,
                values_b: list[str]) -> None:
    """The mean best val/acc (± its 95 % half width) over the first swept key x the second; the best cell in bold."""
    grid = np.full((len(values_a), len(values_b)), np.nan)
    half = np.full_like(grid, np.nan)
    failed = np.zeros_like(grid, dtype=bool)
    for c in configs:
        i = values_a.index(c.values.get(key_a, "")) if key_a else 0
        j = values_b.index(c.values.get(key_b, "")) if key_b else 0
        best = c.best
        if best.n and (np.isnan(grid[i, j]) or best.mean > grid[i, j]):  # the better one where several share a cell
            grid[i, j], half[i, j] = best.mean, best.half_width
        failed[i, j] |= not best.n
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label=f"mean best {METRIC}")
    ax.set_xticks(range(len(values_b)), [_depth_label(key_b, v) for v in values_b],
                  rotation=15 if max(map(len, values_b)) > 12 else 0)  # long values (paths) would overlap
    ax.set_yticks(range(len(values_a)), values_a)
    ax.set(xlabel=key_b or "", ylabel=key_a or "", title=f"Mean best {METRIC} (± 95 % CI)" + (f": {key_a} x {key_b}" if key_b else ""))
    finite = grid[np.isfinite(grid)]
    best_cell = finite.max() if finite.size else None
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                weight = "bold" if grid[i, j] == best_cell else "normal"
                text_color = "black" if grid[i, j] > middle else "white"
                text = f"{grid[i, j]:.3f}" + (f"\n±{half[i, j]:.3f}" if np.isfinite(half[i, j]) else "")
                ax.text(j, i, text, ha="center", va="center", color=text_color, fontweight=weight, fontsize=9)
            elif failed[i, j]:
                ax.text(j, i, "failed", ha="center", va="center", color="red")


def _ranking_panel(ax, report: Report, color) -> None:
    """The 15 best configurations' mean best val/acc with its 95 % interval, the runs as dots."""
    ranked = report.ranked()[:15][::-1]
    if ranked:
        means = [c.best.mean for c in ranked]
        errors = [0.0 if math.isnan(c.best.half_width) else c.best.half_width for c in ranked]
        bars = ax.barh(range(len(ranked)), means, xerr=errors, capsize=3, color=[color(c) for c in ranked],
                       error_kw={"elinewidth": 1.2})
        marks = {NOT_DISTINGUISHABLE: " ≈", "too few runs to tell": " ?"}
        points = [means[0]]
        for y, (c, bar) in enumerate(zip(ranked, bars)):
            if c.verdict in marks:
                bar.set(hatch="//", alpha=0.45)
            dots = [r.best for r in c.finished]
            ax.scatter(dots, [y] * len(dots), color="black", s=12, zorder=3)
            right = max(c.best.mean + errors[y], *dots)
            ax.text(right, y, f" {c.best.mean:.4f} ({c.best.mean - report.top:+.4f}){marks.get(c.verdict, '')}", va="center", fontsize=8)
            points += [*dots, c.best.mean - errors[y], c.best.mean + errors[y]]
        low, high = min(points), max(points)
        ax.set_xlim(max(0.0, low - (high - low) * 0.5 - 0.01), high + (high - low) * 0.5 + 0.01)
        ax.set_yticks(range(len(ranked)), [report.label(c) for c in ranked])
    ax.set_title(f"Ranking by mean best {METRIC} (bars: 95 % CI, dots: runs)\n"
                 "hatched ≈: not distinguishable from the winner; ?: too few runs", fontsize=11)
    ax.set_xlabel(f"best {METRIC}")
    ax.tick_params(axis="y", labelsize=8)


def _sort_key(value: str):
    """Numbers ascending, negative ones (freeze depths counted from the head) after them, then text."""
    try:
        number = float(value)
    except ValueError:
        return (2, 0.0, value)
    return (0 if number >= 0 else 1, number, value)


def _depth_label(key: str | None, value: str) -> str:
    return f"{value} (head)" if key == "freeze.depth" and value == "-1" else value


def compare_runs(client, runs, out_dir: Path, parent_id: str | None = None) -> Comparison:
    """Build the tables and the figure for `runs`, ranking each data set's runs on their own; write them to
    `out_dir` and log them to the parent with the winner's mean best val/acc (metric `best_val/acc`) and
    its label (tag `tunelab.winner`)."""
    import matplotlib.pyplot as plt

    from tunelab.sweep import SWEEP_TAG
    from tunelab.tracking import KIND_TAG

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = [r for r in runs if r.data.tags.get(SWEEP_TAG) != "true" and r.data.tags.get(KIND_TAG) != "lr_find"]
    reports = []
    for data, rows in data_sets([_row(client, r) for r in trained]):
        swept = swept_keys(rows)
        reports.append(Report(rows, swept, rank(group(rows, swept)), data))
    comparison = Comparison(reports, out_dir / "comparison.csv", out_dir / "comparison_runs.csv",
                            out_dir / "comparison.md", out_dir / "comparison.png")
    write_tables(comparison)
    fig = figure(comparison)
    fig.savefig(comparison.png, dpi=110)
    plt.close(fig)
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
    return comparison


def main(argv: list[str] | None = None) -> int:
    from tunelab.sweep import SWEEP_TAG
    from tunelab.tracking import open_store, resolve_tracking_uri

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
    comparison = compare_runs(client, runs, out, parent_id=parent)
    print(comparison.summary())
    print(f"wrote {comparison.png}, {comparison.markdown}, {comparison.csv} and {comparison.runs_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
