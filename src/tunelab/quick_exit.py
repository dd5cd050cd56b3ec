"""End `python train.py` without the interpreter's teardown once everything is written.

Freeing torch, MLflow and their C++ libraries when the interpreter shuts down takes 1-3 s on a
2-core machine, after the last byte of the run has been stored: more than all of a short run's
logging. `train.py` imports this module before anything else, so the exit hook below is the
first one registered and therefore the last one run (`atexit` runs hooks in reverse order). By
then Python has joined every non-daemon thread and every library has run its own exit hooks
(MLflow's helper process has been closed, a sweep's parent run ended, log files flushed); only the
teardown is left, and `os._exit` skips it.

Only a process whose entry point returned normally is ended this way, with status 0. An error, a
signal or `sys.exit` exits the usual way, with its own status. A process measured by coverage
(whose data is written by an exit hook that may have been registered before this one) is left to
exit normally.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

_returned = False


def skip_teardown() -> None:
    """Call when the entry point has returned normally: the process then ends with status 0 right
    after the last exit hook, without tearing down its modules."""
    global _returned
    _returned = True


@atexit.register
def _exit_now() -> None:
    if not _returned or "coverage" in sys.modules:
        return
    logging.shutdown()  # flush and close every handler (Hydra's run log), as a normal exit does
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
            pass
    os._exit(0)
