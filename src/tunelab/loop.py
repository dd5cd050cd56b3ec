"""The training loop: train and validate each epoch, step the schedule, hand metrics to the logger.

Per optimizer step s (0-based over the whole run) the logger receives `lr` (and `lr/<group>` when
there are several groups): the rate that step used, read just before `optimizer.step()`, and
`train/loss`, the mean loss of the batches accumulated into that step. Per epoch it receives
`train/acc`, `val/loss`, `val/acc` and `trainable_params` at `step=epoch`. Losses stay on the device
and are read once per logging interval, so a step never waits for the host.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from tunelab.distributed import SINGLE, Context
from tunelab.errors import ReportedError, require

log = logging.getLogger(__name__)

#: Weight of each auxiliary head's loss (Inception v3, GoogLeNet), as in their papers' training.
AUX_LOSS_WEIGHT = 0.4


class NonFiniteLossError(ReportedError, RuntimeError):
    """The training loss became NaN or infinite; the run stops at once (the last checkpoint stays)."""


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


@dataclass
class LoopState:
    """Where the loop is: enough to continue a run exactly (with the model, optimizer and schedule).

    `epoch` is the epoch in progress (or the next to start) and `batch` the batches of it already
    done, so a checkpoint taken in the middle of an epoch resumes at the next batch.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    skipped: int = 0
    best: float | None = None
    stop_reason: str | None = None
    history: History = field(default_factory=History)

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch, "batch": self.batch, "step": self.step, "loss_sum": self.loss_sum,
            "correct": self.correct, "seen": self.seen, "skipped": self.skipped, "best": self.best,
            "stop_reason": self.stop_reason, "lrs": self.history.lrs, "epochs": self.history.epochs,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "LoopState":
        history = History({k: list(v) for k, v in d["lrs"].items()}, [dict(e) for e in d["epochs"]])
        keys = ("epoch", "batch", "step", "loss_sum", "correct", "seen", "skipped", "best")
        return cls(**{k: d[k] for k in keys}, stop_reason=d.get("stop_reason"), history=history)


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM asked the loop to stop; it stopped at an optimizer-step boundary."""


class WeightEMA:
    """An exponential moving average of a module's weights, updated after every optimizer step.

    `ema = decay * ema + (1 - decay) * weights` for the trainable parameters (frozen ones never
    change, so their average is themselves); buffers (BatchNorm statistics) are copied. Decay 0 makes
    the average equal the raw weights. Evaluated each epoch as `val/acc_ema` and `val/loss_ema`.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = float(decay)
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self._pairs = list(zip(self.module.parameters(), module.parameters()))
        self._buffers = list(zip(self.module.buffers(), module.buffers()))

    @torch.no_grad()
    def update(self) -> None:
        pairs = [(a, p) for a, p in self._pairs if p.requires_grad]
        if pairs:
            averages, weights = zip(*pairs)
            torch._foreach_lerp_(list(averages), list(weights), 1.0 - self.decay)
        for average, buffer in self._buffers:
            average.copy_(buffer)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.module.load_state_dict(state)


@dataclass
class EarlyStopping:
    """Stop when `monitor` has not improved by more than `min_delta` for `patience` epochs.

    `mode` is "min", "max", or "auto" (min for losses, max otherwise). `update` returns the reason
    to stop, or None to go on.
    """

    patience: int
    monitor: str = "val/acc"
    mode: str = "auto"
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int = -1
    waited: int = 0

    def __post_init__(self) -> None:
        require(isinstance(self.patience, int) and not isinstance(self.patience, bool) and self.patience >= 1,
                f"trainer.early_stopping.patience={self.patience!r} must be an integer >= 1 (or null to train every epoch)")
        require(self.mode in ("min", "max", "auto"), f"trainer.early_stopping.mode={self.mode} must be min, max or auto")
        require(isinstance(self.min_delta, (int, float)) and self.min_delta >= 0,
                f"trainer.early_stopping.min_delta={self.min_delta!r} must be a number >= 0")
        if self.mode == "auto":
            self.mode = "min" if self.monitor.endswith("loss") else "max"

    def update(self, metrics: Mapping[str, float], epoch: int) -> str | None:
        value = metrics[self.monitor]
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best, self.best_epoch, self.waited = value, epoch, 0
            return None
        self.waited += 1
        if self.waited < self.patience:
            return None
        return (
            f"{self.monitor} did not improve by more than {self.min_delta:g} for {self.patience} epochs "
            f"(best {self.best:.4f} at epoch {self.best_epoch + 1}); stopped after epoch {epoch + 1}"
        )


def improved(value: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return True
    return value < best if monitor.endswith("loss") else value > best


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


def training_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, device: torch.device, precision: str = "32",
                  channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward one batch as training does: (loss of the main head, loss to backpropagate, logits).

    The loss to backpropagate adds the auxiliary heads' losses (weighted) when the model has them.
    """
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(device, precision):
        logits, aux = _split_outputs(model(x))
        loss = loss_fn(logits.float(), y)
        full = loss + AUX_LOSS_WEIGHT * sum(loss_fn(a.float(), y) for a in aux) if aux else loss
    return loss, full, logits


class _Tally:
    """The training loss sum, correct count and images seen of an epoch, kept on the device.

    A batch only queues references (its loss and its predicted classes: one argmax kernel); `fold()`
    adds the queued batches up in a handful of kernels, once per logging interval, so a step on a
    GPU launches almost nothing beyond the bare loop's work.
    """

    def __init__(self, loss_sum: float, correct: int, seen: int, device: torch.device):
        # float64: the sum is the same however the batches were grouped into folds (a resumed run
        # folds at other steps than an uninterrupted one)
        self.loss_sum = torch.tensor(loss_sum, dtype=torch.float64, device=device)
        self.correct = torch.tensor(correct, dtype=torch.long, device=device)
        self.seen = seen
        self._losses: dict[int, list[torch.Tensor]] = {}  # batch size -> mean losses of such batches
        self._predicted: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self._losses.setdefault(len(y), []).append(loss)
        self._predicted.append(logits.argmax(1))
        self._targets.append(y)
        self.seen += len(y)

    def fold(self) -> None:
        for size, losses in self._losses.items():
            self.loss_sum += torch.stack(losses).double().sum() * size
        if self._predicted:
            self.correct += (torch.cat(self._predicted) == torch.cat(self._targets)).sum()
        self._losses, self._predicted, self._targets = {}, [], []


def _all_processes(dist: Context, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, device: torch.device):
    """(loss sum, correct count, images seen) added up over the processes of a data-parallel run;
    on one process, the values as given."""
    if not dist.enabled:
        return loss_sum, correct, seen
    sums = dist.sum(torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=device)]))
    return sums[0], sums[1], int(sums[2].item())


def evaluate(model: nn.Module, loader, loss_fn, device: torch.device, precision: str = "32", channels_last: bool = False,
             dist: Context = SINGLE) -> dict[str, float]:
    """Mean loss and accuracy over `loader`, in eval mode under `torch.inference_mode()`.

    In a data-parallel run each process evaluates its shard and the sums are added up, so every
    process returns the metrics of the whole validation set.
    """
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    with torch.inference_mode(), _autocast(device, precision):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            logits, _ = _split_outputs(model(x))
            total_loss += loss_fn(logits.float(), y) * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
    model.train(was_training)
    total_loss, correct, seen = _all_processes(dist, total_loss, correct, seen, device)
    return {"val/loss": (total_loss / max(seen, 1)).item(), "val/acc": correct.item() / max(seen, 1)}


def _finite_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimizer would apply is finite (one host sync)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


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
    monitor: str = "val/acc",
    skip_nonfinite: bool = False,
    state: LoopState | None = None,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    on_epoch_start: Callable[[int], None] | None = None,
    save: Callable[[LoopState, bool], None] | None = None,
    save_every_n_steps: int = 0,
    stop_requested: Callable[[], bool] = lambda: False,
    ema: WeightEMA | None = None,
    early_stopping: EarlyStopping | None = None,
    dist: Context = SINGLE,
    eval_model: nn.Module | None = None,
) -> LoopState:
    """Train until `max_epochs`, validating after each epoch; continue from `state` when given.

    `train_mode()` puts the model in training mode (frozen BatchNorm stays in eval);
    `schedule.after_optimizer_step()` runs after every `optimizer.step()`,
    `schedule.after_epoch(metrics)` after every validation. `save(state, is_best)` is called at the
    end of every epoch, every `save_every_n_steps` optimizer steps, and when `stop_requested()`
    turns true (then the loop raises `Interrupted` at that step boundary). `ema.update()` follows
    every optimizer step; `early_stopping` may end the loop after an epoch (`state.stop_reason`).
    In a data-parallel run (`dist`) the logged losses and accuracies are means over all processes,
    `stop_requested()` is agreed on at every step, and `eval_model` (the module without its DDP
    wrapper) is what validation runs.
    """
    from tqdm.auto import tqdm

    state = state or LoopState()
    history = state.history
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    batches = len(train_loader)
    steps_per_epoch = math.ceil(batches / accumulate)
    check_every = 1 if device.type == "cpu" and not dist.enabled else log_every
    eval_model = model if eval_model is None else eval_model  # not `or`: a compiled module has no truth value
    if early_stopping:  # a resumed run continues the count where it was
        for past in history.epochs:
            early_stopping.update(past, past["epoch"])
    log.info("Training: %d epochs of %d optimizer steps each (%d batches per epoch) on %s", max_epochs, steps_per_epoch, batches, device)
    for epoch in range(state.epoch, max_epochs if state.stop_reason is None else state.epoch):  # early stopping ended it
        started = time.perf_counter()
        state.epoch = epoch
        if state.batch == 0 and on_epoch_start:
            on_epoch_start(epoch)
        train_mode()
        train_loader.sampler.set_epoch(epoch)
        pending: list[tuple[int, dict[str, float], torch.Tensor, bool]] = []  # step, lrs, loss, whether any batch counted
        tally = _Tally(state.loss_sum, state.correct, state.seen, device)
        step_losses: list[torch.Tensor] = []  # the main-head losses of the batches of this optimizer step
        resume_at = state.batch
        bar = tqdm(total=steps_per_epoch, initial=math.ceil(resume_at / accumulate), desc=f"epoch {epoch + 1}/{max_epochs}",
                   disable=not progress, leave=False, dynamic_ncols=True)

        def drain(send: bool = True) -> None:
            """Read the pending step losses once, check them, and hand everything to the logger (which
            sends it to the tracking store now, or with the epoch's metrics when `send` is false)."""
            tally.fold()
            if not pending:
                return
            stacked = torch.stack([loss for _, _, loss, _ in pending])
            losses = (dist.sum(stacked) / dist.world_size if dist.enabled else stacked).tolist()
            for (s, lrs, _, counted), value in zip(pending, losses):
                if not counted:  # every batch of the step was skipped (trainer.skip_nonfinite): it has no loss
                    logger.log_metrics(lrs, step=s)
                    continue
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"the training loss is {value} at optimizer step {s} (epoch {epoch + 1}, lr {lrs['lr']:.6g}); "
                        "lower optimizer.lr, add warmup (scheduler.warmup_epochs), or skip such batches with trainer.skip_nonfinite=true"
                    )
                logger.log_metrics({**lrs, "train/loss": value}, step=s)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{pending[-1][1]['lr']:.3g}", refresh=False)
            pending.clear()
            if send:
                logger.flush()

        def checkpoint(is_best: bool = False) -> None:
            # in a data-parallel run rank 0 saves the sums of all processes (the others restart from zero)
            tally.fold()
            total_loss, total_correct, total_seen = _all_processes(dist, tally.loss_sum, tally.correct, tally.seen, device)
            state.loss_sum, state.correct, state.seen = total_loss.item(), int(total_correct.item()), total_seen
            if save:
                save(state, is_best)

        train_loader.start_at(resume_at)  # a resumed epoch does not read its first batches again
        for i, (x, y) in enumerate(train_loader, start=resume_at):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            in_step = min(accumulate, batches - (i // accumulate) * accumulate)
            loss, full, logits = training_loss(model, x, y, loss_fn, device, precision, channels_last)
            if skip_nonfinite and not torch.isfinite(full):
                state.skipped += 1
                log.warning("skipped a batch with a non-finite loss at optimizer step %d (%d skipped so far)", state.step, state.skipped)
            else:
                scaler.scale(full if in_step == 1 else full / in_step).backward()
                step_losses.append(loss.detach())
                tally.add(step_losses[-1], logits.detach(), y)
            if (i + 1) % accumulate and i + 1 != batches:
                continue
            if len(step_losses) == in_step == 1:
                step_loss = step_losses[0]
            else:  # the mean over the step's batches (a skipped batch counts as 0, as it adds no gradient)
                step_loss = torch.stack(step_losses).sum() / in_step if step_losses else torch.zeros((), device=device)
            used, step_losses = len(step_losses), []
            counted = used > 0
            lrs = lr_metrics(optimizer)
            for name, g in zip(group_names(optimizer), optimizer.param_groups):
                history.lrs.setdefault(name, []).append(g["lr"])
            if skip_nonfinite and counted and not scaler.is_enabled() and not _finite_gradients(optimizer):
                state.skipped += used
                log.warning("skipped optimizer step %d: its loss was finite, its gradients not (%d skipped so far)",
                            state.step, state.skipped)
            elif counted:  # (the grad scaler skips a step with non-finite gradients itself)
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            schedule.after_optimizer_step()
            if ema is not None:
                ema.update()
            pending.append((state.step, lrs, step_loss, counted))
            state.step += 1
            state.batch = i + 1
            bar.update()
            if len(pending) >= log_every or (check_every == 1 and not math.isfinite(pending[-1][2].item())):
                drain()
            stop = dist.any(stop_requested())
            if stop or (save_every_n_steps and state.step % save_every_n_steps == 0):
                drain()
                checkpoint()
                if stop:
                    bar.close()
                    raise Interrupted(f"stopped after optimizer step {state.step - 1} (epoch {epoch + 1})")
        drain(send=False)  # one store write per epoch end: the steps go with the epoch's metrics
        bar.close()
        total_loss, total_correct, total_seen = _all_processes(dist, tally.loss_sum, tally.correct, tally.seen, device)
        if skip_nonfinite and not total_seen:
            raise NonFiniteLossError(
                f"every batch of epoch {epoch + 1} had a non-finite loss ({state.skipped} skipped so far, trainer.skip_nonfinite=true): "
                "the weights have diverged; lower optimizer.lr or add warmup (scheduler.warmup_epochs)"
            )
        metrics = {"train/loss": (total_loss / max(total_seen, 1)).item(), "train/acc": total_correct.item() / max(total_seen, 1)}
        metrics.update(evaluate(eval_model, val_loader, loss_fn, device, precision, channels_last, dist))
        if ema is not None:
            averaged = evaluate(ema.module, val_loader, loss_fn, device, precision, channels_last, dist)
            metrics.update({f"{key}_ema": value for key, value in averaged.items()})
        schedule.after_epoch(metrics)
        epoch_metrics = {key: value for key, value in metrics.items() if key != "train/loss"}
        epoch_metrics["trainable_params"] = float(trainable_params())
        if skip_nonfinite:
            epoch_metrics["train/skipped_batches"] = float(state.skipped)
        logger.log_metrics(epoch_metrics, step=epoch)
        logger.flush()
        history.epochs.append({"epoch": epoch, **metrics, "trainable_params": trainable_params(), "seconds": time.perf_counter() - started})
        log.info(
            "epoch %d/%d  train/loss %.4f  train/acc %.4f  val/loss %.4f  val/acc %.4f%s  lr %.4g  %.1fs",
            epoch + 1, max_epochs, metrics["train/loss"], metrics["train/acc"], metrics["val/loss"], metrics["val/acc"],
            f"  val/acc_ema {metrics['val/acc_ema']:.4f}" if ema is not None else "",
            optimizer.param_groups[0]["lr"], time.perf_counter() - started,
        )
        is_best = improved(metrics[monitor], state.best, monitor)
        if is_best:
            state.best = metrics[monitor]
        state.epoch, state.batch = epoch + 1, 0
        state.stop_reason = early_stopping.update(metrics, epoch) if early_stopping else None
        tally = _Tally(0.0, 0, 0, device)
        checkpoint(is_best)
        if state.stop_reason:
            log.info("Early stopping: %s", state.stop_reason)
            break
        if dist.any(stop_requested()):
            raise Interrupted(f"stopped after epoch {epoch + 1}")
    return state
