"""Checkpoint files as bytes: `torch.save` into memory and `torch.load` with `weights_only=True` back."""

from __future__ import annotations

import io
from typing import Any

import torch


def to_bytes(obj: object) -> bytes:
    """`torch.save` into memory."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> Any:
    """`torch.load` with `weights_only=True`: tensors and plain containers only, no code."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
