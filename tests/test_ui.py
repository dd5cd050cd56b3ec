"""A sweep seen through MLflow's own web UI: a real `mlflow server`, opened in headless Chromium.

The sweep (2 schedulers x 2 freeze depths, a few batches each) goes into a temporary sqlite store;
`mlflow server` serves that store on 127.0.0.1, and Debian's Chromium loads the UI with
`--dump-dom` (the DOM after the single page app rendered) and `--screenshot`.

URLs that work with MLflow 3.x (checked on 3.17):
- `#/experiments/ID` alone opens the GenAI overview in a fresh browser profile (the workflow switch
  lives in localStorage and defaults to GenAI), so every URL carries `workflowType=machine_learning`.
- The experiment's runs table nests child runs under their parent and shows them collapsed; any sort
  other than the creation time lists every run flat, so the page is sorted by val/acc.
- A run's overview page (`#/experiments/ID/runs/RUN_ID`) has the metrics table (name, latest value).
  The charts on its "Model metrics" tab (`.../runs/RUN_ID/model-metrics`) stay spinners in a headless
  dump, so the metric check uses the table.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from conftest import QUIET_ENV, ROOT, mlflow_runs, mlflow_server, run_train

SWEEP = [
    "-m",
    "scheduler=step,cosine",
    "freeze.depth=0,2",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.progress=false",
    "trainer.device=cpu",
    "data.batch_size=16",
    "logger.log_model=false",
]
JOBS = 4
PARENT_TAG = "mlflow.parentRunId"
#: Virtual-time budgets (ms) of successive attempts to dump a page the SPA has not rendered yet.
BUDGETS_MS = (10_000, 20_000, 30_000, 45_000)
#: A rendered 1600x1000 page is tens of KB; a blank or broken one is much smaller.
MIN_PNG_BYTES = 8_000


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def find_chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        message = "Chromium is not installed (apt-get install -y chromium; .ci/run installs it)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


class Browser:
    """Headless Chromium, a fresh profile per page load; only 127.0.0.1 is reachable."""

    def __init__(self, binary: str, workdir: Path):
        self.binary, self.workdir, self.loads = binary, workdir, 0

    def _run(self, url: str, budget_ms: int, output: list[str]) -> subprocess.CompletedProcess:
        self.loads += 1
        profile = self.workdir / f"chromium-profile-{self.loads}"
        cmd = [
            self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            f"--user-data-dir={profile}", "--window-size=1600,1000", f"--virtual-time-budget={budget_ms}",
            *output, url,
        ]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=budget_ms / 1000 + 60)
        except subprocess.TimeoutExpired as err:  # one hung load is retried like an unrendered page
            return subprocess.CompletedProcess(cmd, -1, stdout=str(err.stdout or ""), stderr="timed out")
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    def dump(self, url: str, ready, budgets=BUDGETS_MS) -> tuple[str, str, int]:
        """The rendered DOM (and its visible text) of the first load where ready(dom, text) holds,
        with longer virtual-time budgets on each retry; the last load's if none did."""
        dom = text = ""
        for budget in budgets:
            dom = self._run(url, budget, ["--dump-dom"]).stdout
            text = visible_text(dom)
            if ready(dom, text):
                return dom, text, budget
        return dom, text, budgets[-1]

    def screenshot(self, url: str, path: Path, budget_ms: int) -> Path:
        path.unlink(missing_ok=True)
        proc = self._run(url, budget_ms, [f"--screenshot={path}"])
        assert path.is_file(), f"Chromium wrote no screenshot (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
        return path


def visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b[^>]*>.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).strip()


def words(text: str) -> str:
    return " ".join(text.split())


def link_texts(dom: str, href: str) -> list[str]:
    """The visible texts of the <a href=HREF> links in the DOM."""
    pattern = rf'<a\b[^>]*\bhref="{re.escape(html.escape(href, quote=True))}"[^>]*>(.*?)</a>'
    return [visible_text(inner) for inner in re.findall(pattern, dom, flags=re.S)]


@pytest.mark.slow
def test_the_sweep_shows_in_the_mlflow_ui(tmp_path, chromium, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_train(SWEEP, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri, **QUIET_ENV}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    client, runs = mlflow_runs(uri)
    assert runs, "the sweep left no runs in MLflow"
    experiment_id = runs[0].info.experiment_id
    assert client.get_experiment(experiment_id).tags.get("mlflow.experimentKind") == "custom_model_development"
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    if children:  # the sweep is grouped: one parent, the jobs nested under it
        assert len(parents) == 1 and len(children) == JOBS, [(r.info.run_name, r.data.tags.get(PARENT_TAG)) for r in runs]
        assert {r.data.tags[PARENT_TAG] for r in children} == {parents[0].info.run_id}
        jobs = children
    else:
        jobs = parents
    assert len(jobs) == JOBS, [r.info.run_name for r in runs]
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    assert all("lr" in r.data.metrics for r in jobs)

    browser = Browser(chromium, tmp_path)
    with mlflow_server(uri, tmp_path) as base:
        # The experiment's runs, sorted by val/acc: flat, so child runs show without expanding their parent.
        query = f"workflowType=machine_learning&orderByKey={quote('metrics.`val/acc`', safe='')}&orderByAsc=false"
        runs_page = f"#/experiments/{experiment_id}/runs"
        experiment_url = f"{base}/{runs_page}?{query}"

        def runs_listed(dom: str, text: str) -> bool:
            return all(f'{runs_page}/{r.info.run_id}"' in dom for r in runs)

        dom, text, budget = browser.dump(experiment_url, runs_listed)
        shown = {r.info.run_id: link_texts(dom, f"{runs_page}/{r.info.run_id}") for r in runs}
        assert runs_listed(dom, text), f"runs missing from {experiment_url}: {shown}\npage text: {text[:3000]}"
        for r in runs:  # each run's row links to its page under the run's name
            assert words(r.info.run_name) in shown[r.info.run_id], (r.info.run_name, shown[r.info.run_id])
        assert re.search(rf"\b{len(runs)} matching runs\b", text), text[:3000]

        png = browser.screenshot(experiment_url, tmp_path / "ui_experiment.png", budget)
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > MIN_PNG_BYTES, (png, len(data))
        if (ROOT / "outputs").is_dir():
            shutil.copyfile(png, ROOT / "outputs" / "ui_screenshot.png")

        # One job's page: the metrics table lists lr (linking to its chart) with its latest value.
        job = jobs[0]
        run_page = f"{runs_page}/{job.info.run_id}"
        run_url = f"{base}/{run_page}?workflowType=machine_learning"

        def metrics_listed(dom: str, text: str) -> bool:
            return "lr" in link_texts(dom, f"{run_page}/model-metrics")

        dom, text, _ = browser.dump(run_url, metrics_listed)
        assert metrics_listed(dom, text), f"no lr metric on {run_url}:\n{text[:3000]}"
        assert words(job.info.run_name) in text
        assert f"Metrics ({len(job.data.metrics)})" in text, text[:3000]
        lr_link = re.search(rf'<a\b[^>]*\bhref="{re.escape(run_page)}/model-metrics"[^>]*>\s*lr\s*</a>', dom).end()
        shown_value = re.search(r'title="([^"]+)"', dom[lr_link : lr_link + 2000])  # the value cell next to it
        assert shown_value, dom[lr_link : lr_link + 2000]
        assert float(html.unescape(shown_value.group(1))) == pytest.approx(job.data.metrics["lr"], rel=1e-9, abs=1e-15)

        # The link the sweep printed last opens its parent run's page in the training view.
        printed = re.search(r"^then:\s+(http://127\.0\.0\.1:5000/(#/experiments/\S+))$", proc.stdout, re.M)
        assert printed, proc.stdout[-2000:]
        parent = parents[0]
        assert printed.group(2) == f"#/experiments/{experiment_id}/runs/{parent.info.run_id}?workflowType=machine_learning"

        def parent_shown(dom: str, text: str) -> bool:
            return words(parent.info.run_name) in text and "Metrics (" in text

        dom, text, _ = browser.dump(f"{base}/{printed.group(2)}", parent_shown)
        assert parent_shown(dom, text), text[:3000]
