"""MixUp and CutMix on training batches (`data.mixup=ALPHA`, `data.cutmix=ALPHA`), with
torchvision.transforms.v2's `MixUp` and `CutMix`.

Each batch of the training loader is mixed with itself rolled by one (torchvision's rule): MixUp
blends every image with its neighbour, CutMix pastes a box of it, with a proportion drawn from
Beta(ALPHA, ALPHA) per batch; with both set, each batch gets one of the two at random. The targets
become the matching mixtures of one-hot labels (each row sums to 1), which CrossEntropyLoss takes
as probabilities. The draws use torch's global generator, which checkpoints save, so a resumed run
mixes as an uninterrupted one. Validation and test batches are never mixed.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from tunelab.errors import require


def mixer(mixup: float | None, cutmix: float | None, num_classes: int):
    """The batch transform for the configured alphas, or None when neither is set."""
    chosen = []
    for key, alpha, kind in (("data.mixup", mixup, v2.MixUp), ("data.cutmix", cutmix, v2.CutMix)):
        if alpha is None:
            continue
        require(isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0,
                f"{key}={alpha!r} must be the alpha of a Beta distribution, > 0 (0.2-1.0 is usual), or null (off)")
        chosen.append(kind(alpha=float(alpha), num_classes=num_classes))
    if not chosen:
        return None
    return chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)


class MixedBatches:
    """The training loader with every batch mixed: (images, soft targets of shape batch x classes).

    Everything else (its length, `start_at`, its sampler) is the wrapped loader's.
    """

    def __init__(self, loader, mix) -> None:
        self.loader, self.mix = loader, mix

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __iter__(self):
        for x, y in self.loader:
            yield self.mix(x, torch.as_tensor(y))
