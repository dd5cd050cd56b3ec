"""A model's predictions on a whole split, and what a person reads from them: the metrics, the
per-class table, the confusion matrix and the images it got most confidently wrong."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from tunelab import metrics
from tunelab.loop import forward_logits

#: How many of the most confidently wrong images `top_losses_figure` shows.
TOP_LOSSES = 16


@dataclass
class Predictions:
    """The logits of every image of a split, in the split's order, and the true classes (on the CPU)."""

    logits: torch.Tensor
    targets: torch.Tensor

    @property
    def predicted(self) -> torch.Tensor:
        return self.logits.argmax(1)

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(1)

    def confusion(self) -> torch.Tensor:
        return metrics.confusion(self.predicted, self.targets, self.logits.shape[1])

    def scores(self, loss_fn: nn.Module, prefix: str) -> dict[str, float]:
        """`<prefix>/acc`, `/loss`, `/balanced_acc`, `/macro_f1`."""
        found = metrics.summary(self.confusion())
        with torch.inference_mode():  # an evaluation: the loss builds no graph (and knows it is not training)
            found["loss"] = loss_fn(self.logits.to(_device(loss_fn)), self.targets.to(_device(loss_fn))).item()
        return {f"{prefix}/{key}": found[key] for key in ("acc", "loss", "balanced_acc", "macro_f1")}


def _device(module: nn.Module) -> torch.device:
    """Where a loss's tensors live (its class weights), the CPU when it has none."""
    return next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))


def predict(module: nn.Module, loader, device: torch.device, precision: str = "32", channels_last: bool = False) -> Predictions:
    """Every batch of `loader` through `module` in eval mode under `torch.inference_mode()`."""
    was_training = module.training
    _set_training(module, False)
    logits, targets = [], []
    with torch.inference_mode():
        for x, y in loader:
            logits.append(forward_logits(module, x.to(device), device, precision, channels_last).float().cpu())
            targets.append(y.cpu())
    _set_training(module, was_training)
    return Predictions(torch.cat(logits), torch.cat(targets))


def _set_training(module: nn.Module, training: bool) -> None:
    """`module.train(training)`; a model loaded from torch.export's format (traced in eval mode) refuses the call."""
    try:
        module.train(training)
    except (NotImplementedError, RuntimeError):
        pass


def per_class_csv(splits: dict[str, Predictions], classes: Sequence[str]) -> str:
    """split, class, precision, recall, f1, support: one row per class of each split."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["split", "class", "precision", "recall", "f1", "support"])
    for split, found in splits.items():
        for name, row in zip(classes, metrics.per_class(found.confusion())):
            writer.writerow([split, name, f"{row['precision']:.6f}", f"{row['recall']:.6f}", f"{row['f1']:.6f}", row["support"]])
    return out.getvalue()


def confusion_figure(found: Predictions, classes: Sequence[str], title: str):
    """The confusion matrix with class names and counts, coloured by the share of each true class."""
    from tunelab.plots import pyplot

    plt = pyplot()
    matrix = found.confusion().cpu()
    shares = matrix.double() / matrix.sum(1, keepdim=True).clamp(min=1)
    side = max(4.5, 0.55 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side + 1.2, side), constrained_layout=True)
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    for i in range(len(classes)):
        for j in range(len(classes)):
            count = int(matrix[i, j])
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45 if max(map(len, classes)) > 3 else 0, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    return fig


def most_confidently_wrong(found: Predictions) -> list[int]:
    """The indices of the misclassified images, the most confident prediction first (TOP_LOSSES at most)."""
    probability, predicted = found.probabilities.max(1)
    wrong = (predicted != found.targets).nonzero().flatten()
    return wrong[probability[wrong].argsort(descending=True)][:TOP_LOSSES].tolist()


@dataclass
class TestFigures:
    """What `confusion_matrix.png` and `top_losses.png` are drawn from: small enough to be sent to the
    process that draws them (MLflow's helper process), so the training process never imports
    matplotlib for them. It holds numpy arrays, not tensors: torch pickles tensors for another
    process through shared memory that only its own children may open. `images` holds the most
    confidently wrong images, by index."""

    logits: np.ndarray
    targets: np.ndarray
    images: dict[int, np.ndarray]
    classes: list[str]
    mean: tuple
    std: tuple
    folder: str | None = None

    @classmethod
    def of(cls, found: Predictions, images: dict, classes, mean, std, folder: str | None) -> "TestFigures":
        arrays = {i: image.cpu().numpy() for i, image in images.items()}
        return cls(found.logits.numpy(), found.targets.numpy(), arrays, list(classes), tuple(mean), tuple(std), folder)

    def draw(self) -> dict:
        """{file name: figure}; the caller closes the figures."""
        found = Predictions(torch.from_numpy(self.logits), torch.from_numpy(self.targets))
        return {
            "confusion_matrix.png": confusion_figure(found, self.classes, "Test confusion matrix"),
            "top_losses.png": top_losses_figure(found, lambda i: torch.from_numpy(self.images[i]), self.classes, self.mean, self.std,
                                                "Test images the model got most confidently wrong"),
        }


def top_losses_figure(found: Predictions, images, classes: Sequence[str], mean: Sequence[float], std: Sequence[float], title: str):
    """The images the model got most confidently wrong, each with its true and predicted class and
    the predicted probability; `images(i)` returns image i of the split as a normalized CHW tensor."""
    from tunelab.plots import pyplot

    plt = pyplot()
    probability, predicted = found.probabilities.max(1)
    order = most_confidently_wrong(found)
    columns = 4
    rows = max(1, -(-len(order) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows + 0.4), squeeze=False, constrained_layout=True)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order):
        pixels = images(i) * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
        ax.imshow(pixels.clamp(0, 1).permute(1, 2, 0).numpy())
        ax.set_title(f"true {classes[int(found.targets[i])]}\npredicted {classes[int(predicted[i])]} ({probability[i]:.2f})", fontsize=8)
    fig.suptitle(title if order else f"{title}: no image is misclassified", fontsize=10)
    return fig
