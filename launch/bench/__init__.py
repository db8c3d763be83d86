"""`python -m launch bench step|data|train|launch`: measured throughput, printed as tables (or JSON).

Each command measures side by side in one run where it compares (engine against a bare loop, DALI against
the DataLoader), alternating rounds so that drifting clocks and thermals hit both alike.
"""

from __future__ import annotations

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (a no-op on the CPU, where work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
