"""What a trained model needs to be used on new images: its class names and input preprocessing
(`ModelInfo`, stored with every checkpoint and logged model), turning images given as files,
encoded bytes or uint8 arrays into the batch the model was validated on, and classifying them.

The preprocessing is the validation transform of the data option the model was trained on:

- `shorter_side` (`folder`, `csv`, `cifar10`): the shorter side resized to `resize_to` (PIL,
  bilinear; `image_size` when it is None: the per-image path, `data.cache=off`, and CIFAR-10), the
  centre `image_size` square cropped, scaled to [0, 1] and normalized;
- `square` (`digits`, `fake`, held as tensors): the image scaled to [0, 1] and resized to
  `image_size` x `image_size` (bilinear, as those options resize their images once), normalized.

Grey and RGBA images are converted to RGB first.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tunelab.data.files import folder_transforms
from tunelab.errors import ConfigError, require

#: The key of `ModelInfo` in a checkpoint and in a logged model's MLflow metadata.
INFO_KEY = "tunelab"
RESIZES = ("shorter_side", "square")


def tunelab_version() -> str:
    try:
        return version("tunelab")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ModelInfo:
    """A trained classifier's classes (in output order) and its input preprocessing, plus what
    built it: the model config (to rebuild it from a checkpoint), the data option and tunelab's version."""

    classes: list[str]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str
    model_config: dict = field(default_factory=dict)
    data: str = ""
    tunelab_version: str = field(default_factory=tunelab_version)
    #: The shorter side of a `shorter_side` image before its centre crop (files decoded once,
    #: `data.cache`: ceil(image_size * data.cache_scale)); None: `image_size`.
    resize_to: int | None = None

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["mean"], values["std"] = list(self.mean), list(self.std)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelInfo":
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        known["mean"], known["std"] = tuple(known["mean"]), tuple(known["std"])
        known["classes"] = [str(c) for c in known["classes"]]
        require(known["resize"] in RESIZES, f"model info: unknown resize {known['resize']!r} (expected one of {RESIZES})")
        return cls(**known)

    def transform(self, image) -> torch.Tensor:
        """One PIL image -> the normalized CHW float tensor the model was validated on."""
        if self.resize == "shorter_side":  # the file-backed options' own validation transform
            return _plain_transform(self.image_size, self.mean, self.std, self.resize_to)(image.convert("RGB"))
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = F.interpolate(x.unsqueeze(0), size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)[0]
        mean, std = (torch.tensor(v, dtype=x.dtype).view(-1, 1, 1) for v in (self.mean, self.std))
        return (x - mean) / std

    def example(self, n: int = 2) -> np.ndarray:
        """A batch of `n` preprocessed (all-zero) inputs, the shape a logged model is traced on."""
        return np.zeros((n, 3, self.image_size, self.image_size), dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _plain_transform(image_size: int, mean: tuple, std: tuple, resize_to: int | None = None):
    """`data.files.folder_transforms` without augmentation, built once per preprocessing."""
    return folder_transforms(image_size, mean, std, False, resize_to)


def decode(source) -> "Image.Image":  # noqa: F821
    """A PIL image from a file path, encoded bytes (JPEG, PNG, ...), base64 text of such bytes (what
    a JSON request carries) or a uint8 array HxW, HxWx1, HxWx3 or HxWx4. Raises ValueError when
    it is none of these or cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, (list, tuple)):
        return _from_array(np.asarray(source))
    if isinstance(source, str):
        try:
            source = base64.b64decode(source, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a text input must be the base64 encoding of an image file") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    try:
        with Image.open(source) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"not a readable image ({err})") from None


def _from_array(array: np.ndarray):
    from PIL import Image

    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        if not (np.issubdtype(array.dtype, np.integer) and array.size and 0 <= array.min() and array.max() <= 255):
            raise ValueError(f"an image array must hold uint8 values 0-255, got {array.dtype}")
        array = array.astype(np.uint8)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4)):
        return Image.fromarray(array)
    raise ValueError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")


def images_of(model_input) -> list:
    """The images of a pyfunc input, one item each: a pandas DataFrame (its `image` column, else its
    first), a numpy array (NxHxWxC or one HxWxC image of uint8), a list of them, or one image."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - MLflow needs pandas
        pd = None
    if pd is not None and isinstance(model_input, pd.DataFrame):
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if pd is not None and isinstance(model_input, pd.Series):
        return list(model_input)
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        if model_input.ndim == 4 or (model_input.ndim == 3 and model_input.shape[-1] not in (1, 3, 4)):
            return list(model_input)
        return [model_input]
    if isinstance(model_input, (list, tuple, np.ndarray)):
        return list(model_input)
    return [model_input]


def is_preprocessed(model_input) -> bool:
    """A float array or tensor N x 3 x H x W: inputs already preprocessed (MLflow's serving example)."""
    return isinstance(model_input, (np.ndarray, torch.Tensor)) and model_input.ndim == 4 and model_input.shape[1] == 3 \
        and model_input.dtype in (np.float32, np.float64, torch.float32, torch.float64)


@dataclass
class Classifier:
    """A model with its `ModelInfo`, ready to classify images on `device`."""

    module: nn.Module
    info: ModelInfo
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax of the model's logits for a preprocessed batch (on the CPU)."""
        with torch.inference_mode():
            logits = self.module(batch.to(self.device, torch.float32))
        if isinstance(logits, tuple):  # torchvision's training outputs (aux heads); eval mode returns a tensor
            logits = logits[0]
        return logits.float().softmax(1).cpu()

    def classify(self, images: Iterable, batch_size: int = 64) -> torch.Tensor:
        """Probabilities (N x classes) of decoded PIL images, batch by batch."""
        out, batch = [], []
        for image in images:
            batch.append(self.info.transform(image))
            if len(batch) == batch_size:
                out.append(self.probabilities(torch.stack(batch)))
                batch = []
        if batch:
            out.append(self.probabilities(torch.stack(batch)))
        return torch.cat(out) if out else torch.empty(0, len(self.info.classes))

    def top_k(self, probabilities: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        """The k most probable classes of each row, with their probabilities."""
        k = min(k, probabilities.shape[1])
        values, indices = probabilities.topk(k, dim=1)
        return [[(self.info.classes[i], float(p)) for i, p in zip(row_i.tolist(), row_p.tolist())]
                for row_i, row_p in zip(indices, values)]


def class_map(model_classes: Sequence[str], data_classes: Sequence[str], where: str) -> list[int]:
    """For each class of a data set, the index of the model's output of the same name; a data set
    with classes the model lacks is refused, naming them."""
    index = {name: i for i, name in enumerate(model_classes)}
    missing = [name for name in data_classes if name not in index]
    if missing:
        raise ConfigError(f"{where} has classes the model was not trained on: {', '.join(missing)} "
                          f"(the model knows {', '.join(model_classes)}); classes are matched by name")
    return [index[name] for name in data_classes]
