"""Run folders that no two runs share, whatever starts at the same time.

`conf/config.yaml` names a single run's folder `${tunelab.new_folder:outputs/runs/DATE/TIME}` and a
sweep's `${tunelab.new_folder:outputs/multirun/DATE/TIME}`. The resolver creates the folder with
`os.mkdir`, which fails when the name exists, so of two processes that start in the same second one
gets `.../20-09-35` and the other `.../20-09-35-2` (then `-3`, ...). A name that exists already,
made by an earlier run, by another process or by hand, is never reused.

Hydra resolves the run folder more than once per run (and a sweep's folder in every job, also in
joblib's and submitit's worker processes); the resolver is registered with `use_cache=True`, so each
config keeps the folder made the first time, the way Hydra's own `${now:...}` keeps its time, and
Hydra copies that cache into every job's config. An explicit `hydra.run.dir=...` replaces the
interpolation, so the resolver is not involved and the folder keeps its meaning (resume relies on it).

Under torchrun the processes of one node share the folder of their local rank 0 (which holds the
checkpoints): rank 0 creates it and publishes its name in a file named after torchrun's run id
(`TORCHELASTIC_RUN_ID`), which the others wait for.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

RESOLVER = "tunelab.new_folder"
#: How long a torchrun process waits for its local rank 0 to name the shared folder.
_SHARED_WAIT_S = 120.0
#: When this process imported tunelab: a torchrun marker older than its start (by more than the
#: ranks' start-up spread) is a stale one from an earlier launch that reused the run id.
_STARTED = time.time()
_SPREAD_S = 30.0


def new_folder(base: str) -> str:
    """Create a folder named `base`, or `base-2`, `base-3`, ... (the first free name); return its name."""
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        name = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(name)
        except FileExistsError:
            continue
        return name
    raise FileExistsError(f"{base}: 10,000 folders of this name exist already")


def _torchrun_marker() -> Path | None:
    """The file in which local rank 0 of a torchrun launch names its run folder; None outside torchrun."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return Path(tempfile.gettempdir()) / f"tunelab-torchrun-{run_id}.folder"


def run_folder(base: str) -> str:
    """The resolver: a new folder, or under torchrun the one of this node's local rank 0."""
    marker = _torchrun_marker()
    if marker is None:
        return new_folder(base)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        name = new_folder(base)
        partial = marker.with_name(f"{marker.name}.{os.getpid()}")
        partial.write_text(str(Path(name).resolve()))
        os.replace(partial, marker)  # whole or absent: the other ranks never read half a name
        return name
    deadline = time.monotonic() + _SHARED_WAIT_S
    while time.monotonic() < deadline:
        try:
            if marker.stat().st_mtime >= _STARTED - _SPREAD_S:
                return marker.read_text()
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    log.warning("local rank 0 named no run folder within %.0f s; this process uses its own", _SHARED_WAIT_S)
    return new_folder(base)


def register() -> None:
    """Register `${tunelab.new_folder:...}` with OmegaConf (once per process)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, run_folder, use_cache=True)


register()
