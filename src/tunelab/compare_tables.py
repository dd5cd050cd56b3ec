"""The comparison's tables: comparison.csv (one row per configuration), comparison_runs.csv (one row
per run) and comparison.md."""

from __future__ import annotations

import csv
import math

from tunelab.compare_report import Comparison, Report, ranked_separately, runs_text
from tunelab.compare_stats import ALPHA, METRIC, NOT_DISTINGUISHABLE, RULE, TEST_METRIC, Stats

HOW_TO_READ = (
    f"How to read: one row per configuration over its repeats (seeds, folds), n = its finished runs; mean ± 95 % CI = "
    f"mean ± t(0.975, n-1) · sd / √n (no sd or interval with n=1); p compares its best {METRIC} with the winner's "
    f"(paired t-test over matching seed and fold, else Welch's t-test; alpha {ALPHA}). *{NOT_DISTINGUISHABLE}*: the "
    f"difference is within the noise between repeats; more seeds or folds may separate them, otherwise treat them as "
    f"equally good. Configurations are ranked and tested on validation only; {TEST_METRIC} is the accuracy on the test "
    f"split (which nothing was chosen on) of the weights each run chose on validation: the number to report. "
    f"Optimism: the mean over the runs of best {METRIC} minus {TEST_METRIC}, how much the validation the choice was "
    f"made on overstates the test. Blank where no run logged {TEST_METRIC} (trainer.test=false, or older runs). "
    f"One row per run: comparison_runs.csv."
)


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
              f"{TEST_METRIC} n", *(f"{TEST_METRIC} {s}" for s in stat_names), "optimism",
              "difference to winner", "p vs winner", "test", "verdict", "failed", "run_ids"]
    with open(comparison.csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for report in comparison.reports:
            for c in report.configs:
                best, final, held_out = c.best, c.final, c.test_acc
                writer.writerow([*_data_cells(comparison, report), c.rank or "", *(c.values.get(k, "") for k in swept), best.n,
                                 *(_fmt(v, 6) for v in (best.mean, best.sd, best.ci_low, best.ci_high)),
                                 *(_fmt(v, 6) for v in (final.mean, final.sd, final.ci_low, final.ci_high)),
                                 held_out.n or "", *(_fmt(v, 6) for v in (held_out.mean, held_out.sd, held_out.ci_low, held_out.ci_high)),
                                 _fmt(c.optimism, 6),
                                 _fmt(best.mean - report.top, 6), "" if math.isnan(c.p) else f"{c.p:.4g}", c.test, c.verdict,
                                 len(c.failed), " ".join(r.run_id for r in c.runs)])


def _write_runs_csv(comparison: Comparison) -> None:
    swept = comparison.swept
    header = [*_data_column(comparison), "rank", *swept, "seed", "fold", f"best {METRIC}",
              f"final {METRIC}", TEST_METRIC, "optimism", "best val/loss", "epochs", "seconds", "status", "error", "run_id"]
    with open(comparison.runs_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for report in comparison.reports:
            for c in report.configs:
                for r in c.finished + c.failed:
                    writer.writerow([*_data_cells(comparison, report), c.rank if r.ok else "", *(c.values.get(k, "") for k in swept),
                                     r.seed, r.fold, _fmt(r.best), _fmt(r.final), _fmt(r.test_acc), _fmt(r.optimism), _fmt(r.best_loss), r.epochs,
                                     f"{r.seconds:.1f}", r.status, r.error, r.run_id])


def _markdown(comparison: Comparison) -> list[str]:
    """comparison.md's lines: the summary, how to read it and the tables; one section per data set when there are several."""
    reports = comparison.reports
    if len(reports) == 1:
        return [reports[0].summary().replace("\n", "\n\n"), "", HOW_TO_READ, "", *_md_tables(reports[0])]
    lines = [f"{ranked_separately(len(reports))}: one section per data set below, each named by the data settings that "
             f"differ between them, each with its own winner.", "", f"Rule: {RULE}.", "", HOW_TO_READ]
    for report in reports:
        lines += ["", f"## {report.data} ({runs_text(report)})", "", report.summary(rule=False).replace("\n", "\n\n"), "",
                  *_md_tables(report)]
    return lines


def _md_tables(report: Report) -> list[str]:
    """One data set's table of configurations, and its failed runs."""
    keys = report.swept or ["configuration"]  # with no swept key, the one configuration's overrides
    table = ["rank", *keys, "n", f"best {METRIC} (mean ± 95 % CI)", "sd", f"final {METRIC} (mean ± 95 % CI)", "sd",
             f"{TEST_METRIC} (mean ± 95 % CI)", "sd", "optimism", "vs winner", "p", "t-test", "verdict", "failed"]
    lines = [_md_row(table), "|" + "---|" * len(table)]
    for c in report.configs:
        best, final = c.best, c.final
        lines.append(_md_row([str(c.rank or ""), *(list(c.values.values()) or [report.label(c)]), str(best.n), _interval_cell(best), _fmt(best.sd),
                              _interval_cell(final), _fmt(final.sd), _test_cell(c), _fmt(c.test_acc.sd), _signed(c.optimism),
                              _signed(best.mean - report.top) if c.rank else "",
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


def _test_cell(config) -> str:
    """The mean test/acc ± its interval, with its n where fewer runs logged one than finished."""
    held_out = config.test_acc
    if not held_out.n:
        return ""
    return _interval_cell(held_out) + (f" (n={held_out.n})" if held_out.n != config.best.n else "")


def _signed(value: float) -> str:
    return "" if math.isnan(value) else f"{value:+.4f}"


def _fmt(value: float, digits: int = 4) -> str:
    return "" if math.isnan(value) else f"{value:.{digits}f}"


