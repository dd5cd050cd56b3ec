"""The comparison's statistics, on fabricated sweeps in a sqlite MLflow store: no training."""

from __future__ import annotations

import csv
import time

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.container import BarContainer
from mlflow import MlflowClient
from mlflow.entities import Metric
from scipy import stats

from conftest import metric_series
from tunelab import compare, compare_figure


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating one takes seconds); each test makes its own sweep."""
    root = tmp_path_factory.mktemp("store")
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.create_experiment("tunelab", artifact_location=(root / "artifacts").as_uri())
    return client, experiment


def _sweep(store, runs, tests=()):
    """A parent run and one child per (overrides, best val/acc per epoch, status) in `runs`; the i-th child logs
    test/acc `tests[i]` at its best epoch, as a run does at its end, where `tests` has a number for it."""
    client, experiment = store
    parent = client.create_run(experiment, tags={"tunelab.sweep": "true"}, run_name="sweep").info.run_id
    tests = list(tests) + [None] * (len(runs) - len(tests))
    for (overrides, curve, status), test in zip(runs, tests):
        tags = {"mlflow.parentRunId": parent, "overrides": overrides}
        if status == "FAILED":
            tags["tunelab.error"] = "ValueError: optimizer.lr=-1 must be positive"
        child = client.create_run(experiment, tags=tags, run_name=overrides).info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric("val/acc", value, now, epoch) for epoch, value in enumerate(curve)]
        metrics += [Metric("lr", 0.1 * 0.5 ** step, now, step) for step in range(6)]
        if test is not None:
            metrics.append(Metric("test/acc", test, now, int(np.argmax(curve))))
        client.log_batch(child, metrics=metrics)
        client.set_terminated(child, status)
    client.set_terminated(parent, "FINISHED")
    return client, parent


def _curve(best, final_drop=0.01):
    """Three epochs whose best is `best` and whose final value is `best - final_drop`."""
    return [best - 0.2, best, best - final_drop]


def _compare(store, runs, tmp_path, tests=()):
    client, parent = _sweep(store, runs, tests)
    report = compare.compare_runs(client, compare.children(client, parent), tmp_path, parent_id=parent)
    return client, parent, report


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _by(rows, key):
    return {row[key]: row for row in rows}


def _expected(values):
    """n, mean, sd (ddof=1) and the 95 % Student t interval, straight from numpy and scipy."""
    values = np.array(values)
    mean, sd = values.mean(), values.std(ddof=1)
    half = stats.t.ppf(0.975, len(values) - 1) * sd / np.sqrt(len(values))
    return {"mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half}


def _check_stats(client, row):
    """The row's statistics equal those of its finished runs' val/acc series, read back from MLflow."""
    series = [[v for _, v in metric_series(client, run_id, "val/acc")] for run_id in row["run_ids"].split()]
    finished = [s for s, run_id in zip(series, row["run_ids"].split()) if client.get_run(run_id).info.status == "FINISHED"]
    assert int(row["n"]) == len(finished)
    for which, values in (("best", [max(s) for s in finished]), ("final", [s[-1] for s in finished])):
        for stat, value in _expected(values).items():
            assert float(row[f"{which} val/acc {stat}"]) == pytest.approx(value, abs=1e-6), (which, stat)


SEEDS = [0, 1, 2]
COSINE = [0.95, 0.96, 0.955]
STEP = [0.90, 0.915, 0.90]  # below cosine on every seed
ONECYCLE = [0.97, 0.90, 0.93]  # above cosine on one seed, below on the others


def test_statistics_ranking_and_verdicts(store, tmp_path):
    runs = [(f"scheduler={name} seed={seed}", _curve(best, 0.01 * (seed + 1)), "FINISHED")
            for name, bests in (("step", STEP), ("cosine", COSINE), ("onecycle", ONECYCLE)) for seed, best in zip(SEEDS, bests)]
    runs.append(("scheduler=step seed=3", [0.5], "FAILED"))
    client, parent, report = _compare(store, runs, tmp_path)

    table = _read(tmp_path / "comparison.csv")
    assert list(table[0])[:3] == ["rank", "scheduler", "n"]  # seed is a repeat, not a swept key
    rows = _by(table, "scheduler")
    assert [row["scheduler"] for row in table] == ["cosine", "onecycle", "step"]
    for row in table:
        _check_stats(client, row)
    assert rows["cosine"]["verdict"] == "winner"
    assert rows["step"]["verdict"] == "distinguishable"
    assert float(rows["step"]["p vs winner"]) == pytest.approx(stats.ttest_rel(COSINE, STEP).pvalue, rel=1e-3)
    assert rows["step"]["test"] == "paired t-test over 3 seeds"
    assert rows["onecycle"]["verdict"] == "not distinguishable"
    assert float(rows["onecycle"]["p vs winner"]) == pytest.approx(stats.ttest_rel(COSINE, ONECYCLE).pvalue, rel=1e-3)
    assert (rows["step"]["failed"], rows["step"]["n"], len(rows["step"]["run_ids"].split())) == ("1", "3", 4)

    per_run = _read(tmp_path / "comparison_runs.csv")
    assert len(per_run) == 10 and {row["seed"] for row in per_run} == {"0", "1", "2", "3"}
    failed = [row for row in per_run if row["status"] == "FAILED"]
    assert len(failed) == 1 and failed[0]["rank"] == "" and "optimizer.lr=-1" in failed[0]["error"]

    summary = report.summary()
    assert summary.startswith("Winner: scheduler=cosine  mean best val/acc 0.9550 ± ")
    assert "; not distinguishable from scheduler=onecycle (" in summary.splitlines()[0]
    assert "paired t-test over 3 seeds" in summary.splitlines()[0]
    assert "1 of the 2 other configurations are not distinguishable from the winner" in summary
    assert "Rule:" in summary and "paired t-test" in summary and "0.05" in summary
    markdown = (tmp_path / "comparison.md").read_text()
    assert "1 of 10 runs failed" in markdown and "How to read" in markdown and "p < 0.05" in markdown

    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"comparison.csv", "comparison_runs.csv", "comparison.md", "comparison.png"} <= artifacts
    parent_run = client.get_run(parent)
    assert parent_run.data.metrics["best_val/acc"] == pytest.approx(np.mean(COSINE))
    assert parent_run.data.tags["tunelab.winner"] == "scheduler=cosine"


def test_identical_values_per_seed_are_not_distinguishable(store, tmp_path):
    runs = [(f"scheduler={name} seed={seed}", _curve(best), "FINISHED")
            for name in ("step", "cosine") for seed, best in zip(SEEDS, COSINE)]
    _, _, report = _compare(store, runs, tmp_path)
    table = _read(tmp_path / "comparison.csv")
    assert [row["verdict"] for row in table] == ["winner", "not distinguishable"]
    assert float(table[1]["p vs winner"]) == 1.0
    assert "not distinguishable from" in report.summary()


def test_constant_but_different_groups_are_told_apart(store, tmp_path):
    # no seed matches between the two, so Welch's test; both constant, so scipy alone would give NaN
    runs = [(f"scheduler=cosine seed={seed}", _curve(0.95), "FINISHED") for seed in (0, 1)]
    runs += [(f"scheduler=step seed={seed}", _curve(0.90), "FINISHED") for seed in (5, 6)]
    _compare(store, runs, tmp_path)
    step = _by(_read(tmp_path / "comparison.csv"), "scheduler")["step"]
    assert (step["test"], step["p vs winner"], step["verdict"]) == ("Welch's t-test", "0", "distinguishable")


def test_unmatched_seeds_use_welchs_test(store, tmp_path):
    cosine, step = [0.95, 0.94, 0.96], [0.93, 0.91]
    runs = [(f"scheduler=cosine seed={seed}", _curve(best), "FINISHED") for seed, best in zip((0, 1, 2), cosine)]
    runs += [(f"scheduler=step seed={seed}", _curve(best), "FINISHED") for seed, best in zip((3, 4), step)]
    client, _, _ = _compare(store, runs, tmp_path)
    table = _read(tmp_path / "comparison.csv")
    for row in table:
        _check_stats(client, row)
    step_row = _by(table, "scheduler")["step"]
    assert step_row["test"] == "Welch's t-test"
    assert float(step_row["p vs winner"]) == pytest.approx(stats.ttest_ind(cosine, step, equal_var=False).pvalue, rel=1e-3)


def test_one_configuration_over_seeds_is_not_distinguishable_against_itself(store, tmp_path):
    runs = [(f"scheduler=cosine seed={seed}", _curve(best), "FINISHED") for seed, best in zip(SEEDS, COSINE)]
    client, _, report = _compare(store, runs, tmp_path)
    table = _read(tmp_path / "comparison.csv")
    assert len(table) == 1 and "seed" not in table[0]
    _check_stats(client, table[0])
    assert table[0]["verdict"].startswith("not distinguishable")
    summary = report.summary()
    assert summary.startswith("Winner: scheduler=cosine  mean best val/acc 0.9550 ± ")
    assert "one configuration" in summary and "not distinguishable against itself" in summary


def test_folds_and_seeds_are_repeats_of_one_configuration(store, tmp_path):
    rng = np.random.default_rng(0)
    runs = [(f"freeze.depth={depth} data.folds=5 seed={seed} data.fold={fold}", _curve(base + rng.normal(0, 0.01)), "FINISHED")
            for depth, base in (("0", 0.95), ("2", 0.85)) for seed in (0, 1) for fold in (0, 1, 2)]
    client, _, _ = _compare(store, runs, tmp_path)
    table = _read(tmp_path / "comparison.csv")
    assert [row["freeze.depth"] for row in table] == ["0", "2"]
    assert [c for c in table[0] if c in ("seed", "data.fold", "data.folds", "freeze.depth")] == ["freeze.depth"]
    for row in table:
        _check_stats(client, row)
    assert table[0]["n"] == "6"
    assert (table[1]["test"], table[1]["verdict"]) == ("paired t-test over 6 seed/fold pairs", "distinguishable")
    per_run = _read(tmp_path / "comparison_runs.csv")
    assert sorted((row["seed"], row["fold"]) for row in per_run if row["freeze.depth"] == "2") == [
        (s, f) for s in "01" for f in "012"]


def test_single_runs_leave_the_statistics_blank(store, tmp_path):
    runs = [("scheduler=cosine", _curve(0.95), "FINISHED"), ("scheduler=step", _curve(0.93), "FINISHED"),
            ("scheduler=onecycle", [0.4], "FAILED")]
    _, _, report = _compare(store, runs, tmp_path)
    rows = _by(_read(tmp_path / "comparison.csv"), "scheduler")
    assert rows["step"]["n"] == "1" and float(rows["step"]["best val/acc mean"]) == pytest.approx(0.93)
    assert all(rows["step"][f"best val/acc {s}"] == "" for s in ("sd", "ci_low", "ci_high"))
    assert (rows["step"]["verdict"], rows["step"]["p vs winner"]) == ("too few runs to tell", "")
    assert (rows["onecycle"]["rank"], rows["onecycle"]["n"], rows["onecycle"]["failed"]) == ("", "0", "1")
    assert rows["onecycle"]["verdict"] == "no finished run"
    summary = report.summary()
    assert "0.9500 (n=1, no interval)" in summary and "too few runs to tell" in summary
    assert "1 of 3 runs failed: scheduler=onecycle" in summary
    assert (tmp_path / "comparison.png").stat().st_size > 20_000


def test_runs_outside_a_sweep_are_grouped_by_what_they_logged(store, tmp_path):
    """`--all`: a run that left a key at its default is the same configuration as one that set it
    to that value, and `false` typed on the command line matches the logged `False`."""
    client, experiment = store
    runs = []
    for overrides, scheduler, best in [("scheduler=cosine trainer.progress=false", "cosine", 0.95),
                                       ("freeze.depth=0", "cosine", 0.93),  # the cosine default, depth 0 set explicitly
                                       ("scheduler=step trainer.progress=False", "step", 0.90)]:
        run_id = client.create_run(experiment, tags={"overrides": overrides, "scheduler": scheduler}).info.run_id
        for key, value in (("freeze.depth", "0"), ("trainer.progress", "False"), ("seed", "42")):
            client.log_param(run_id, key, value)
        client.log_batch(run_id, metrics=[Metric("val/acc", v, 0, e) for e, v in enumerate(_curve(best))])
        client.set_terminated(run_id, "FINISHED")
        runs.append(client.get_run(run_id))
    report = compare.compare_runs(client, runs, tmp_path)
    assert report.swept == ["scheduler"]
    assert {report.label(c): c.best.n for c in report.configs} == {"scheduler=cosine": 2, "scheduler=step": 1}


def _logged_run(client, experiment, overrides, best, params, data="digits"):
    """A finished run like one train.py logs: its overrides, `data` tag, params and val/acc."""
    run_id = client.create_run(experiment, tags={"overrides": overrides, "data": data}, run_name=overrides).info.run_id
    client.log_batch(run_id, metrics=[Metric("val/acc", v, 0, e) for e, v in enumerate(_curve(best))])
    for key, value in params.items():
        client.log_param(run_id, key, value)
    client.set_terminated(run_id, "FINISHED")
    return client.get_run(run_id)


#: What the digits runs log of their data (and freeze depth, weights) when left at the defaults.
DIGITS = {"data.dataset.classes": "None", "data.dataset.max_train_samples": "None", "data.dataset.val_fraction": "0.2",
          "data.batch_size": "64", "data.image_size": "32", "data.folds": "None", "data.fold": "0",
          "data.num_workers": "None", "freeze.depth": "0", "model.weights_path": "None"}
PRETRAIN = {**DIGITS, "data.dataset.classes": "[0, 1, 2, 3, 4]"}
FINETUNE = {**DIGITS, "data.dataset.classes": "[5, 6, 7, 8, 9]", "data.dataset.max_train_samples": "50",
            "data.batch_size": "10", "model.weights_path": "outputs/transfer/pretrain/last.pt"}


def test_runs_on_different_data_are_ranked_separately(store, tmp_path):
    """The README's transfer example compared with `--all`: the pretraining run's 0.9945 on the digits
    0-4 is not ranked against the fine-tuning runs on the digits 5-9."""
    client, experiment = store
    runs = [_logged_run(client, experiment, "+experiment=transfer_pretrain", 0.9945, PRETRAIN)]
    for depth, best in (("-1", 0.750), ("2", 0.872), ("0", 0.728)):
        runs.append(_logged_run(client, experiment, f"+experiment=transfer_finetune freeze.depth={depth}", best,
                                {**FINETUNE, "freeze.depth": depth}))
    runs.append(_logged_run(client, experiment, "+experiment=transfer_finetune model.weights_path=null", 0.806,
                            {**FINETUNE, "model.weights_path": "None"}))
    parent = client.create_run(experiment, tags={"tunelab.sweep": "true"}).info.run_id
    comparison = compare.compare_runs(client, runs, tmp_path, parent_id=parent)

    pretrain, finetune = comparison.reports
    assert (pretrain.data, finetune.data) == ("data.dataset.classes=[0, 1, 2, 3, 4]", "data.dataset.classes=[5, 6, 7, 8, 9]")
    assert [r.run_id for r in pretrain.rows] == [runs[0].info.run_id]
    assert finetune.label(finetune.ranked()[0]) == "freeze.depth=2, model.weights_path=outputs/transfer/pretrain/last.pt"
    summary = comparison.summary().splitlines()
    assert summary[0] == ("Runs on 2 different data sets are ranked separately "
                          "(accuracies on different data are not comparable):")
    assert summary[1] == "data.dataset.classes=[0, 1, 2, 3, 4] (1 run):"
    assert summary[3] == "data.dataset.classes=[5, 6, 7, 8, 9] (4 runs):"
    assert summary[4].startswith("  Winner: freeze.depth=2, model.weights_path=outputs/transfer/pretrain/last.pt  mean best val/acc 0.8720")

    table = _read(tmp_path / "comparison.csv")
    assert list(table[0])[:2] == ["data", "rank"]
    winners = {row["data"]: row["run_ids"] for row in table if row["rank"] == "1"}
    assert winners == {pretrain.data: runs[0].info.run_id, finetune.data: runs[2].info.run_id}
    per_run = _read(tmp_path / "comparison_runs.csv")
    assert {row["run_id"]: row["data"] for row in per_run}[runs[0].info.run_id] == pretrain.data
    markdown = (tmp_path / "comparison.md").read_text()
    assert "\n## data.dataset.classes=[0, 1, 2, 3, 4] (1 run)\n" in markdown
    assert "\n## data.dataset.classes=[5, 6, 7, 8, 9] (4 runs)\n" in markdown
    height, width, _ = plt.imread(tmp_path / "comparison.png").shape
    assert (width, height) == (1650, 2 * 1155)  # two blocks of the single data set's 15 x 10.5 in at 110 dpi

    parent_run = client.get_run(parent)  # the sweep's winner is that of the data set with the most runs
    assert parent_run.data.tags["tunelab.winner"] == finetune.label(finetune.ranked()[0])
    assert parent_run.data.metrics["best_val/acc"] == pytest.approx(0.872)


def test_runs_differing_in_training_set_size_batch_or_raised_image_size_share_the_data(store, tmp_path):
    client, experiment = store
    runs = [_logged_run(client, experiment, "data.dataset.max_train_samples=50", 0.90, {**DIGITS, "data.dataset.max_train_samples": "50"}),
            _logged_run(client, experiment, "data.dataset.max_train_samples=100", 0.93, {**DIGITS, "data.dataset.max_train_samples": "100"}),
            _logged_run(client, experiment, "data.batch_size=16", 0.95, {**DIGITS, "data.batch_size": "16"}),
            # 16 pixels, raised to the model's minimum of 32: the same images as the others'
            _logged_run(client, experiment, "data.image_size=16", 0.94,
                        {**DIGITS, "data.image_size": "16", "resolved.data.image_size": "32"})]
    comparison = compare.compare_runs(client, runs, tmp_path)
    assert len(comparison.reports) == 1
    assert comparison.swept == ["data.batch_size", "data.dataset.max_train_samples", "data.image_size"]
    assert [c.runs[0].run_id for c in comparison.ranked()] == [runs[i].info.run_id for i in (2, 3, 1, 0)]  # all ranked together
    assert comparison.summary().startswith("Winner: data.batch_size=16, ")
    assert list(_read(tmp_path / "comparison.csv")[0])[0] == "rank"


NOT_LEARNT_OVERRIDES = ("trainer.progress={} logger.log_model={} data.num_workers={} trainer.device={} "
                        "optimizer.fused={} trainer.checkpoint_dir={} logger=mlflow hydra/launcher=joblib")


def test_settings_that_do_not_change_what_is_learnt_never_make_a_configuration(store, tmp_path):
    off, on = ("false", "false", "0", "cpu", "false", "null"), ("true", "true", "2", "cuda", "true", "out")
    runs = [(f"scheduler={name} seed={seed} " + NOT_LEARNT_OVERRIDES.format(*(off if seed else on)), _curve(best), "FINISHED")
            for name in ("cosine", "step") for seed, best in zip((0, 1), (0.95, 0.93) if name == "cosine" else (0.90, 0.91))]
    _, _, report = _compare(store, runs, tmp_path)
    assert report.swept == ["scheduler"]
    assert [report.label(c) for c in report.configs] == ["scheduler=cosine", "scheduler=step"]
    assert list(_read(tmp_path / "comparison.csv")[0])[:3] == ["rank", "scheduler", "n"]

    # one configuration: its name is its overrides, without those settings; from scratch stays
    runs = [(f"+experiment=transfer_finetune model.weights_path=null seed={seed} " + NOT_LEARNT_OVERRIDES.format(*(off if seed else on)),
             _curve(0.8), "FINISHED") for seed in (0, 1)]
    _, parent, report = _compare(store, runs, tmp_path)
    assert report.swept == []
    assert report.label(report.configs[0]) == "experiment=transfer_finetune model.weights_path=null"
    assert report.summary().startswith("Winner: experiment=transfer_finetune model.weights_path=null  mean best")


def _half(values):
    return stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))


def test_the_test_accuracy_is_reported_beside_the_validation_and_never_ranked_on(store, tmp_path):
    # step has the best test/acc but the worst val/acc: it stays last; onecycle's third run logged no test/acc
    tests = {"cosine": [0.94, 0.945, 0.93], "onecycle": [0.95, 0.89], "step": [0.96, 0.97, 0.965]}
    runs, logged = [], []
    for name, bests in (("step", STEP), ("cosine", COSINE), ("onecycle", ONECYCLE)):
        for seed, best in zip(SEEDS, bests):
            runs.append((f"scheduler={name} seed={seed}", _curve(best), "FINISHED"))
            logged.append(tests[name][seed] if seed < len(tests[name]) else None)
    client, parent, report = _compare(store, runs, tmp_path, tests=logged)

    table = _read(tmp_path / "comparison.csv")
    assert [row["scheduler"] for row in table] == ["cosine", "onecycle", "step"]
    for row in table:  # against the children's test/acc and val/acc, read back from MLflow
        children = [client.get_run(run_id) for run_id in row["run_ids"].split()]
        tested = [child for child in children if "test/acc" in child.data.metrics]
        values = [child.data.metrics["test/acc"] for child in tested]
        assert values == pytest.approx(tests[row["scheduler"]]) and int(row["test/acc n"]) == len(values)
        for stat, value in _expected(values).items():
            assert float(row[f"test/acc {stat}"]) == pytest.approx(value, abs=1e-6), (row["scheduler"], stat)
        bests = [max(v for _, v in metric_series(client, child.info.run_id, "val/acc")) for child in tested]
        assert float(row["optimism"]) == pytest.approx(np.mean(np.array(bests) - np.array(values)), abs=1e-6)

    per_run = _read(tmp_path / "comparison_runs.csv")
    untested = [row for row in per_run if row["scheduler"] == "onecycle" and row["seed"] == "2"]
    assert len(untested) == 1 and (untested[0]["test/acc"], untested[0]["optimism"]) == ("", "")
    first = next(row for row in per_run if row["scheduler"] == "step" and row["seed"] == "0")
    assert float(first["test/acc"]) == pytest.approx(0.96)
    assert float(first["optimism"]) == pytest.approx(STEP[0] - 0.96, abs=1e-4)

    line = report.summary().splitlines()[0]
    cosine = tests["cosine"]
    assert line.startswith("Winner: scheduler=cosine  mean best val/acc 0.9550 ± ")
    assert f"(95 % CI, n=3) on val; {np.mean(cosine):.4f} ± {_half(cosine):.4f} on test; " in line
    assert client.get_run(parent).data.metrics["test/acc"] == pytest.approx(np.mean(cosine))
    markdown = (tmp_path / "comparison.md").read_text()
    assert "| test/acc (mean ± 95 % CI) |" in markdown and "optimism" in markdown
    assert f"{np.mean(tests['onecycle']):.4f} ± {_half(tests['onecycle']):.4f}" in markdown and "(n=2)" in markdown


def test_runs_without_a_test_accuracy_leave_it_blank(store, tmp_path):
    """trainer.test=false, or runs from before the test split: the comparison is as before, the test columns blank."""
    runs = [(f"scheduler={name} seed={seed}", _curve(best), "FINISHED")
            for name, bests in (("step", STEP), ("cosine", COSINE)) for seed, best in zip(SEEDS, bests)]
    client, parent, report = _compare(store, runs, tmp_path)
    table = _read(tmp_path / "comparison.csv")
    assert all(row[f"test/acc {s}"] == "" for row in table for s in ("n", "mean", "sd", "ci_low", "ci_high"))
    assert all(row["optimism"] == "" for row in table)
    assert all((row["test/acc"], row["optimism"]) == ("", "") for row in _read(tmp_path / "comparison_runs.csv"))
    assert "on val; no test/acc logged; distinguishable from scheduler=step" in report.summary()
    metrics = client.get_run(parent).data.metrics
    assert "test/acc" not in metrics and metrics["best_val/acc"] == pytest.approx(np.mean(COSINE))


#: ./multirun.sh's best val/acc with one seed (README): 5 schedulers x 4 freeze depths.
SHOWCASE = {"cosine": (0.978, 0.983, 0.981, 0.892), "cosine_restarts": (0.972, 0.969, 0.975, 0.878),
            "onecycle": (0.986, 0.975, 0.983, 0.883), "plateau": (0.9855, 0.978, 0.961, 0.906),
            "step": (0.9775, 0.978, 0.969, 0.892)}


def _showcase(seeds=(), repeated=()):
    """The showcase sweep's runs, over `seeds` for the schedulers in `repeated` (one run, no seed, for the others), and
    their test/acc: 0.012 + 0.002 x depth below the best val/acc."""
    runs, tests = [], []
    for name, bests in SHOWCASE.items():
        for depth, best in zip(("0", "2", "4", "-1"), bests):
            for seed in seeds if name in repeated else (None,):
                shift = 0.004 * (seed - 1) if seed is not None else 0.0
                runs.append((f"scheduler={name} freeze.depth={depth}" + (f" seed={seed}" if seed is not None else ""),
                             _curve(best - shift), "FINISHED"))
                tests.append(best - shift - 0.012 - 0.002 * int(depth))
    return runs, tests


def test_one_run_per_configuration_says_nothing_can_be_tested_and_the_picture_shows_them_all(store, tmp_path):
    runs, tests = _showcase()
    client, parent, comparison = _compare(store, runs, tmp_path, tests=tests)
    summary = comparison.summary()
    assert summary.startswith("Winner: scheduler=onecycle, freeze.depth=0  mean best val/acc 0.9860 (n=1, no interval) on val; "
                              f"{0.986 - 0.012:.4f} (n=1, no interval) on test")
    assert "No difference can be tested with one run per configuration" in summary and "seed=0,1,2" in summary
    assert "of the 19 other configurations are" not in summary

    fig = _figure()
    ranking = compare_figure.draw(comparison.main, fig)["ranking"]
    labels = [label.get_text() for label in ranking.get_yticklabels()]
    assert len(labels) == 20 and set(labels) == {comparison.label(c) for c in comparison.ranked()}
    low, high = ranking.get_ylim()
    assert all(low < tick < high for tick in ranking.get_yticks())  # none cut off
    val_bars, *test_bars = [c for c in ranking.containers if isinstance(c, BarContainer)]
    assert sorted(bar.get_width() for bar in val_bars) == pytest.approx(sorted(b for bs in SHOWCASE.values() for b in bs))
    assert sorted(bar.get_width() for bars in test_bars for bar in bars) == pytest.approx(sorted(tests))
    assert ranking.get_xlim()[0] < min(tests)  # the head-only ones (0.878-0.906) and their tests are in view
    plt.close(fig)
    height, width, _ = plt.imread(tmp_path / "comparison.png").shape
    assert height > 1155  # grown past a single data set's 10.5 in for 20 readable rows


def _figure():
    """A figure for one data set's panels, as tall as comparison.png's for 20 configurations."""
    return plt.figure(figsize=(15, 13.65), layout="constrained")


def test_configurations_with_one_run_are_counted_apart_from_those_tested(store, tmp_path):
    runs, tests = _showcase(seeds=(0, 1, 2), repeated=("onecycle", "cosine"))
    _, _, comparison = _compare(store, runs, tmp_path, tests=tests)
    table = _read(tmp_path / "comparison.csv")
    tested = [row for row in table[1:] if row["verdict"] in ("distinguishable", "not distinguishable")]
    close = sum(row["verdict"] == "not distinguishable" for row in tested)
    assert (len(table), len(tested)) == (20, 7)
    assert (f"{close} of the 7 other configurations that could be tested are not distinguishable from the winner; "
            f"12 could not be tested: one run each") in comparison.summary()
