"""Where and how a run computes: its device, its random seeds, its threads."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from tunelab import distributed
from tunelab.errors import ConfigError, require

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:  # batches share one shape (the last aside): cuDNN times its algorithms once and keeps the fastest
        torch.backends.cudnn.benchmark = True


def select_device(name: str, dist: distributed.Context = distributed.SINGLE) -> torch.device:
    """`auto` = CUDA when present, else CPU; `cuda` without a GPU is an error.

    Under torchrun each process takes the GPU of its LOCAL_RANK.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if dist.enabled and name == "cuda":
        name = f"cuda:{dist.local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"trainer.device={name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        require(torch.cuda.is_available(), f"trainer.device={name}, but no CUDA GPU is available here; use trainer.device=auto or cpu")
    return device


def limit_threads_for_parallel_jobs() -> None:
    """With the joblib launcher, share the cores among the jobs instead of each taking them all;
    with submitit's, use the job's `cpus_per_task` (a SLURM job would otherwise see the whole node)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    launcher = HydraConfig.get().get("launcher") or {}
    target = str(launcher.get("_target_", ""))
    if "submitit" in target and launcher.get("cpus_per_task"):
        torch.set_num_threads(int(launcher.cpus_per_task))
        log.info("submitit launcher: %d torch threads (hydra.launcher.cpus_per_task)", launcher.cpus_per_task)
    if "joblib" not in target:
        return
    cores = os.cpu_count() or 1
    jobs = launcher.get("n_jobs") or 1
    jobs = cores if jobs < 0 else jobs
    threads = max(1, cores // jobs)
    torch.set_num_threads(threads)
    log.info("joblib launcher with n_jobs=%s: %d torch threads per job", launcher.get("n_jobs"), threads)
