"""`python train.py` ends without the interpreter's teardown once it returned normally, and only
then: every exit hook and thread has finished first, output and log files are complete, and an
error still exits with its own status."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

SCRIPT = textwrap.dedent(
    """
    import sys
    from tunelab.quick_exit import skip_teardown

    import atexit, logging, threading, time
    from pathlib import Path

    out = Path(sys.argv[1])

    class Teardown:
        def __del__(self):  # runs only when the interpreter frees this module's globals
            (out / "teardown").write_text("ran")

    sentinel = Teardown()
    atexit.register(lambda: (out / "hook").write_text("ran"))
    logging.basicConfig(filename=out / "run.log", level=logging.INFO)
    logging.getLogger("job").info("the last line of the run")

    def late():
        time.sleep(0.5)
        (out / "thread").write_text("ran")

    threading.Thread(target=late).start()  # not a daemon: a normal exit waits for it
    print("buffered output", end="")
    if sys.argv[2] == "fail":
        raise SystemExit(3)
    skip_teardown()
    """
)


@pytest.mark.parametrize("how", ["returned", "fail"])
def test_exit_after_a_normal_return_skips_only_the_teardown(tmp_path, how):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(script), str(tmp_path), how], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == (0 if how == "returned" else 3), out.stderr
    assert out.stdout == "buffered output"
    assert (tmp_path / "hook").read_text() == "ran"  # other exit hooks ran first
    assert (tmp_path / "thread").read_text() == "ran"  # and threads were joined
    assert "the last line of the run" in (tmp_path / "run.log").read_text()
    assert (tmp_path / "teardown").exists() == (how == "fail")


def test_train_py_imports_the_exit_hook_before_anything_else():
    """The hook runs last only if it is registered first."""
    lines = [line for line in (ROOT / "train.py").read_text().splitlines() if line.startswith(("import ", "from "))]
    assert lines[0] == "from tunelab.quick_exit import skip_teardown  # first: its exit hook must be the last one to run"
