"""The numeric format of the training step, chosen once: an autocast context and a gradient scaler."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from configs.schema import CompileMode, PrecisionConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True, slots=True)
class Precision:
    """How the step computes: `autocast()` around the forward pass, `scaler` around backward and step."""

    name: Literal["bf16", "fp16", "fp32"]
    """The resolved type ("auto" never appears here)."""
    device: torch.device
    """The device autocast applies to."""

    @property
    def dtype(self) -> torch.dtype:
        """The autocast compute type."""
        return DTYPES[self.name]

    @property
    def input_dtype(self) -> torch.dtype:
        """What the loaders deliver images in: half precision for mixed precision (autocast casts fp16 inputs
        to bf16 where needed; DALI has no bf16 output), fp32 otherwise."""
        return torch.float32 if self.name == "fp32" else torch.float16

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """Mixed-precision context for the forward pass and loss (a no-op for fp32)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, enabled in every precision: its device-side inf/NaN check lets a fused optimizer skip a
        step with non-finite gradients without a host sync. fp16 scales dynamically from 2**16; bf16 and fp32
        have fp32's exponent range and keep a power-of-two scale from 1, which changes no value."""
        if self.name == "fp16":
            return torch.amp.GradScaler(self.device.type)
        # The scale only ever halves, after a skipped step; growth is effectively off.
        return torch.amp.GradScaler(self.device.type, init_scale=1.0, growth_interval=2**31 - 1)


def resolve_precision(cfg: PrecisionConfig, device: torch.device) -> Precision:
    """Turn "auto" into bf16 on GPUs and fp32 elsewhere.

    CPUs without native bf16 (AVX-512 BF16 or AMX) emulate it, which makes autocast many times slower
    than plain fp32; asking for bf16 explicitly on such a CPU still gets it.
    """
    name = cfg.dtype
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return Precision(name=name, device=device)


def resolve_compile(cfg: PrecisionConfig, device: torch.device, *, strategy: str) -> CompileMode | None:
    """torch.compile's mode for this run, or None for no compile: precision.compile "auto" compiles on GPUs
    unless the strategy is DeepSpeed (which does not support it); true or false as given."""
    enabled = device.type == "cuda" and strategy != "deepspeed" if cfg.compile == "auto" else cfg.compile
    return cfg.compile_mode if enabled else None
