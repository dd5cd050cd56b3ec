"""Classification metrics from a confusion matrix counted on the device.

Validation counts a confusion matrix per batch (one `bincount`), so accuracy, balanced accuracy and
macro F1 cost no transfer of predictions and no import of scikit-learn (over a second of start-up).
The definitions are scikit-learn's, and tests check them against `accuracy_score`,
`balanced_accuracy_score`, `f1_score(average="macro")` and `precision_recall_fscore_support`:

- balanced accuracy: the mean recall over the classes present in the targets;
- macro F1: the mean F1 over the classes present in the targets or the predictions, a class with
  no true positive scoring 0 (scikit-learn's `zero_division=0`);
- per class: precision (0 for a class never predicted), recall (0 for a class with no image), F1
  and support.
"""

from __future__ import annotations

import torch


def lower_is_better(name: str) -> bool:
    """Whether a smaller value of the metric `name` is better: the losses (`val/loss`, `val/loss_ema`)."""
    return name.rsplit("/", 1)[-1].split("_")[0] == "loss"


def confusion(predicted: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """The confusion matrix (rows: true class, columns: predicted class), on the targets' device."""
    return torch.bincount(target * classes + predicted, minlength=classes * classes).view(classes, classes)


def summary(matrix: torch.Tensor) -> dict[str, float]:
    """`acc`, `balanced_acc` and `macro_f1` of a confusion matrix."""
    m = matrix.double()
    true_positive, support, predicted = m.diag(), m.sum(1), m.sum(0)
    total = m.sum().clamp(min=1)
    present = support > 0
    recall = true_positive[present] / support[present]
    scored = present | (predicted > 0)
    f1 = 2 * true_positive / (support + predicted).clamp(min=1)
    return {
        "acc": (true_positive.sum() / total).item(),
        "balanced_acc": recall.mean().item() if present.any() else 0.0,
        "macro_f1": f1[scored].mean().item() if scored.any() else 0.0,
    }


def per_class(matrix: torch.Tensor) -> list[dict[str, float]]:
    """Precision, recall, F1 and support of each class, in class order."""
    m = matrix.double().cpu()
    true_positive, support, predicted = m.diag(), m.sum(1), m.sum(0)
    precision = torch.where(predicted > 0, true_positive / predicted.clamp(min=1), torch.zeros_like(predicted))
    recall = torch.where(support > 0, true_positive / support.clamp(min=1), torch.zeros_like(support))
    f1 = 2 * true_positive / (support + predicted).clamp(min=1)
    return [{"precision": p.item(), "recall": r.item(), "f1": f.item(), "support": int(s.item())}
            for p, r, f, s in zip(precision, recall, f1, support)]
