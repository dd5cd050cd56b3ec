"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint (`last.pt` in the run folder) holds the model, the optimizer, the schedule (warmup
included), the AMP grad scaler, every random number generator, the loop's position (epoch, batch,
global step, best metric, the history of lrs and epoch metrics), how many stages are still frozen
(gradual unfreezing), the MLflow run id and the resolved config. It is written to a temporary file
and renamed, so a kill during the write leaves the previous one intact; it loads with
`torch.load(weights_only=True)`. `best.pt` holds the weights of the best epoch by `monitor`.
`Saver` decides when they are written. A write that fails (a full disk, no permission) leaves no
temporary file and is a CheckpointError naming the folder, its free space and the space needed.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import queue
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from tunelab.errors import ConfigError, ReportedError, require

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
#: What `best.pt` carries from `last.pt` beside the weights (tunelab.trained rebuilds the model from it).
BEST_EXTRAS = ("model_info", "run_id", "config")
#: Config keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("trainer.resume", "trainer.progress", "trainer.device", "trainer.checkpoint_dir", "trainer.log_every_n_steps", "data.num_workers",
                     "logger.in_process", "trainer.checkpoint_min_interval_s", "optimizer.fused", "optimizer.foreach",
                     "trainer.keep_checkpoints")
#: `trainer.keep_checkpoints` (the names of `choices.KEEP_CHECKPOINTS`), each with the files a finished run removes.
KEEP = {"all": (), "best": (LAST,), "none": (LAST, BEST)}


class CheckpointError(ReportedError):
    """A checkpoint could not be written; the run ends FAILED, and the checkpoints written before stay."""


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to `path.tmp`, fsync, then rename over `path`; the temporary file is removed
    when any of it fails (a full disk would otherwise stay full)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in `obj` (nested dicts, lists, tuples): about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(value) for value in obj)
    return 0


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def write_error(obj: Any, path: Path, err: BaseException) -> CheckpointError:
    """What a failed write of `obj` to `path` tells the user: the folder, the space free there (of its
    nearest existing parent, when it has vanished) and the space the checkpoint needs."""
    folder = path.parent
    existing = next(p for p in (folder, *folder.parents) if os.path.exists(p))  # (False where it cannot be looked at)
    free, needed = shutil.disk_usage(existing).free, _tensor_bytes(obj)
    reason = (str(err).splitlines() or [type(err).__name__])[0][:300]
    full = free < needed or (isinstance(err, OSError) and err.errno == errno.ENOSPC)
    remedy = "make room there" if full else f"check that {existing} can be written"
    kept = (f"the {LAST} written before stays, and trainer.resume={folder} continues the run from it"
            if os.path.isfile(folder / LAST) else f"no {LAST} of this run was written")
    error = CheckpointError(
        f"could not write the checkpoint {path} ({reason}): {folder} has {_size(free)} free, and the checkpoint needs "
        f"about {_size(needed)}. To go on, {remedy} or set trainer.checkpoint_dir to another folder; {kept}."
    )
    error.__cause__ = err
    return error


def _refreshed(old: Any, new: Any) -> Any:
    """A copy of `new` with its tensors in host memory, written into the tensors of `old` (an
    earlier result) where shape and dtype match, so a held checkpoint costs no new allocation."""
    if isinstance(new, torch.Tensor):
        if isinstance(old, torch.Tensor) and old.shape == new.shape and old.dtype == new.dtype:
            return old.copy_(new.detach())
        return new.detach().to("cpu", copy=True)
    if type(new) is dict:
        old = old if type(old) is dict else {}
        return {key: _refreshed(old.get(key), value) for key, value in new.items()}
    if type(new) in (list, tuple):
        old = old if type(old) is type(new) and len(old) == len(new) else [None] * len(new)
        return type(new)(_refreshed(o, value) for o, value in zip(old, new))
    return copy.deepcopy(new)


class Writer:
    """Writes checkpoints in a background thread, in order, so training does not wait for the disk.

    `submit` takes a snapshot (tensors copied) and returns; `close` waits until everything is
    written. Both raise the CheckpointError of a write that failed since (the first one), so a run
    stops at its next save, not hours later. At most two checkpoints wait at a time. `hold` keeps a
    snapshot in memory instead, replacing the one held for that path; `flush_held` writes them,
    and `submit` of the same path drops it.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._thread: threading.Thread | None = None
        self._held: dict[Path, Any] = {}
        self.error: CheckpointError | None = None

    def check(self) -> None:
        """Raise the error of a write that failed since the last check, if any."""
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def submit(self, obj: Any, path: Path) -> None:
        self._held.pop(path, None)
        self._put(copy.deepcopy(obj), path)

    def hold(self, obj: Any, path: Path) -> None:
        self._held[path] = _refreshed(self._held.get(path), obj)

    def flush_held(self) -> None:
        while self._held:
            path = next(iter(self._held))
            self._put(self._held.pop(path), path)  # the snapshot itself: it is not held any more

    def _put(self, snapshot: Any, path: Path) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tunelab-checkpoints", daemon=True)
            self._thread.start()
        self._queue.put((snapshot, path))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                save_atomic(*item)
            except BaseException as err:  # raised in the training thread by check()
                if self.error is None:  # the first since the last check
                    self.error = write_error(*item, err)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self.check()


class Saver:
    """A run's checkpoints in `folder`: `last.pt` (everything needed to continue) and `best.pt` (the
    weights of the best epoch by `monitor`), written by a Writer.

    A save in the middle of an epoch (a stop, `trainer.checkpoint_every_n_steps`) is always
    written. At an epoch's end `last.pt` is written only when `min_interval_s` seconds have passed
    since the last write, so short epochs do not spend their time on the disk; otherwise the
    snapshot is held in memory, to be written with the next write or by `flush`, which the run
    calls however it ends. A kill -9 loses at most the held epochs.
    """

    def __init__(self, folder: Path, min_interval_s: float, monitor: str) -> None:
        self.folder, self.min_interval_s, self.monitor = folder, min_interval_s, monitor
        self.writer = Writer()
        self.written_at = time.monotonic()

    def save(self, last: dict, loop_state: Any, is_best: bool) -> None:
        """Write or hold this snapshot; first raise the CheckpointError of an earlier write that failed."""
        self.writer.check()
        best = None
        if is_best:  # the weights, and what using them needs: the classes and preprocessing, the run and its config
            best = {"model": last["model"], "epoch": loop_state.epoch, self.monitor: loop_state.best,
                    **{key: last[key] for key in BEST_EXTRAS if key in last}}
        if loop_state.batch or time.monotonic() - self.written_at >= self.min_interval_s:
            self.writer.submit(last, self.folder / LAST)
            if best is not None:
                self.writer.submit(best, self.folder / BEST)
            self.writer.flush_held()  # a best epoch whose write was put off
            self.written_at = time.monotonic()
        else:
            self.writer.hold(last, self.folder / LAST)
            if best is not None:
                self.writer.hold(best, self.folder / BEST)

    def flush(self) -> None:
        self.writer.flush_held()

    def close(self) -> None:
        """Write what is held, wait for every write, and raise a write's error."""
        self.writer.flush_held()
        self.writer.close()


def drop_after_success(folder: Path, keep: str) -> None:
    """Remove what `trainer.keep_checkpoints=keep` does not keep of a finished run's checkpoints
    (a failed or stopped run keeps them all, to be continued)."""
    removed = []
    for name in KEEP[keep]:
        path = folder / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    if removed:
        log.info("Removed %s of the finished run (trainer.keep_checkpoints=%s)", " and ".join(removed), keep)


def rng_state() -> dict:
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(path: Path) -> dict:
    """A checkpoint, loaded with `weights_only=True`; a bad file is a ConfigError naming it."""
    require(path.is_file(), f"trainer.resume={path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"trainer.resume={path}: not a readable tunelab checkpoint ({str(err).splitlines()[0]})") from None


def resolve(resume: str, run_dir: Path | None) -> Path:
    """`auto` = last.pt of the run folder; a folder = its last.pt; else the file itself."""
    if resume == "auto":
        require(run_dir is not None, "trainer.resume=auto needs the run folder: add hydra.run.dir=outputs/runs/DATE/TIME")
        path = run_dir / LAST
        require(path.is_file(), f"trainer.resume=auto: no {LAST} in {run_dir}; give the run folder with hydra.run.dir=... or trainer.resume=PATH")
        return path
    path = Path(os.path.expanduser(str(resume)))
    if path.is_dir():
        path = path / LAST
    require(path.is_file(), f"trainer.resume={resume}: no such checkpoint (expected a {LAST} file or a run folder holding one)")
    return path


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between the checkpoint's flattened config and this run's."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{k} ({saved.get(k)!r} -> {current.get(k)!r})"
        for k in keys
        if not k.startswith(RESUMABLE_CHANGES) and str(saved.get(k)) != str(current.get(k))
    ]
