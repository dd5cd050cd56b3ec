"""The training loop: batches, forward and loss, backward with accumulation, optimizer step,
schedule step, validation. Everything optional (logging, checkpoints, EMA, early stopping, gradual
unfreezing, stop signals, the progress bar) is a callback (`tunelab.callbacks`).

Per optimizer step s (0-based over the whole run) the callbacks receive `lr` (and `lr/<group>` when
there are several groups): the rate that step used, read just before `optimizer.step()`, and
`train/loss`, the mean loss of the batches accumulated into that step. Losses stay on the device and
are read once per logging interval (`on_train_metrics`), so a step never waits for the host. Per
epoch they receive `train/loss`, `train/acc`, `val/loss` and `val/acc` (`on_validation_end`,
`on_epoch_end`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
from torch import nn

from tunelab.metrics import confusion, lower_is_better, summary
from tunelab.callbacks.base import Callback, CallbackList
from tunelab.distributed import SINGLE, Context, unwrap
from tunelab.errors import ReportedError

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
        return min(values) if lower_is_better(monitor) else max(values)


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


def improved(value: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return True
    return value < best if lower_is_better(monitor) else value > best


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
        self._targets.append(y if y.dim() == 1 else y.argmax(1))  # mixed (soft) targets: their largest share
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


def forward_logits(model: nn.Module, x: torch.Tensor, device: torch.device, precision: str = "32", channels_last: bool = False) -> torch.Tensor:
    """The main head's logits for a batch already on `device`, as evaluation computes them."""
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(device, precision):
        return _split_outputs(model(x))[0]


def evaluate(model: nn.Module, loader, loss_fn, device: torch.device, precision: str = "32", channels_last: bool = False,
             dist: Context = SINGLE) -> dict[str, float]:
    """`val/loss`, `val/acc`, `val/balanced_acc` and `val/macro_f1` over `loader`, in eval mode under
    `torch.inference_mode()` (the last two from a confusion matrix counted on the device).

    In a data-parallel run each process evaluates its shard and the sums are added up, so every
    process returns the metrics of the whole validation set.
    """
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=device)
    matrix = None
    with torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = forward_logits(model, x, device, precision, channels_last)
            total_loss += loss_fn(logits.float(), y) * len(y)
            counts = confusion(logits.argmax(1), y, logits.shape[1])
            matrix = counts if matrix is None else matrix + counts
    model.train(was_training)
    if matrix is None:
        matrix = torch.zeros((1, 1), dtype=torch.long, device=device)
    if dist.enabled:
        total_loss, matrix = dist.sum(total_loss), dist.sum(matrix)
    found = summary(matrix)
    seen = max(int(matrix.sum().item()), 1)
    return {"val/loss": (total_loss / seen).item(), "val/acc": found["acc"], "val/balanced_acc": found["balanced_acc"],
            "val/macro_f1": found["macro_f1"]}


def _finite_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimizer would apply is finite (one host sync)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())




@dataclass
class LoopOptions:
    """How the loop runs, from the config: the values `fit` needs besides its objects."""

    max_epochs: int
    device: torch.device
    accumulate: int = 1
    precision: str = "32"
    channels_last: bool = False
    #: Read the step losses and hand them to the callbacks every this many optimizer steps.
    log_every: int = 50
    #: The epoch metric whose best value `state.best` keeps (and `on_checkpoint`'s `is_best` tells).
    monitor: str = "val/acc"
    #: Skip batches with a non-finite loss (and steps with non-finite gradients) instead of stopping.
    skip_nonfinite: bool = False
    dist: Context = SINGLE


def fit(model: nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer, schedule, loss_fn: nn.Module,
        options: LoopOptions, callbacks: Iterable[Callback] = (), state: LoopState | None = None,
        scaler: torch.amp.GradScaler | None = None) -> LoopState:
    """Train until `options.max_epochs`, validating after each epoch; continue from `state` when given.

    `schedule.after_optimizer_step()` runs after every `optimizer.step()`, `schedule.after_epoch(metrics)`
    after every validation. The callbacks' hooks are called in the order of `tunelab.callbacks.base`.
    In a data-parallel run (`options.dist`, `model` wrapped in `distributed.DataParallel`) the losses
    and accuracies are means over all processes, and validation runs on the unwrapped module.
    """
    return Loop(model, train_loader, val_loader, optimizer, schedule, loss_fn, options, CallbackList(callbacks), state, scaler).run()


class Loop:
    """One `fit`: its objects, where it is (`state`), and what callbacks may ask of it (see
    `tunelab.callbacks.base`)."""

    def __init__(self, model, train_loader, val_loader, optimizer, schedule, loss_fn, options: LoopOptions,
                 callbacks: CallbackList, state: LoopState | None, scaler) -> None:
        self.model, self.train_loader, self.val_loader = model, train_loader, val_loader
        self.optimizer, self.schedule, self.loss_fn, self.options, self.callbacks = optimizer, schedule, loss_fn, options, callbacks
        self.state = state or LoopState()
        self.scaler = scaler or torch.amp.GradScaler(options.device.type, enabled=options.precision == "16-mixed")
        self.batches = len(train_loader)
        self.steps_per_epoch = math.ceil(self.batches / options.accumulate)
        self.interrupt: str | None = None
        self._checkpoint_asked = False
        self._pending: list[tuple[int, dict[str, float], torch.Tensor, bool]] = []  # step, lrs, loss, whether any batch counted
        self._tally = _Tally(0.0, 0, 0, options.device)
        self.evaluated = unwrap(model)  # validation runs without the DDP wrapper
        #: The module training switched to (`switch`), or None while it is the one `fit` was given.
        self.switched: nn.Module | None = None
        self._epoch_started = time.perf_counter()

    def request_checkpoint(self) -> None:
        """Write a checkpoint at the end of this optimizer step (`on_checkpoint`)."""
        self._checkpoint_asked = True

    def switch(self, model: nn.Module, train_loader, val_loader) -> None:
        """Train and validate `model` on these loaders from now on: the whole model after a head was
        probed on cached features (LP-FT). Call it from `on_epoch_start`; the epochs keep their length."""
        if len(train_loader) != self.batches:
            raise ValueError(f"switch: {len(train_loader)} batches per epoch instead of {self.batches}")
        self.model, self.train_loader, self.val_loader = model, train_loader, val_loader
        self.evaluated = self.switched = unwrap(model)
        self.model.train()

    def validate(self, module: nn.Module) -> dict[str, float]:
        """`val/loss` and `val/acc` of `module` on the validation batches (over all processes)."""
        o = self.options
        return evaluate(module, self.val_loader, self.loss_fn, o.device, o.precision, o.channels_last, o.dist)

    def run(self) -> LoopState:
        o, state = self.options, self.state
        log.info("Training: %d epochs of %d optimizer steps each (%d batches per epoch) on %s",
                 o.max_epochs, self.steps_per_epoch, self.batches, o.device)
        try:
            self.callbacks.on_fit_start(self)
            for epoch in range(state.epoch, o.max_epochs if state.stop_reason is None else state.epoch):  # early stopping ended it
                self._train_epoch(epoch)
                self._end_epoch(epoch)
                if state.stop_reason:
                    log.info("Early stopping: %s", state.stop_reason)
                    break
                if self.interrupt:
                    raise Interrupted(self.interrupt)
            self.callbacks.on_fit_end(self)
        except BaseException as err:
            self.callbacks.on_exception(self, err)
            raise
        return state

    def _train_epoch(self, epoch: int) -> None:
        state = self.state
        state.epoch = epoch
        self._epoch_started = time.perf_counter()
        self.model.train()
        self.callbacks.on_epoch_start(self)
        self.train_loader.sampler.set_epoch(epoch)
        self._tally = _Tally(state.loss_sum, state.correct, state.seen, self.options.device)
        step_losses: list[torch.Tensor] = []  # the main-head losses of the batches of this optimizer step
        resume_at = state.batch
        self.train_loader.start_at(resume_at)  # a resumed epoch does not read its first batches again
        for i, (x, y) in enumerate(self.train_loader, start=resume_at):
            self._forward_backward(x, y, i, step_losses)
            if (i + 1) % self.options.accumulate and i + 1 != self.batches:
                continue
            self._optimizer_step(step_losses, i)
            step_losses = []
        self._drain(epoch_end=True)  # one store write per epoch end: the steps go with the epoch's metrics

    def _forward_backward(self, x, y, i: int, step_losses: list[torch.Tensor]) -> None:
        """One batch: forward, loss, backward (scaled for accumulation); a non-finite loss is skipped
        when `skip_nonfinite` is on, else left for the next read of the losses to report."""
        o, state = self.options, self.state
        x, y = x.to(o.device, non_blocking=True), y.to(o.device, non_blocking=True)
        in_step = min(o.accumulate, self.batches - (i // o.accumulate) * o.accumulate)
        loss, full, logits = training_loss(self.model, x, y, self.loss_fn, o.device, o.precision, o.channels_last)
        if o.skip_nonfinite and not torch.isfinite(full):
            state.skipped += 1
            log.warning("skipped a batch with a non-finite loss at optimizer step %d (%d skipped so far)", state.step, state.skipped)
            return
        self.scaler.scale(full if in_step == 1 else full / in_step).backward()
        step_losses.append(loss.detach())
        self._tally.add(step_losses[-1], logits.detach(), y)

    def _optimizer_step(self, step_losses: list[torch.Tensor], i: int) -> None:
        o, state, optimizer = self.options, self.state, self.optimizer
        in_step = min(o.accumulate, self.batches - (i // o.accumulate) * o.accumulate)
        if len(step_losses) == in_step == 1:
            step_loss = step_losses[0]
        else:  # the mean over the step's batches (a skipped batch counts as 0, as it adds no gradient)
            step_loss = torch.stack(step_losses).sum() / in_step if step_losses else torch.zeros((), device=o.device)
        counted = bool(step_losses)
        lrs = lr_metrics(optimizer)
        for name, g in zip(group_names(optimizer), optimizer.param_groups):
            state.history.lrs.setdefault(name, []).append(g["lr"])
        if o.skip_nonfinite and counted and not self.scaler.is_enabled() and not _finite_gradients(optimizer):
            state.skipped += len(step_losses)
            log.warning("skipped optimizer step %d: its loss was finite, its gradients not (%d skipped so far)", state.step, state.skipped)
        elif counted:  # (the grad scaler skips a step with non-finite gradients itself)
            self.scaler.step(optimizer)
            self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        self.schedule.after_optimizer_step()
        self._pending.append((state.step, lrs, step_loss, counted))
        state.step += 1
        state.batch = i + 1
        self.callbacks.on_optimizer_step(self)
        check_now = o.device.type == "cpu" and not o.dist.enabled and not math.isfinite(step_loss.item())  # a NaN stops at once on the CPU
        if len(self._pending) >= o.log_every or check_now:
            self._drain()
        if self.interrupt or self._checkpoint_asked:
            self._checkpoint(is_best=False)
            if self.interrupt:
                raise Interrupted(self.interrupt)

    def _drain(self, epoch_end: bool = False) -> None:
        """Read the pending step losses once, check them, and hand them to `on_train_metrics`."""
        self._tally.fold()
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        stacked = torch.stack([loss for _, _, loss, _ in pending])
        dist = self.options.dist
        losses = (dist.sum(stacked) / dist.world_size if dist.enabled else stacked).tolist()
        rows = []
        for (s, lrs, _, counted), value in zip(pending, losses):
            if counted and not math.isfinite(value):
                self.callbacks.on_train_metrics(self, rows, False)  # the steps before it are kept
                raise NonFiniteLossError(
                    f"the training loss is {value} at optimizer step {s} (epoch {self.state.epoch + 1}, lr {lrs['lr']:.6g}); "
                    "lower optimizer.lr, add warmup (scheduler.warmup_epochs), or skip such batches with trainer.skip_nonfinite=true"
                )
            # every batch of a step skipped (trainer.skip_nonfinite): it has no loss
            rows.append((s, {**lrs, "train/loss": value} if counted else lrs))
        self.callbacks.on_train_metrics(self, rows, epoch_end)

    def _sync_state(self) -> None:
        """Fold the epoch's sums into `state` (in a data-parallel run the sums of all processes:
        rank 0 saves them, the others restart from zero)."""
        self._tally.fold()
        total_loss, total_correct, total_seen = _all_processes(self.options.dist, self._tally.loss_sum, self._tally.correct,
                                                               self._tally.seen, self.options.device)
        self.state.loss_sum, self.state.correct, self.state.seen = total_loss.item(), int(total_correct.item()), total_seen

    def _checkpoint(self, is_best: bool) -> None:
        self._drain()
        self._sync_state()
        self._checkpoint_asked = False
        self.callbacks.on_checkpoint(self, is_best)

    def _end_epoch(self, epoch: int) -> None:
        """The epoch's training metrics and validation, the schedule's epoch step, its record, the
        callbacks' turn, and the checkpoint."""
        o, state = self.options, self.state
        total_loss, total_correct, total_seen = _all_processes(o.dist, self._tally.loss_sum, self._tally.correct, self._tally.seen, o.device)
        if o.skip_nonfinite and not total_seen:
            raise NonFiniteLossError(
                f"every batch of epoch {epoch + 1} had a non-finite loss ({state.skipped} skipped so far, trainer.skip_nonfinite=true): "
                "the weights have diverged; lower optimizer.lr or add warmup (scheduler.warmup_epochs)"
            )
        metrics = {"train/loss": (total_loss / max(total_seen, 1)).item(), "train/acc": total_correct.item() / max(total_seen, 1)}
        metrics.update(self.validate(self.evaluated))
        self.callbacks.on_validation_end(self, metrics)
        self.schedule.after_epoch(metrics)
        seconds = time.perf_counter() - self._epoch_started
        state.history.epochs.append({"epoch": epoch, **metrics, "seconds": seconds})
        _log_epoch(epoch, o.max_epochs, metrics, self.optimizer, seconds)
        is_best = o.monitor in metrics and improved(metrics[o.monitor], state.best, o.monitor)  # SWA's: from its start on
        if is_best:
            state.best = metrics[o.monitor]
        state.epoch, state.batch, state.stop_reason = epoch + 1, 0, None
        self.callbacks.on_epoch_end(self, epoch, metrics)
        self._tally = _Tally(0.0, 0, 0, o.device)
        self._checkpoint(is_best)


def _log_epoch(epoch: int, max_epochs: int, metrics: Mapping[str, float], optimizer, seconds: float) -> None:
    averaged = "".join(f"  {key} {metrics[key]:.4f}" for key in ("val/acc_ema", "val/acc_swa") if key in metrics)
    log.info("epoch %d/%d  train/loss %.4f  train/acc %.4f  val/loss %.4f  val/acc %.4f%s  lr %.4g  %.1fs", epoch + 1, max_epochs,
             metrics["train/loss"], metrics["train/acc"], metrics["val/loss"], metrics["val/acc"], averaged, optimizer.param_groups[0]["lr"], seconds)
