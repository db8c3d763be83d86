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


TRUSTED_SPREAD = 0.10
"""A variant whose rounds spread wider than this fraction of their median (max - min) is flagged: the
machine was busy, and ratios against it are not to be trusted."""


def spread(values: list[float]) -> str:
    """'median (min-max)' of a variant's rounds, with a warning mark when they spread too wide."""
    import statistics

    mark = " !" if too_wide(values) else ""
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f}){mark}"


def too_wide(values: list[float]) -> bool:
    """Whether the rounds spread wider than TRUSTED_SPREAD of their median."""
    import statistics

    median = statistics.median(values)
    return bool(median) and (max(values) - min(values)) / median > TRUSTED_SPREAD


def spread_warning(variants: dict[str, list[float]]) -> str | None:
    """A line naming the variants whose rounds spread too wide to trust a ratio, or None."""
    wide = [name for name, values in variants.items() if too_wide(values)]
    if not wide:
        return None
    return (f"! rounds of {', '.join(wide)} spread more than {TRUSTED_SPREAD:.0%} around the median: the machine "
            "was busy; do not trust ratios from this run")
