"""DistributedDataParallel helpers for runs launched with ``torchrun`` (env:// rendezvous).

``torchrun --nproc_per_node=N script.py`` sets RANK / WORLD_SIZE / LOCAL_RANK; :func:`init_distributed`
joins the process group (nccl on CUDA, gloo on CPU) and :func:`distributed_info` reports the layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "distributed_info", "init_distributed", "cleanup_distributed", "barrier", "is_main_process"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def distributed_info() -> DistInfo:
    """Current layout (initialised process group, else 1 process)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return DistInfo()


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (no-op for a single process).

    Parameters
    ----------
    backend : str, optional
        Default ``nccl`` when CUDA is available, else ``gloo``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return distributed_info()


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main_process() -> bool:
    return distributed_info().rank == 0
