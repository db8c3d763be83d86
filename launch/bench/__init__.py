"""`python -m launch bench step|data|train|launch`: measured throughput, printed as tables (or JSON).

Each command measures side by side in one run where it compares (engine against a bare loop, DALI against
the DataLoader), alternating rounds so that drifting clocks and thermals hit both alike.
"""

from __future__ import annotations

import math
import statistics

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (a no-op on the CPU, where work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TRUSTED_HALF_WIDTH = 0.05
"""A median is trusted when its 95% confidence interval lies within this fraction of it on either side."""


def median_interval(values: list[float]) -> tuple[float, float]:
    """A distribution-free 95% confidence interval of the median of `values`: the pair of order statistics
    that the binomial distribution puts around it (with 7 rounds or fewer, simply the min and the max)."""
    ordered = sorted(values)
    count = len(ordered)
    outside, below = 0, 0.0  # values on each side that may fall outside, and their probability
    while outside < count and below + math.comb(count, outside) / 2**count <= 0.025:
        below += math.comb(count, outside) / 2**count
        outside += 1
    if outside == 0:
        return ordered[0], ordered[-1]
    return ordered[outside - 1], ordered[count - outside]


def trusted(values: list[float]) -> bool:
    """Whether the median of `values` is known to within TRUSTED_HALF_WIDTH (95% confidence)."""
    low, high = median_interval(values)
    median = statistics.median(values)
    return bool(median) and (high - low) / 2 <= TRUSTED_HALF_WIDTH * median


def paired_ratios(values: list[float], baseline: list[float]) -> list[float]:
    """A variant's images/s over the baseline's, round by round (the two ran back to back in each round)."""
    return [mine / theirs for mine, theirs in zip(values, baseline, strict=True)]


def ratio_cell(ratios: list[float]) -> str:
    """'median (low-high)' of per-round ratios: the median and its 95% interval (`median_interval`)."""
    low, high = median_interval(ratios)
    return f"{statistics.median(ratios):.2f} ({low:.2f}-{high:.2f})"


def spread(values: list[float]) -> str:
    """'median (min-max)' of a variant's rounds."""
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def trust_warning(medians: dict[str, list[float]]) -> str | None:
    """A line naming the measurements whose median is not known to within TRUSTED_HALF_WIDTH, or None."""
    loose = [name for name, values in medians.items() if not trusted(values)]
    if not loose:
        return None
    return (f"! the median of {', '.join(loose)} is not known to within {TRUSTED_HALF_WIDTH:.0%} (95% confidence "
            "over the rounds): the machine was too busy or there were too few rounds; do not trust it")
