"""Random draws that depend on one sample's seed alone: a counter-based generator over numpy arrays of seeds,
so that a whole batch is drawn in a few array operations (see `augment.plan_batch`)."""

from __future__ import annotations

import numpy as np

# Streams of draws: each augmentation has its own, so turning one on leaves the others' draws unchanged.
CROP_STREAM, AUTO_AUGMENT_STREAM, ERASE_STREAM = 1, 2, 3


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over a uint64 array (wrapping arithmetic): a bijection whose outputs look random."""
    values = values ^ (values >> np.uint64(30))
    values = values * np.uint64(0xBF58476D1CE4E5B9)
    values = values ^ (values >> np.uint64(27))
    values = values * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def uniform_draws(seeds: np.ndarray, *, stream: int, count: int) -> np.ndarray:
    """`count` uniform floats in [0, 1) per sample seed, [len(seeds), count]: a counter-based generator
    (splitmix64 of seed, stream and draw number), so a whole batch is drawn in a few numpy operations and
    each value depends on its own sample's seed alone (not on the batch it is drawn in)."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    keys = _mix64(np.asarray(seeds, dtype=np.uint64) * golden + np.uint64(stream))
    counters = np.arange(1, count + 1, dtype=np.uint64) * golden
    bits = _mix64(keys[:, None] + counters[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def below(draws: np.ndarray, bounds: np.ndarray | int) -> np.ndarray:
    """Integers uniform in [0, bounds) from uniform draws in [0, 1)."""
    return np.minimum((draws * bounds).astype(np.int64), bounds - 1)
