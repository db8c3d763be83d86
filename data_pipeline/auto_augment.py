"""Automatic augmentation (TrivialAugmentWide, RandAugment): the operations, their magnitude ranges, and the
operations each training image gets, drawn from its seed; both loaders apply what is drawn here."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from configs.schema import DataConfig
from data_pipeline.draws import AUTO_AUGMENT_STREAM, below, uniform_draws

AUTO_AUGMENT_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
                    "contrast", "sharpness", "posterize", "solarize", "auto_contrast", "equalize")
"""The operations TrivialAugmentWide and RandAugment choose from (the same 14 in both); an `AugmentOp` names one
by its index here."""
NUM_MAGNITUDE_BINS = 31
"""Strengths are bins 0..30 of each operation's magnitude range (torchvision's and DALI's default)."""


class MagnitudeRange(NamedTuple):
    """The magnitudes of bins 0..30 of one operation: evenly spaced from `low` to `high`; `signed`: negated
    for half the draws."""

    low: float
    high: float
    signed: bool


_ENHANCE = ("brightness", "color", "contrast", "sharpness")  # parameter: factor 1 + magnitude
_NO_MAGNITUDE = MagnitudeRange(0.0, 0.0, False)


def _ranges(*, shear: float, translate: float, rotate: float, enhance: float,
            posterize_bits: int) -> dict[str, MagnitudeRange]:
    ranges = {"identity": _NO_MAGNITUDE, "shear_x": MagnitudeRange(0, shear, True),
              "shear_y": MagnitudeRange(0, shear, True), "translate_x": MagnitudeRange(0, translate, True),
              "translate_y": MagnitudeRange(0, translate, True), "rotate": MagnitudeRange(0, rotate, True),
              "posterize": MagnitudeRange(8, posterize_bits, False), "solarize": MagnitudeRange(255, 0, False),
              "auto_contrast": _NO_MAGNITUDE, "equalize": _NO_MAGNITUDE}
    ranges.update({name: MagnitudeRange(0, enhance, True) for name in _ENHANCE})
    if sorted(ranges) != sorted(AUTO_AUGMENT_OPS):
        raise RuntimeError(f"magnitude ranges {sorted(ranges)} do not cover the operations {AUTO_AUGMENT_OPS}")
    return ranges


MAGNITUDE_RANGES = {
    # torchvision's augmentation spaces (transforms.v2.TrivialAugmentWide, RandAugment). Units: shear factor
    # (x += factor * y), translation as a fraction of the image side (TrivialAugmentWide's 32 px of 224),
    # degrees, enhancement factor 1 + magnitude, bits kept, solarize threshold.
    "trivial": _ranges(shear=0.99, translate=32 / 224, rotate=135, enhance=0.99, posterize_bits=2),
    "rand": _ranges(shear=0.3, translate=150 / 331, rotate=30, enhance=0.9, posterize_bits=4),
}
"""Magnitude range of each operation, per policy: the one definition both loaders apply."""
AUTO_AUGMENT_FILL = 128
"""Grey value of the pixels that shears, translations and rotations move in (DALI's default)."""


class AugmentOp(NamedTuple):
    """One automatic-augmentation operation for one image."""

    op: int
    """Index into AUTO_AUGMENT_OPS."""
    magnitude_bin: int
    """Strength, 0..NUM_MAGNITUDE_BINS - 1."""
    negate: bool
    """Negate the magnitude (only for operations with a signed range)."""

    @property
    def name(self) -> str:
        return AUTO_AUGMENT_OPS[self.op]

    def magnitude(self, policy: str) -> float:
        """The operation's signed magnitude under `policy` ("trivial" or "rand")."""
        low, high, signed = MAGNITUDE_RANGES[policy][self.name]
        value = low + (high - low) * self.magnitude_bin / (NUM_MAGNITUDE_BINS - 1)
        return -value if signed and self.negate else value


def num_auto_augment_ops(cfg: DataConfig) -> int:
    """Operations applied to each training image, one after the other: 0 (off), 1 (TrivialAugmentWide) or
    rand_augment_ops (RandAugment)."""
    return {"none": 0, "trivial": 1, "rand": cfg.rand_augment_ops}[cfg.auto_augment]


class AugmentDraws(NamedTuple):
    """The automatic-augmentation operations of a batch: int32 arrays [batch, num_auto_augment_ops]."""

    op: np.ndarray
    """Indices into AUTO_AUGMENT_OPS, one per level."""
    magnitude_bin: np.ndarray
    negate: np.ndarray
    """1: negate the magnitude (operations with a signed range only)."""

    def ops(self, i: int) -> tuple[AugmentOp, ...]:
        """Image `i`'s operations, in order."""
        levels = zip(self.op[i].tolist(), self.magnitude_bin[i].tolist(), self.negate[i].tolist(), strict=True)
        return tuple(AugmentOp(op, magnitude_bin, bool(negate)) for op, magnitude_bin, negate in levels)


def auto_augments_for(seeds: np.ndarray, cfg: DataConfig) -> AugmentDraws:
    """The `num_auto_augment_ops` operations of each training image of a batch, from the samples' seeds (a stream
    of their own: the crops' draws are unchanged by turning this on)."""
    levels = num_auto_augment_ops(cfg)
    # Counter-based draws: the first 3 x levels are the same whatever `count`, so RandAugment's optional draws
    # (magnitude noise, skipping) leave the others unchanged.
    u = uniform_draws(seeds, stream=AUTO_AUGMENT_STREAM, count=6 * levels)
    op = below(u[:, :levels], len(AUTO_AUGMENT_OPS))
    if cfg.auto_augment == "trivial":
        magnitude_bin = below(u[:, levels:2 * levels], NUM_MAGNITUDE_BINS)
    else:
        # timm's magnitude noise: a normal draw around the strength (Box-Muller), rounded to a bin, clipped.
        noise = np.sqrt(-2 * np.log1p(-u[:, 3 * levels:4 * levels])) * np.cos(2 * np.pi * u[:, 4 * levels:5 * levels])
        magnitude = cfg.rand_augment_magnitude + cfg.rand_augment_magnitude_std * noise
        magnitude_bin = np.clip(np.rint(magnitude), 0, NUM_MAGNITUDE_BINS - 1).astype(np.int64)
        # timm applies each chosen operation with a probability (0.5); a skipped one is the identity.
        op = np.where(u[:, 5 * levels:] < cfg.rand_augment_prob, op, AUTO_AUGMENT_OPS.index("identity"))
    negate = u[:, 2 * levels:3 * levels] < 0.5
    return AugmentDraws(op.astype(np.int32), magnitude_bin.astype(np.int32), negate.astype(np.int32))


def auto_augment_for(cfg: DataConfig, *, seed: int) -> tuple[AugmentOp, ...]:
    """The operations of one training image (`auto_augments_for` of a batch of one)."""
    return auto_augments_for(np.array([seed], dtype=np.uint64), cfg).ops(0)
