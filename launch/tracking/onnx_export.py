"""ONNX export (`export --format onnx`) and its parity check against PyTorch (`pip install 'resnet-train[onnx]'`).

The network goes through torch.export and torch's dynamo-based ONNX exporter, at opset `ONNX_OPSET`, with a
dynamic batch dimension: input `images` float32 [N, 3, S, S] (normalised as in training), output `logits`
[N, classes], the same contract as the torch.export program. An exported file is only kept after
onnxruntime's logits on real images (the first val images of the model's data set, preprocessed as its
evaluation does) agree with PyTorch's in float32 within `ONNX_RTOL`/`ONNX_ATOL`, and every image's top-1
class is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from configs.extras import import_extra, modules_of, require_extras

ONNX_OPSET = 18
"""ONNX operator set of the exported graph (onnxruntime >= 1.14 runs it; torch's exporter targets >= 18)."""
ONNX_RTOL = 1e-4
ONNX_ATOL = 1e-4
"""Parity tolerance: |onnx - torch| <= ONNX_ATOL + ONNX_RTOL x |torch| for every logit (float32 on the CPU;
measured differences are ~1e-6, from a different order of float sums in the convolutions)."""
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


class ParityError(RuntimeError):
    """The exported ONNX graph does not compute what the PyTorch network does."""


@dataclass(frozen=True, slots=True)
class Parity:
    """How onnxruntime's logits compare with PyTorch's on the same images."""

    images: int
    max_abs_diff: float
    worst_excess: float
    """max of |onnx - torch| - (ONNX_ATOL + ONNX_RTOL x |torch|): <= 0 within the tolerance."""
    top1_agree: int
    """Images whose top-1 class is the same in both."""

    @property
    def ok(self) -> bool:
        return self.worst_excess <= 0 and self.top1_agree == self.images

    def describe(self) -> str:
        return (f"onnxruntime vs PyTorch on {self.images} val images: max |logit difference| "
                f"{self.max_abs_diff:.2e} (tolerance {ONNX_ATOL:g} + {ONNX_RTOL:g} x |logit|), top-1 the same for "
                f"{self.top1_agree}/{self.images}")


def export_onnx(network: nn.Module, size: int, path: Path) -> None:
    """Write `network` (float32, on the CPU) as an ONNX graph for [N, 3, size, size] inputs, N dynamic."""
    require_extras(modules_of("onnx"))  # torch's exporter imports them itself; say which extra installs them
    network = network.eval()
    example = (torch.randn(2, 3, size, size),)
    program = torch.onnx.export(network, example, dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    if program is None:
        raise RuntimeError(f"torch.onnx.export returned no program for {type(network).__name__}")
    program.save(str(path))


def onnx_session(path: Path, *, threads: int | None = None) -> object:
    """An onnxruntime CPU session over the file at `path` (`threads`: intra-op threads; None: onnxruntime's
    default, one per core)."""
    ort = import_extra("onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(path: Path, network: nn.Module, images: torch.Tensor) -> Parity:
    """Compare the logits of the ONNX file at `path` (onnxruntime) with `network`'s on `images`."""
    session = onnx_session(path)
    with torch.no_grad():
        expected = network.eval()(images).numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]  # type: ignore[attr-defined]
    difference = np.abs(got - expected)
    return Parity(images=len(images), max_abs_diff=float(difference.max()),
                  worst_excess=float((difference - (ONNX_ATOL + ONNX_RTOL * np.abs(expected))).max()),
                  top1_agree=int((got.argmax(1) == expected.argmax(1)).sum()))
