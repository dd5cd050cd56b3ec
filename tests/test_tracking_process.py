"""MLflow's helper process: what a run logs arrives, the training process leaves MLflow alone, and
the helper never outlives the process it works for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SMALL, metric_series, mlflow_runs
from tunelab import tracking
from tunelab.errors import ConfigError, ReportedError


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())  # a zombie has ended


def run_python(script: str, *args: str, cwd: Path | None = None, timeout: int = 300) -> str:
    """The output of `python -c script args` in a fresh process, which must succeed. Without
    MLFLOW_TRACKING_URI: it would win over the test's store."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_everything_a_run_logs_arrives_through_the_helper(tracking_uri):
    uri = tracking_uri  # the fixture also clears MLFLOW_TRACKING_URI, which would win
    logger = tracking.mlflow_logger(uri, "tunelab")
    assert isinstance(logger, tracking.ProcessLogger)
    logger.connect_in_background()
    logger.start({"optimizer.lr": 0.1}, {"model": "resnet18"})
    for step in range(120):
        logger.log_metrics({"lr": 0.1 / (step + 1), "train/loss": 2.0 - step / 100}, step=step)
        if step % 50 == 49:
            logger.flush()
    logger.log_text("a: 1\n", "config.yaml")
    logger.set_tag("tunelab.stopped_early", "no")
    logger.finish("FINISHED")
    client, runs = mlflow_runs(uri)
    (run,) = runs
    assert run.info.status == "FINISHED" and run.info.run_id == logger.run_id
    assert run.data.params["optimizer.lr"] == "0.1" and run.data.tags["model"] == "resnet18"
    assert run.data.tags["tunelab.pid"] == str(os.getpid())  # the training process, not the helper
    assert [s for s, _ in metric_series(client, logger.run_id, "train/loss")] == list(range(120))
    assert [a.path for a in client.list_artifacts(logger.run_id)] == ["config.yaml"]


def test_the_helpers_errors_reach_the_caller(tmp_path, tracking_uri):
    logger = tracking.mlflow_logger("http://127.0.0.1:9", "tunelab")  # nothing listens on port 9
    logger.connect_in_background()
    with pytest.raises(ConfigError, match="does not answer"):
        logger.start({}, {})
    ok = tracking.mlflow_logger(f"sqlite:///{tmp_path / 'mlflow.db'}", "tunelab")  # the same helper serves the next run
    ok.start({}, {})
    ok.finish("FINISHED")
    assert mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")[1][0].info.status == "FINISHED"


@pytest.mark.slow
def test_a_training_process_leaves_mlflow_and_the_lr_figure_to_the_helper(tmp_path):
    """Unless it logs the model, the training process imports neither MLflow nor matplotlib: the
    helper stores everything and draws the LR curve."""
    script = (
        "import sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from conftest import compose_config, SMALL\n"
        "from tunelab import run\n"
        "run.train(compose_config([*SMALL, 'logger.log_model=false'], sys.argv[2]))\n"
        "print('mlflow' in sys.modules, 'matplotlib' in sys.modules)\n"
    )
    out = run_python(script, str(ROOT / "tests"), f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert out.strip().splitlines()[-1] == "False False"
    client, (run,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.info.status == "FINISHED"
    assert "lr_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_the_helper_ends_with_a_killed_training_process(tmp_path):
    args = [*SMALL, "trainer.max_epochs=50", "logger.log_model=false", f"hydra.run.dir={tmp_path}/run"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:  # the loop has started, so the helper is working for it
        if "Training:" in line or time.time() > deadline:
            break
    helpers = children(proc.pid)
    assert helpers, "no helper process"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(alive(pid) for pid in helpers):
        time.sleep(0.2)
    assert not any(alive(pid) for pid in helpers), "the helper outlived the training process"


def test_mlflow_installed_as_mlflow_skinny_is_still_pinned_and_tagged(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version

    def skinny_only(name):
        if name == "mlflow":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", skinny_only)
    pins = tracking.pip_requirements()
    assert f"mlflow-skinny=={real('mlflow-skinny')}" in pins and not any(p.startswith("mlflow==") for p in pins)
    assert tracking.process_tags()["version.mlflow"] == real("mlflow-skinny")


def test_logging_a_model_leaves_this_process_on_its_configured_store(tracking_uri):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a later run of the same process (a sweep
    job, a test) must not be steered by the store an earlier run's model went to."""
    import torch

    logger = tracking.mlflow_logger(tracking_uri, "tunelab")
    logger.start({}, {})
    logger.log_model(torch.nn.Linear(4, 2).eval(), torch.randn(2, 4).numpy())
    logger.finish("FINISHED")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    import mlflow

    assert mlflow.get_tracking_uri() != tracking.helper_store_uri(tracking_uri)  # nor MLflow's own setting
    client, (run,) = mlflow_runs(tracking_uri)
    assert run.info.status == "FINISHED" and client.search_logged_models([run.info.experiment_id])


@pytest.mark.slow
def test_logging_a_model_leaves_mlflows_own_tracking_uri_setting_as_it_was(tmp_path):
    """A user who called mlflow.set_tracking_uri before train() keeps that setting, and no
    MLFLOW_TRACKING_URI appears, while the model goes to the run's own store."""
    script = (
        "import os, sys, mlflow, torch\n"
        "from tunelab import tracking\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        "del os.environ['MLFLOW_TRACKING_URI']  # exported by set_tracking_uri; it would win over the logger's URI\n"
        "logger = tracking.mlflow_logger(sys.argv[2], 'tunelab', in_process=True)\n"
        "logger.start({}, {})\n"
        "logger.log_model(torch.nn.Linear(4, 2).eval(), torch.randn(2, 4).numpy())\n"
        "logger.finish('FINISHED')\n"
        "print(mlflow.get_tracking_uri(), 'MLFLOW_TRACKING_URI' in os.environ)\n"
    )
    users, runs = f"sqlite:///{tmp_path / 'users.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_python(script, users, runs, cwd=tmp_path)
    assert out.strip().splitlines()[-1] == f"{users} False"
    client, (run,) = mlflow_runs(runs)
    assert run.info.status == "FINISHED" and client.search_logged_models([run.info.experiment_id])


@pytest.mark.slow
def test_the_model_is_logged_through_the_helpers_open_store(tmp_path, monkeypatch):
    """The training process logs its model without opening the database itself (its SQL layer is
    never imported there), and the model loads back and predicts as it did."""
    script = (
        "import sys, torch\n"
        "from tunelab import tracking\n"
        "torch.manual_seed(0)\n"
        "model, example = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval(), torch.rand(2, 4)\n"
        "logger = tracking.mlflow_logger(sys.argv[1], 'tunelab')\n"
        "logger.start({}, {})\n"
        "logger.log_model(model, example.numpy())\n"
        "logger.finish('FINISHED')\n"
        "torch.save((model.state_dict(), example), sys.argv[2])\n"
        "print(tracking.helper_store_uri(sys.argv[1]).split(':')[0], 'mlflow.store.tracking.sqlalchemy_store' in sys.modules)\n"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_python(script, uri, str(tmp_path / "model.pt"), cwd=tmp_path)
    assert out.strip().splitlines()[-1] == f"{tracking.HELPER_STORE_SCHEME} False"
    client, (run,) = mlflow_runs(uri)
    assert run.info.status == "FINISHED"
    (logged,) = client.search_logged_models([run.info.experiment_id])
    assert logged.status == "READY" and logged.source_run_id == run.info.run_id
    import mlflow.pytorch

    state, example = torch.load(tmp_path / "model.pt")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    model.load_state_dict(state)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    loaded = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    with torch.inference_mode():
        assert torch.allclose(loaded(example), model(example))


def test_only_a_database_store_is_reached_through_the_helper(monkeypatch):
    """A server's URI stays (MLflow finds the server's artifacts through it), and without tunelab's
    MLflow plugin entry (tunelab not installed) the training process opens the store itself."""
    sqlite = "sqlite:////tmp/mlflow.db"
    assert tracking.helper_store_uri(sqlite) == f"{tracking.HELPER_STORE_SCHEME}:{sqlite}"
    assert tracking.helper_store_uri("postgresql+psycopg2://u@h/db").startswith(f"{tracking.HELPER_STORE_SCHEME}:")
    assert tracking.helper_store_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setattr(tracking.plugin, "_helper_store_registered", lambda: False)
    assert tracking.helper_store_uri(sqlite) == sqlite


def test_pyproject_registers_the_helper_store_where_it_is():
    """The MLflow plugin entry names the HelperStore class by the module path helper_store_uri checks
    for; a stale entry would send every model upload past the helper (`pip install -e .` anew)."""
    import importlib

    tomllib = pytest.importorskip("tomllib")
    plugins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["mlflow.tracking_store"]
    value = plugins[tracking.HELPER_STORE_SCHEME]
    module, _, name = value.partition(":")
    assert getattr(importlib.import_module(module), name) is tracking.HelperStore
    assert value == f"{tracking.HelperStore.__module__}:{tracking.HelperStore.__qualname__}"


def test_mlflow_still_gives_the_store_behind_a_client(tracking_uri):
    """HelperStore's calls are made on the helper's store, which MLflow gives only by a private name."""
    import mlflow
    from mlflow.store.tracking.abstract_store import AbstractStore

    from tunelab.tracking.store import client_store

    client, experiment_id = tracking.open_store(tracking_uri, "tunelab")
    try:
        store = client_store(client)
    except AttributeError as err:
        pytest.fail(f"MLflow {mlflow.__version__} has no MlflowClient._tracking_client.store any more ({err}): "
                    "tunelab.tracking.store.client_store must find a client's store another way")
    assert isinstance(store, AbstractStore), f"MLflow {mlflow.__version__}: a client's store is a {type(store).__name__}"
    assert store.get_experiment(experiment_id).name == "tunelab"


def test_the_forwarded_store_reports_a_helper_that_is_gone(monkeypatch):
    monkeypatch.setattr(tracking.helper, "_helper", None)
    store = tracking.HelperStore(f"{tracking.HELPER_STORE_SCHEME}:sqlite:///x.db")
    with pytest.raises(ReportedError, match="helper process is not running"):
        store.get_run("0" * 32)
    with pytest.raises(AttributeError):
        store._private


def test_an_error_drawing_the_lr_curve_in_the_helper_is_reported_when_the_run_ends(tracking_uri):
    logger = tracking.mlflow_logger(tracking_uri, "tunelab")
    logger.start({}, {})
    logger.log_lr_curves({"lr": [0.1, 0.05]}, "ten")  # returns at once; the helper fails to draw it
    with pytest.raises(ReportedError, match="could not store all"):
        logger.finish("FINISHED")
    client, (run,) = mlflow_runs(tracking_uri)
    assert run.info.status == "FINISHED" and not client.list_artifacts(run.info.run_id)


def test_a_run_started_at_once_in_a_fresh_process_with_mlflow_in_threads(tmp_path):
    """`logger.in_process=true`: `start` right after `connect_in_background`, before the thread has
    finished importing MLflow, used to import MLflow beside it and fail halfway (a circular import)."""
    script = (
        "import sys\n"
        "from tunelab import tracking\n"
        "logger = tracking.mlflow_logger(sys.argv[1], 'tunelab', in_process=True)\n"
        "logger.connect_in_background()\n"
        "logger.start({}, {})\n"
        "logger.finish('FINISHED')\n"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_python(script, uri, timeout=120)
    assert mlflow_runs(uri)[1][0].info.status == "FINISHED"


class Branchy(torch.nn.Module):
    """A model whose forward branches on its input's values, which torch.export cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x) if x.sum() > 0 else -self.linear(x)


def test_a_model_torch_export_cannot_trace_is_logged_in_the_pickle_format(tracking_uri, monkeypatch, caplog):
    import mlflow.pytorch

    torch.manual_seed(0)
    model = Branchy().eval()
    example = torch.rand(2, 4)
    logger = tracking.mlflow_logger(tracking_uri, "tunelab")
    logger.start({}, {})
    logger.log_model(model, example.numpy())
    logger.finish("FINISHED")
    assert "logging it in the pickle format" in caplog.text
    client, (run,) = mlflow_runs(tracking_uri)
    assert run.info.status == "FINISHED"
    (logged,) = client.search_logged_models([run.info.experiment_id])  # not also the failed pt2 attempt
    assert logged.status == "READY" and logged.source_run_id == run.info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    loaded = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    with torch.inference_mode():
        assert torch.equal(loaded(example), model(example)) and torch.equal(loaded(-example), model(-example))


@pytest.fixture
def fresh_scan(monkeypatch):
    """PackageScan with no scan started or answered in this process yet."""
    monkeypatch.setattr(tracking.PackageScan, "_process", None)
    monkeypatch.setattr(tracking.PackageScan, "_result", None)
    return tracking.PackageScan


def test_the_package_scan_answers_as_importlib_metadata_does_and_only_within_the_upload(fresh_scan):
    import importlib_metadata

    original = importlib_metadata.packages_distributions
    fresh_scan.start()
    assert fresh_scan._process is not None
    with fresh_scan.used():
        assert importlib_metadata.packages_distributions is not original
        answered = importlib_metadata.packages_distributions()
        answered["torch"].append("changed by the caller")  # MLflow updates the map it is given
        assert "changed by the caller" not in importlib_metadata.packages_distributions()["torch"]
    assert importlib_metadata.packages_distributions is original
    expected = original()
    answered["torch"].pop()
    assert answered == expected
    fresh_scan.start()  # answered once per process
    assert fresh_scan._process is None


@pytest.mark.parametrize("code", ["import sys; sys.exit(3)", "print('not a map')", "import time; time.sleep(60)"])
def test_a_failed_or_late_package_scan_leaves_the_scan_to_mlflow(fresh_scan, monkeypatch, code):
    import importlib_metadata

    monkeypatch.setattr(fresh_scan, "_CODE", code)
    calls = []
    monkeypatch.setattr(importlib_metadata, "packages_distributions", lambda: calls.append(1) or {"torch": ["torch"]})
    fresh_scan.start()
    process = fresh_scan._process
    real = fresh_scan.result
    monkeypatch.setattr(fresh_scan, "result", lambda wait_s=1.0: real(0.5))
    with fresh_scan.used():
        assert importlib_metadata.packages_distributions() == {"torch": ["torch"]}
    assert calls == [1]
    assert process.poll() is not None  # a late one was stopped
