"""What a comparison found: per data set, the ranked configurations and the summary in words; for all
data sets together, the files written for them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tunelab.compare_stats import (METRIC, NOT_DISTINGUISHABLE, REPEAT_KEYS, RULE, TEST_METRIC, TOO_FEW, Config, Row, Stats,
                                   swept_order)


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
        """The winner on val and on test, how it relates to the others and the failed runs; with the test's rule
        unless `rule` is False."""
        ranked = self.ranked()
        failed = [(c, r) for c in self.configs for r in c.failed]
        if not ranked:
            text = f"No run finished ({len(failed)} failed)."
        else:
            win = ranked[0]
            text = f"Winner: {self.label(win)}  mean best {METRIC} {_mean_and_interval(win.best)} on val; {_test_text(win)}"
            if len(ranked) == 1:
                text += "; one configuration only: not distinguishable against itself, nothing else to compare it with"
            else:
                text += "; " + self._versus_text(ranked[1])
            others = others_text(ranked)
            if others:
                text += "\n" + others
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
        return f"{gap:.4f} ahead of {name}, {TOO_FEW} whether that is more than noise"


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
        return sorted({key for report in self.reports for key in report.swept}, key=swept_order)

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
        lines = [f"{ranked_separately(len(self.reports))}:"]
        for report in self.reports:
            lines.append(f"{report.data} ({runs_text(report)}):")
            lines += ["  " + line for line in report.summary(rule=False).splitlines()]
        return "\n".join([*lines, f"Rule: {RULE}."])


def ranked_separately(count: int) -> str:
    """The heading of a comparison of runs on `count` data sets (summary, comparison.md, the figure)."""
    return f"Runs on {count} different data sets are ranked separately (accuracies on different data are not comparable)"


def runs_text(report: Report) -> str:
    """"1 run", "3 runs": how many runs a data set has, for its heading."""
    return f"{len(report.rows)} run" + ("s" if len(report.rows) != 1 else "")


#: What to add to a sweep so that its configurations can be tested against each other.
REPEAT_HINT = "repeat each configuration over seeds (add `seed=0,1,2` to the sweep, e.g. `./multirun.sh seed=0,1,2`)"


def others_text(ranked: list[Config]) -> str:
    """How many of the configurations after the winner are within the noise of it, and how many could not be
    tested; "" when the line on the runner-up says all there is (two configurations, both tested)."""
    others = ranked[1:]
    untested = sum(c.verdict == TOO_FEW for c in others)
    close = sum(c.verdict == NOT_DISTINGUISHABLE for c in others)
    if not others or (len(others) == 1 and not untested):
        return ""
    if not untested:
        return f"{close} of the {len(others)} other configurations are {NOT_DISTINGUISHABLE} from the winner."
    if all(c.best.n == 1 for c in ranked):
        return (f"No difference can be tested with one run per configuration ({len(ranked)} configurations, one run "
                f"each): {REPEAT_HINT} to tell which differences are more than noise.")
    if ranked[0].best.n == 1:
        return f"No difference can be tested: the winner has one finished run; {REPEAT_HINT}."
    tested = len(others) - untested
    if not tested:
        return f"None of the {len(others)} other configurations can be tested against the winner: one run each; {REPEAT_HINT}."
    return (f"{close} of the {tested} other configurations that could be tested are {NOT_DISTINGUISHABLE} from the "
            f"winner; {untested} could not be tested: one run each ({REPEAT_HINT}).")


def _test_text(config: Config) -> str:
    """The configuration's mean test/acc with its interval (its n when that differs from the validation's), or that
    there is none."""
    held_out, best = config.test_acc, config.best
    if not held_out.n:
        return f"no {TEST_METRIC} logged"
    if held_out.n == best.n >= 2:
        return f"{held_out.mean:.4f} ± {held_out.half_width:.4f} on test"
    return f"{_mean_and_interval(held_out)} on test"


def _p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def _mean_and_interval(s: Stats) -> str:
    if s.n < 2:
        return f"{s.mean:.4f} (n=1, no interval)"
    return f"{s.mean:.4f} ± {s.half_width:.4f} (95 % CI, n={s.n})"


