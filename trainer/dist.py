"""Distributed facts, computed once by the launcher and passed down."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    """The device this process trains on."""

    @property
    def is_primary(self) -> bool:
        """True on the one process that writes files and reports metrics."""
        return self.rank == 0


def single_process_context() -> DistContext:
    """A one-process job on the first GPU, or on the CPU when there is none."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return DistContext(rank=0, local_rank=0, world_size=1, device=device)
