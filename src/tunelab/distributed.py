"""Data-parallel runs under `torchrun`: one process per device, DistributedDataParallel between them.

    torchrun --nproc_per_node=4 train.py model=resnet50 scheduler=onecycle

`torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE > 1 the run joins a process group
(NCCL on GPUs, gloo on CPUs). Every process sees its own shard of each epoch's batches, gradients
are averaged by DDP, validation sums are added up over all processes, and only rank 0 talks to
MLflow and writes checkpoints. With WORLD_SIZE 1 (or plain `python train.py`) nothing here does
anything.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """This process's place in the run: rank among `world_size` processes, device index on its host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over all processes (the tensor itself on one process)."""
        if self.enabled:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (so all stop at the same step)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def broadcast(self, value: float) -> float:
        """Rank 0's `value`, on every process."""
        if not self.enabled:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
        torch.distributed.broadcast(tensor, src=0)
        return tensor.item()


SINGLE = Context()


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_environment() -> Context:
    """The context torchrun describes in the environment (one process when it is not set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Context(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(context: Context, device: torch.device) -> None:
    """Join the process group: NCCL when the device is a GPU, gloo otherwise."""
    if not context.enabled or torch.distributed.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend=backend)
    log.info("Process %d of %d (%s backend) on %s", context.rank, context.world_size, backend, device)


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class DataParallel(nn.Module):
    """DistributedDataParallel around `module`, rebuilt by `rewrap()` when the set of trainable
    parameters changes (gradual unfreezing): DDP fixes the parameters it averages when it is built."""

    def __init__(self, module: nn.Module, device: torch.device):
        super().__init__()
        self.device_ids = [device.index] if device.type == "cuda" else None
        self.inner = nn.parallel.DistributedDataParallel(module, device_ids=self.device_ids)

    def rewrap(self) -> None:
        self.inner = nn.parallel.DistributedDataParallel(self.inner.module, device_ids=self.device_ids)

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a `DataParallel` wrapper; any other module itself."""
    return module.inner.module if isinstance(module, DataParallel) else module
