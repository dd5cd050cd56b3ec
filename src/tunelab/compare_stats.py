"""The statistics of a comparison: runs grouped into configurations by their swept values, each one's
n, mean, standard deviation and 95 % interval, the ranking, and each configuration tested against
the winner (RULE)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

METRIC = "val/acc"
#: The accuracy on the test split, logged once at the end of a run for the weights `monitor` chose:
#: reported beside the validation, never used to rank.
TEST_METRIC = "test/acc"
#: Override keys that repeat a configuration instead of making a new one.
REPEAT_KEYS = ("seed", "data.fold")
ALPHA = 0.05
RULE = (f"each configuration's best {METRIC} is compared with the winner's by a paired t-test over runs with the same "
        f"seed and fold (when at least 2 pairs match), otherwise by Welch's t-test (when both have n >= 2); "
        f"distinguishable when p < {ALPHA}")
NOT_DISTINGUISHABLE = "not distinguishable"
#: The verdict where neither test applies (one run on a side, and fewer than 2 matching pairs).
TOO_FEW = "too few runs to tell"


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
    #: test/acc; NaN when the run logged none (trainer.test=false, or a run from before the test split).
    test_acc: float = math.nan
    curve: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "FINISHED" and not math.isnan(self.best)

    @property
    def optimism(self) -> float:
        """Best val/acc minus test/acc: how much the validation the run was chosen on overstates the test; NaN
        without a test/acc."""
        return self.best - self.test_acc

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

    @property
    def test_acc(self) -> Stats:
        """test/acc over the finished runs that logged one; n=0 when none did."""
        return describe([r.test_acc for r in self._with_test])

    @property
    def optimism(self) -> float:
        """The mean of best val/acc minus test/acc over the finished runs that logged a test/acc; NaN when none did."""
        runs = self._with_test
        return float(np.mean([r.optimism for r in runs])) if runs else math.nan

    @property
    def _with_test(self) -> list[Row]:
        return [r for r in self.finished if not math.isnan(r.test_acc)]


def swept_keys(rows: list[Row]) -> list[str]:
    """Overridden keys whose value differs between runs, scheduler and freeze first; not the repeat keys."""
    keys = {k for r in rows for k in r.overrides if k not in REPEAT_KEYS}
    return sorted((k for k in keys if len({r.value(k) for r in rows}) > 1), key=swept_order)


def swept_order(key: str) -> tuple[int, str]:
    """The order of swept keys in labels and columns: scheduler, freeze, freeze.depth, then by name."""
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
        return math.nan, "", TOO_FEW
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

