"""The Python child processes of the training process (the helper process, the package scan)."""

from __future__ import annotations

import os
import subprocess
import sys


def start_python(code: str, **options) -> subprocess.Popen:
    """`python -c code` with standard input closed and this process's environment, its module
    search path (an editable install, a test's sys.path) as PYTHONPATH; `options` go to Popen."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, env=env, **options)
