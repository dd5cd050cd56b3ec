"""Decoded images, kept: each file decoded once, its shorter side resized, stored as uint8 pixels.

A store is two files under `cache_dir()/decoded/`: `<key>.u8`, every image's HWC pixels one after
another, and `<key>.npz`, their shapes. The key is a hash of the file list (paths, sizes,
modification times) and the shorter side, so a changed, added or removed file gives a new store.
Both files are written under temporary names and renamed, the index last (an index names a complete
store); a lock on `<key>.lock` makes the jobs of a sweep that start together build it once while
the others wait, then read it.

The first pass decodes with torchvision (`decode_image`, libjpeg-turbo and libpng) in a pool of
threads, with a progress bar; JPEGs are decoded by the GPU (`decode_jpeg(device="cuda")`) when
there is one. A file torchvision cannot decode is read by PIL, as the per-image path reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tunelab.data.splits import cache_dir
from tunelab.errors import ConfigError

log = logging.getLogger(__name__)

#: Part of every key: a store written by an older layout is never read as this one.
FORMAT = "tunelab-decoded-1"
#: Images the GPU decodes per call when there is one.
GPU_BATCH = 64


class Pixels:
    """uint8 images of different sizes in one flat array (in memory, or memory-mapped from a store):
    image `i` is CHW, a view of its HWC pixels. An image of shape (0, 0, 3) could not be decoded."""

    def __init__(self, flat: np.ndarray, shapes: np.ndarray, where: str = "in memory") -> None:
        self.flat, self.shapes, self.where = flat, np.asarray(shapes, dtype=np.int64), where
        self.offsets = np.concatenate([[0], np.cumsum(self.shapes.prod(axis=1))])

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.view(i))).permute(2, 0, 1)  # a copy: a memory map is read-only

    def view(self, i: int) -> np.ndarray:
        """Image `i` as its stored HWC pixels, not copied (read-only when memory-mapped)."""
        h, w, c = (int(n) for n in self.shapes[i])
        return self.flat[self.offsets[i] : self.offsets[i + 1]].reshape(h, w, c)

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])

    def readable(self) -> np.ndarray:
        return self.shapes[:, 0] > 0


def shorter_side(image_size: int, scale: float) -> int:
    """The shorter side images are stored at: ceil(image_size * scale) (`data.cache_scale`)."""
    return math.ceil(image_size * scale - 1e-9)


def resize(image: torch.Tensor, side: int) -> torch.Tensor:
    """A CHW uint8 image with its shorter side resized to `side` (bilinear, antialiased), as stored."""
    from torchvision.transforms.v2 import functional as F

    return F.resize(image, [side], antialias=True)


def decode_file(path: str, side: int) -> torch.Tensor:
    """One file as the store keeps it: decoded to RGB (torchvision, else PIL), then `resize`d.

    Raises the decoder's error when neither can read it.
    """
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        image = decode_image(read_file(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):  # a format or a variant torchvision does not decode
        from PIL import Image

        with Image.open(path) as opened:
            image = torch.from_numpy(np.asarray(opened.convert("RGB")).copy()).permute(2, 0, 1)
    return resize(image, side)


def store_key(paths: Sequence[str], side: int) -> str:
    """A hash of what the store depends on: each file's path, size and modification time, and the side."""
    digest = hashlib.sha256(f"{FORMAT}|{side}".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"|{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def open_store(paths: Sequence[str], side: int, skip_bad_files: bool = False) -> Pixels:
    """The decoded images of `paths` (in that order), memory-mapped from their store, which is
    decoded first when there is none. Where the cache folder cannot be written, the images are
    decoded into memory for this run only (and the log says so)."""
    key = store_key(paths, side)
    folder = cache_dir() / "decoded"
    data, index = folder / f"{key}.u8", folder / f"{key}.npz"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder / f"{key}.lock"):
            if not _intact(data, index):
                _write(paths, side, data, index, skip_bad_files)
    except OSError as err:
        log.warning("Cannot write the decoded images to %s (%s): decoding them into memory for this run only", folder, err)
        return _decode_all(paths, side, skip_bad_files, None)
    with np.load(index) as saved:
        shapes = saved["shapes"]
    flat = np.memmap(data, dtype=np.uint8, mode="r") if data.stat().st_size else np.zeros(0, np.uint8)
    return Pixels(flat, shapes, f"memory-mapped from {data}")


def _intact(data: Path, index: Path) -> bool:
    try:
        with np.load(index) as saved:
            return int(saved["shapes"].prod(axis=1).sum()) == data.stat().st_size
    except (OSError, ValueError, KeyError):
        return False


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` (a job of a sweep that finds it taken waits for the store)."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): the rename alone keeps the store intact
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Another process is decoding these images into %s: waiting for it", path.parent)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write(paths: Sequence[str], side: int, data: Path, index: Path, skip_bad_files: bool) -> None:
    """Decode `paths` into `data` and `index`, each written under a temporary name and renamed."""
    suffix = f".{os.getpid()}.tmp"
    tmp_data, tmp_index = data.with_name(data.name + suffix), index.with_name(index.stem + suffix + ".npz")
    try:
        with open(tmp_data, "wb") as out:
            shapes = _decode_all(paths, side, skip_bad_files, out).shapes
        np.savez(tmp_index, shapes=shapes)
        os.replace(tmp_data, data)
        os.replace(tmp_index, index)
    finally:
        for tmp in (tmp_data, tmp_index):
            tmp.unlink(missing_ok=True)
    log.info("Decoded images stored in %s (%.0f MB); delete it to free the space", data, data.stat().st_size / 2**20)


def _decode_all(paths: Sequence[str], side: int, skip_bad_files: bool, out) -> Pixels:
    """Every image of `paths`, decoded in parallel (JPEGs on the GPU when there is one), with a
    progress bar: written to `out` when given, else kept in memory."""
    from tqdm.auto import tqdm

    started, shapes, kept = time.perf_counter(), [], []
    log.info("Decoding %d images once (shorter side %d px)%s", len(paths), side, " on the GPU" if torch.cuda.is_available() else "")
    with ThreadPoolExecutor(max(1, len(os.sched_getaffinity(0)))) as pool, \
            tqdm(total=len(paths), desc="Decoding images", unit="img", leave=False, dynamic_ncols=True) as bar:
        for path, image in zip(paths, _decoded(paths, side, pool)):
            pixels = _pixels_of(path, image, skip_bad_files)
            shapes.append(pixels.shape)
            (out.write(pixels.tobytes()) if out is not None else kept.append(pixels.reshape(-1)))
            bar.update()
    seconds = time.perf_counter() - started
    log.info("Decoded %d images in %.1f s (%.0f images/s)", len(paths), seconds, len(paths) / max(seconds, 1e-9))
    flat = np.concatenate(kept) if kept else np.zeros(0, np.uint8)
    return Pixels(flat, np.asarray(shapes, dtype=np.int64).reshape(-1, 3))


def _pixels_of(path: str, image: torch.Tensor | Exception, skip_bad_files: bool) -> np.ndarray:
    """A decoded image's HWC pixels, or (0, 0, 3) for a file that could not be decoded and is skipped."""
    if isinstance(image, Exception):
        if not skip_bad_files:
            raise ConfigError(f"data.dataset.root: cannot decode image {path}: {image}. "
                              "Remove it, or skip such files with data.dataset.skip_bad_files=true")
        log.warning("Skipped %s: it cannot be decoded (%s)", path, image)
        return np.zeros((0, 0, 3), np.uint8)
    return image.permute(1, 2, 0).contiguous().numpy()


def _decoded(paths: Sequence[str], side: int, pool: ThreadPoolExecutor):
    """The images of `paths` in order (or the error that stopped each), decoded by `pool`'s threads,
    or on the GPU in batches of `GPU_BATCH` when there is one."""

    def one(path):
        try:
            return decode_file(path, side)
        except Exception as err:  # named (or skipped) by the caller, as the per-image check does
            return err

    if not torch.cuda.is_available():
        yield from pool.map(one, paths)
        return
    for start in range(0, len(paths), GPU_BATCH):
        batch = list(paths[start : start + GPU_BATCH])
        yield from _decoded_on_gpu(batch, side) or pool.map(one, batch)


def _decoded_on_gpu(paths: list[str], side: int) -> list[torch.Tensor] | None:
    """`paths` decoded by nvJPEG and resized on the GPU, or None when one of them is not a JPEG or
    the GPU cannot decode it (the batch is then decoded on the CPU)."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    encoded = [read_file(p) for p in paths]
    if not all(len(e) > 2 and e[0] == 0xFF and e[1] == 0xD8 for e in encoded):
        return None
    try:
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device="cuda")
    except RuntimeError as err:
        log.debug("GPU decoding failed (%s): decoding this batch on the CPU", err)
        return None
    return [resize(image, side).cpu() for image in images]
