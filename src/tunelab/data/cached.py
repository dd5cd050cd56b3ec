"""File-backed splits read from decoded pixels (`data.cache`), augmented as uint8 tensors.

`cached_splits` turns the splits of `folder`, `csv` and `cifar10` into `CachedImages`: each file is
decoded once into a store (`data.decoded`) that every later epoch, run and job of a sweep reads;
CIFAR-10's images are decoded already (torchvision holds them as an array), so they are only no
longer turned into PIL images. Training images get the random steps of the per-image path
(`files.augment_steps`, torchvision.transforms.v2) on uint8 tensors; validation and test images are
the centre crop of their stored image. A loader (`make_loader`) takes uint8 batches and converts and
normalizes them where the model is (`to_device`), so a GPU receives a quarter of the bytes.

The random draws of an image are a function of (seed, epoch, position in the epoch): the sampler
passes each position's seed with the index, so a run resumed mid-epoch, any number of loader
workers and `trainer.deterministic=true` all see the same crops.
"""

from __future__ import annotations

import copy
import logging
import math
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from tunelab.data.decoded import Pixels, open_store, shorter_side
from tunelab.data.files import augment_steps
from tunelab.data.splits import Splits
from tunelab.errors import require

log = logging.getLogger(__name__)

#: `data.cache` values: auto (memory when the store fits MEMORY_SHARE of the free memory, else memory-mapped), memory, disk, off.
CACHE_MODES = ("auto", "memory", "disk", "off")
#: Share of the machine's available memory a store may take when `data.cache=auto` reads it in.
MEMORY_SHARE = 0.25


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 image(s) -> float, scaled to [0, 1] and normalized: ToTensor + Normalize's (x / 255 - mean) / std
    as one multiply and one add in place on the new float tensor (scale and shift worked out in double;
    within 1e-6 of the three-step arithmetic, in half its time).

    A batch on the CPU is converted an image at a time, so the multiply and the add find its 600 KB
    (at 224 px) still in the core's cache rather than reading the whole batch back from memory:
    about 10% more images/s through a CPU run's loader, with the same numbers."""
    scale = (1.0 / (255.0 * std.double())).float().to(images.device)
    shift = (-mean.double() / std.double()).float().to(images.device)
    if images.dim() < 4 or images.device.type != "cpu":
        return images.float().mul_(scale).add_(shift)
    out = torch.empty(images.shape, dtype=torch.float32)
    for image, converted in zip(images, out):
        converted.copy_(image).mul_(scale).add_(shift)
    return out


def draw_box(height: int, width: int, scale, ratio, u) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop, drawn as torchvision's RandomResizedCrop draws it:
    up to ten tries of an area share uniform in `scale` and a log-uniform aspect ratio in `ratio`,
    the first box that fits placed uniformly, else the central crop clamped to `ratio`.

    `u` holds the 40 uniform numbers in [0, 1) of the ten tries (area, aspect, top, left), drawn in
    one call: `get_params` asks the generator six times per try, which costs about as much as
    resizing the crop."""
    area, (low, high) = height * width, (math.log(ratio[0]), math.log(ratio[1]))
    for a, r, t, l in u:
        target, aspect = area * (scale[0] + a * (scale[1] - scale[0])), math.exp(low + r * (high - low))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(t * (height - h + 1)), int(l * (width - w + 1)), h, w
    shape = width / height
    if shape < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif shape > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class CropFirst:
    """The training steps of `files.augment_steps` (random resized crop, flip, then any policy) on a
    stored image, reading only the pixels its crop keeps.

    The crop's box is drawn as torchvision's RandomResizedCrop draws it (`draw_box`), then only that
    box is copied out of the store and flipped before it is resized: the same image distribution as
    the steps applied in turn, without copying and resizing the whole stored image. The image comes
    out channels-last in memory, as the resize leaves it; a batch's collate lays it out.
    """

    def __init__(self, steps: list) -> None:
        from torchvision.transforms import v2

        crop, flip, *rest = steps
        require(isinstance(crop, v2.RandomResizedCrop) and isinstance(flip, v2.RandomHorizontalFlip),
                f"CropFirst takes a random resized crop and a flip first, got {steps}")
        self.size, self.scale, self.ratio, self.flip = list(crop.size), crop.scale, crop.ratio, flip.p
        self.rest = v2.Compose(rest) if rest else None

    def __call__(self, pixels: Pixels, i: int) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        stored = pixels.view(i)
        u = torch.rand(41, dtype=torch.float64).tolist()  # the flip, then ten tries of the box
        top, left, h, w = draw_box(*stored.shape[:2], self.scale, self.ratio, zip(*[iter(u[1:])] * 4))
        box = torch.from_numpy(np.ascontiguousarray(stored[top : top + h, left : left + w])).permute(2, 0, 1)
        image = F.resize(F.horizontal_flip(box) if u[0] < self.flip else box, self.size, antialias=True)
        return self.rest(image) if self.rest is not None else image


class CentreCrop:
    """The centre `size` square of a stored image (as `CenterCrop`), copying only that square."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, pixels: Pixels, i: int) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        stored, size = pixels.view(i), self.size
        h, w = stored.shape[:2]
        if h < size or w < size:  # padded as CenterCrop pads
            return F.center_crop(pixels[i], [size])
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        return torch.from_numpy(np.ascontiguousarray(stored[top : top + size, left : left + size])).permute(2, 0, 1)


class Whole:
    """A transform of the whole stored image (CHW uint8), e.g. a resize before the centre crop."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, pixels: Pixels, i: int) -> torch.Tensor:
        return self.transform(pixels[i])


class CachedImages(Dataset):
    """The images of a split read from decoded pixels: (normalized float CHW image, class index).

    `samples`, `targets` and `classes` are those of the split it replaces (without files that could
    not be decoded when they are skipped). An item is an index, or (index, seed) from a keyed
    sampler: the transform's random draws then come from that seed, and the global generator is
    left as it was. `batched()` gives the same images as uint8 for a loader that normalizes batches.
    """

    def __init__(self, source: Dataset, pixels: Pixels, index: list[int], transform, mean, std) -> None:
        """`transform(pixels, i)` gives stored image `i` as the CHW uint8 tensor the model sees."""
        keep = [k for k, i in enumerate(index) if pixels.shapes[i][0] > 0]
        samples = getattr(source, "samples", None)
        self.samples = self.imgs = [samples[k] for k in keep] if samples is not None else None
        self.targets = [int(source.targets[k]) for k in keep]
        self.classes, self.class_to_idx = source.classes, getattr(source, "class_to_idx", None)
        self.pixels, self.index, self.transform = pixels, [index[k] for k in keep], transform
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (mean, std))
        self.raw, self.device = False, None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item):
        i, draw = item if isinstance(item, tuple) else (item, None)
        if draw is None:
            image = self.transform(self.pixels, self.index[i])
        else:
            state = torch.get_rng_state()
            torch.default_generator.manual_seed(draw)
            try:
                image = self.transform(self.pixels, self.index[i])
            finally:
                torch.set_rng_state(state)
        return (image if self.raw else normalize(image.contiguous(), self.mean, self.std)), self.targets[i]

    def batched(self) -> "CachedImages":
        """These images as uint8 (for a loader that normalizes whole batches)."""
        other = copy.copy(self)
        other.raw = True
        return other

    def on(self, device: torch.device) -> "CachedImages":
        """These images with their batches normalized on `device` (where the model is)."""
        other = copy.copy(self)
        other.device = device
        return other


def check_cache(mode, scale) -> None:
    require(mode in CACHE_MODES, f"data.cache={mode!r} must be one of auto, memory, disk, off")
    ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale >= 1
    require(ok, f"data.cache_scale={scale!r} must be a number >= 1: images are stored with their shorter side at "
                "ceil(data.image_size * data.cache_scale), and validation takes the centre data.image_size square of that")


def cached_splits(splits: Splits, mode: str, scale: float, image_size: int, mean, std, augment, skip_bad_files: bool = False):
    """`splits` read from decoded pixels, and the shorter side validation images are resized to
    before the centre crop (None: `image_size`, as the per-image path). With `data.cache=off`, or
    data that is not file-backed, `splits` as they are."""
    from torchvision.transforms import v2

    check_cache(mode, scale)
    parts = [p for p in (splits.train, splits.val, splits.test) if p is not None]
    if mode == "off":
        log.info("Data path: every image decoded and transformed by the loader's workers each epoch (data.cache=off)")
        return splits, None
    train_steps = augment_steps(image_size, augment)
    if all(getattr(p, "samples", None) is not None for p in parts):
        side = shorter_side(image_size, scale)
        paths = sorted({path for p in parts for path, _ in p.samples})
        pixels = _read(open_store(paths, side, skip_bad_files), mode)
        row = {path: k for k, path in enumerate(paths)}
        indices = [[row[path] for path, _ in p.samples] for p in parts]
        plain = CentreCrop(image_size)
        log.info("Data path: %d files decoded once, shorter side %d px (data.cache_scale=%s), %.0f MB %s (data.cache=%s); "
                 "images augmented as uint8 tensors", len(paths), side, scale, pixels.nbytes / 2**20, pixels.where, mode)
    elif all(isinstance(getattr(p, "data", None), np.ndarray) for p in parts):  # CIFAR-10: decoded already
        pixels = [Pixels(p.data.reshape(-1), np.tile(p.data.shape[1:], (len(p.data), 1))) for p in parts]
        indices, side = [list(range(len(p.data))) for p in parts], None
        plain = Whole(v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]))
        log.info("Data path: the images are decoded already (an array in memory) and augmented as uint8 tensors (data.cache=%s)", mode)
    else:
        return splits, None
    stores = pixels if isinstance(pixels, list) else [pixels] * len(parts)
    train_tf = CropFirst(train_steps) if train_steps else plain
    made = [CachedImages(p, s, i, train_tf if p is splits.train else plain, mean, std) for p, s, i in zip(parts, stores, indices)]
    return Splits(made[0], made[1], splits.classes, made[2] if splits.test is not None else None), side


def _read(pixels: Pixels, mode: str) -> Pixels:
    """The store read into memory (`memory`, or `auto` when it fits MEMORY_SHARE of the available memory), else as it is."""
    if mode == "disk" or pixels.where == "in memory":
        return pixels
    if mode == "auto" and pixels.nbytes > MEMORY_SHARE * _available_memory():
        return pixels
    return Pixels(np.array(pixels.flat), pixels.shapes, "in memory")


def _available_memory() -> int:
    """Bytes of memory available to new processes (MemAvailable), or all of it where that is unknown."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
