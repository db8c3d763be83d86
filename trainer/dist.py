"""Distributed facts, computed once by the launcher and passed down."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int
    """Global rank of this process."""
    local_rank: int
    """Rank among the processes on this node (selects the GPU)."""
    world_size: int
    """Number of training processes in the job."""
    device: torch.device
    """The device this process trains on: every placement (model, DDP, DeepSpeed, DALI, streams) takes it
    from here, never from local_rank or the current device (under Ray a worker sees all of a node's GPUs)."""

    def __post_init__(self) -> None:
        if self.device.type == "cuda" and self.device.index is None:
            raise ValueError(f"a GPU context names its GPU (cuda:N), got {self.device}")

    @property
    def is_primary(self) -> bool:
        """True on the one process that writes files and reports metrics."""
        return self.rank == 0


def single_process_context() -> DistContext:
    """A one-process job on the first GPU (CUDA initialised), or on the CPU when there is none."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    init_device(device)
    return DistContext(rank=0, local_rank=0, world_size=1, device=device)


def init_device(device: torch.device) -> None:
    """Make `device` current and initialise CUDA's runtime and torch's allocator for it, before anything asks
    them (or NVML) about it: torch initialises lazily, and `torch.cuda.reset_peak_memory_stats` in a fresh
    process fails ("Invalid device argument") until then. Nothing on CPUs."""
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.set_device(device)


def init_distributed(*, rank: int, local_rank: int, world_size: int, init_method: str = "env://",
                     timeout_s: float | None = None) -> DistContext:
    """Join the process group (nccl on GPUs, gloo on CPUs) and describe this process's place in it.

    Called by launchers, once per process, before `trainer.run`.
    """
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    init_device(device)
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo", init_method=init_method, rank=rank,
                                         world_size=world_size, device_id=device if use_cuda else None,
                                         timeout=None if timeout_s is None else datetime.timedelta(seconds=timeout_s))
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place (a no-op in a single process); returns it."""
    if is_distributed():
        torch.distributed.all_reduce(tensor)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of `tensor` over all ranks in place (a no-op in a single process); returns it."""
    if is_distributed():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor


def broadcast_buffers(module: nn.Module) -> None:
    """Overwrite every buffer of `module` (BatchNorm running statistics) with rank 0's (a no-op in a single
    process)."""
    if is_distributed():
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)


def gather_objects(obj: T) -> list[T]:
    """`obj` of every rank, in rank order (`[obj]` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if is_distributed():
        torch.distributed.barrier()
