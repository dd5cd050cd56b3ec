"""The reference: the subject's bare loop, no framework, no logging. Same data, model and work as
`python train.py model=resnet18 scheduler=cosine` (digits at 32 px, batch 64, SGD momentum 0.9,
weight decay 5e-4, lr 0.05, cosine stepped per optimizer step, validation each epoch).

    python benchmarks/bare_loop.py --epochs 4 [--fused]

`--fused` gives SGD torch's fused kernel, as tunelab's optimizer configs do (`optimizer.fused`):
the same update rule, one kernel for all parameters. Against it, a ratio shows what tunelab
itself costs; against the plain loop, what a user gains or loses by using it.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def digits(size: int = 32, seed: int = 42):
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1) - MEAN) / STD
    y = torch.tensor(bunch.target)
    # the split sizes of tunelab's digits: 20 % held out for a test first (which this loop never
    # uses), then val, 20 % of the whole, from the rest; train is the remaining 60 %
    rest, _ = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=0, stratify=y.numpy())
    tr, va = train_test_split(rest, test_size=0.25, random_state=seed, stratify=y.numpy()[rest])
    return x[tr].contiguous(), y[tr], x[va].contiguous(), y[va]


def build(seed: int = 42):
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Linear(512, 10)
    return model


def sgd(model, fused: bool = False):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, fused=fused)


def train_epoch(model, opt, sched, x, y, batch_size: int, epoch: int, seed: int = 42) -> None:
    model.train()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    for i in range(0, len(y), batch_size):
        idx = order[i : i + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def validate(model, x, y, batch_size: int) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(y), batch_size):
            correct += (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
    return correct / len(y)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default=None, help="save the final weights here")
    parser.add_argument("--fused", action="store_true", help="torch's fused SGD kernel (as tunelab's configs use)")
    args = parser.parse_args()
    started = time.perf_counter()
    x, y, xv, yv = digits()
    model = build()
    opt = sgd(model, args.fused)
    steps = args.epochs * -(-len(y) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for epoch in range(args.epochs):
        train_epoch(model, opt, sched, x, y, 64, epoch)
        acc = validate(model, xv, yv, 64)
        print(f"epoch {epoch + 1}: val/acc {acc:.4f}  {time.perf_counter() - started:.1f}s", flush=True)
    if args.out:
        torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
