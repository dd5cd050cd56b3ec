"""The training loop: train and validate each epoch, step the schedule, hand metrics to the logger.

Per optimizer step s (0-based over the whole run) the logger receives `lr` (and `lr/<group>` when
there are several groups): the rate that step used, read just before `optimizer.step()`, and
`train/loss`, the mean loss of the batches accumulated into that step. Per epoch it receives
`train/acc`, `val/loss`, `val/acc` and `trainable_params` at `step=epoch`. Losses stay on the device
and are read once per logging interval, so a step never waits for the host.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from tunelab.errors import ConfigError

log = logging.getLogger(__name__)

#: Weight of each auxiliary head's loss (Inception v3, GoogLeNet), as in their papers' training.
AUX_LOSS_WEIGHT = 0.4


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class History:
    """What the loop measured: per-step lrs per group and per-epoch metrics."""

    lrs: dict[str, list[float]] = field(default_factory=dict)
    epochs: list[dict[str, float]] = field(default_factory=list)

    def best(self, monitor: str) -> float:
        values = [e[monitor] for e in self.epochs if monitor in e]
        if not values:
            return math.nan
        return min(values) if monitor.endswith("loss") else max(values)


def group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    return [g.get("name", str(i)) for i, g in enumerate(optimizer.param_groups)]


def lr_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`lr` (group 0) and, with several groups, `lr/<name>` for each."""
    groups = optimizer.param_groups
    metrics = {"lr": groups[0]["lr"]}
    if len(groups) > 1:
        metrics.update({f"lr/{name}": g["lr"] for name, g in zip(group_names(optimizer), groups)})
    return metrics


def _split_outputs(outputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Main logits and auxiliary logits (Inception/GoogLeNet return a tuple in training)."""
    if isinstance(outputs, torch.Tensor):
        return outputs, []
    main, *aux = outputs
    return main, [a for a in aux if a is not None]


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def evaluate(model: nn.Module, loader, loss_fn, device: torch.device, precision: str = "32") -> dict[str, float]:
    """Mean loss and accuracy over `loader`, in eval mode under `torch.inference_mode()`."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    with torch.inference_mode(), _autocast(device, precision):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits, _ = _split_outputs(model(x))
            total_loss += loss_fn(logits.float(), y) * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
    model.train(was_training)
    return {"val/loss": (total_loss / max(seen, 1)).item(), "val/acc": correct.item() / max(seen, 1)}


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    optimizer: torch.optim.Optimizer,
    schedule,
    loss_fn: nn.Module,
    logger,
    *,
    max_epochs: int,
    device: torch.device,
    train_mode: Callable[[], None],
    trainable_params: Callable[[], int],
    accumulate: int = 1,
    precision: str = "32",
    progress: bool = True,
    log_every: int = 50,
    start_epoch: int = 0,
    on_epoch_start: Callable[[int], None] | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    history: History | None = None,
) -> History:
    """Train for `max_epochs`, validating after each; return the history.

    `train_mode()` puts the model in training mode (frozen BatchNorm stays in eval);
    `schedule.after_optimizer_step()` runs after every `optimizer.step()`,
    `schedule.after_epoch(metrics)` after every validation.
    """
    from tqdm.auto import tqdm

    history = history or History()
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    batches = len(train_loader)
    steps_per_epoch = math.ceil(batches / accumulate)
    step = start_epoch * steps_per_epoch
    check_every = 1 if device.type == "cpu" else log_every
    for epoch in range(start_epoch, max_epochs):
        started = time.perf_counter()
        if on_epoch_start:
            on_epoch_start(epoch)
        train_mode()
        train_loader.sampler.set_epoch(epoch)
        pending: list[tuple[int, dict[str, float], torch.Tensor]] = []
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        step_loss = torch.zeros((), device=device)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{max_epochs}", disable=not progress, leave=False, dynamic_ncols=True)

        def drain() -> None:
            """Read the pending step losses once, check them, and hand everything to the logger."""
            if not pending:
                return
            losses = torch.stack([loss for _, _, loss in pending]).tolist()
            for (s, lrs, _), value in zip(pending, losses):
                if not math.isfinite(value):
                    raise NonFiniteLossError(f"the training loss is {value} at optimizer step {s} (epoch {epoch}, lr {lrs['lr']:.6g})")
                logger.log_metrics({**lrs, "train/loss": value}, step=s)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{pending[-1][1]['lr']:.3g}", refresh=False)
            pending.clear()
            logger.flush()

        for i, (x, y) in enumerate(train_loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            in_step = min(accumulate, batches - (i // accumulate) * accumulate)
            with _autocast(device, precision):
                logits, aux = _split_outputs(model(x))
                loss = loss_fn(logits.float(), y)
                full = loss + AUX_LOSS_WEIGHT * sum(loss_fn(a.float(), y) for a in aux) if aux else loss
            scaler.scale(full / in_step).backward()
            detached = loss.detach()
            step_loss += detached / in_step
            loss_sum += detached * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if (i + 1) % accumulate and i + 1 != batches:
                continue
            lrs = lr_metrics(optimizer)
            for name, g in zip(group_names(optimizer), optimizer.param_groups):
                history.lrs.setdefault(name, []).append(g["lr"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            schedule.after_optimizer_step()
            pending.append((step, lrs, step_loss))
            step_loss = torch.zeros((), device=device)
            step += 1
            bar.update()
            if len(pending) >= log_every or (check_every == 1 and not math.isfinite(pending[-1][2].item())):
                drain()
        drain()
        bar.close()
        metrics = {"train/loss": (loss_sum / max(seen, 1)).item(), "train/acc": correct.item() / max(seen, 1)}
        metrics.update(evaluate(model, val_loader, loss_fn, device, precision))
        schedule.after_epoch(metrics)
        epoch_metrics = {"train/acc": metrics["train/acc"], "val/loss": metrics["val/loss"], "val/acc": metrics["val/acc"], "trainable_params": float(trainable_params())}
        logger.log_metrics(epoch_metrics, step=epoch)
        logger.flush()
        history.epochs.append({"epoch": epoch, **metrics, "trainable_params": trainable_params(), "seconds": time.perf_counter() - started})
        log.info(
            "epoch %d/%d  train/loss %.4f  train/acc %.4f  val/loss %.4f  val/acc %.4f  lr %.4g  %.1fs",
            epoch + 1, max_epochs, metrics["train/loss"], metrics["train/acc"], metrics["val/loss"], metrics["val/acc"],
            optimizer.param_groups[0]["lr"], time.perf_counter() - started,
        )
        if on_epoch_end:
            on_epoch_end(epoch, metrics)
    return history
