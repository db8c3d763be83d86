"""DeepSpeed: ZeRO stage 0/1/2 data parallelism, configured from our config (no second config file to drift).

What differs from DDP, and why:
- Precision stays torch autocast around the forward pass (trainer/precision.py). DeepSpeed's own fp16/bf16
  modes cast the whole model, BatchNorm included, which breaks its statistics.
- The parameters stay in the default (NCHW) layout; inputs and activations are channels-last all the same
  (a convolution with a channels-last input computes in NHWC). DeepSpeed broadcasts each parameter as a
  flat byte view and ZeRO turns them into views of one flat buffer, neither of which a channels-last
  weight can be; converting after `deepspeed.initialize` would detach them from that buffer.
- DeepSpeed never syncs BatchNorm buffers (DDP broadcasts rank 0's every forward): `sync_buffers`
  broadcasts rank 0's before evaluation and saving, so the numbers match DDP's.
- ZeRO's optimizer skips no step by itself outside DeepSpeed's fp16 mode. Each step all-reduces one
  flag, "some rank saw a non-finite loss", on the device and hands it to the fused SGD kernel as
  `found_inf`, which then leaves weights and momentum untouched: the same skip DDP gets from the
  gradient scaler. (Non-finite gradients from a finite loss are not caught; fp32 and bf16, the
  precisions allowed here, have fp32's range.)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from configs.extras import import_extra
from configs.errors import IncompatibleSettings
from configs.schema import DistributedConfig
from trainer.dist import DistContext, all_reduce_max, broadcast_buffers
from trainer.serialize import from_bytes
from trainer.optim import zero_momentum_buffers

PREFIX = "deepspeed."
"""Checkpoint file names of the engine's files: `deepspeed.<name as DeepSpeed writes it>`."""
TAG = "engine"


def deepspeed_config(cfg: DistributedConfig, *, micro_batch_size: int, accumulation_steps: int,
                     world_size: int, clip_grad_norm: float | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg`: everything DeepSpeed would otherwise default is said here.
    `clip_grad_norm`: optim.clip_grad_norm, which DeepSpeed applies to the global norm over all partitions."""
    bucket_elements = cfg.bucket_cap_mb * 2**20 // 4  # fp32 gradients
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": micro_batch_size * accumulation_steps * world_size,
        # The loop calls backward once per micro-batch and step once per optimiser step, as with DDP.
        "managed_gradient_accumulation": False,
        # DeepSpeed >= 0.19.3 clips gradients at norm 1.0 unless told otherwise: only optim.clip_grad_norm clips.
        "gradient_clipping": 0.0 if clip_grad_norm is None else clip_grad_norm,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "zero_optimization": {
            "stage": cfg.zero_stage,
            "reduce_bucket_size": bucket_elements,
            "allgather_bucket_size": bucket_elements,
        },
        # Our fused torch SGD runs on ZeRO's flat fp32 partitions as it does on whole tensors.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def deepspeed_device_rank(ctx: DistContext) -> int:
    """The `device_rank` DeepSpeed's engine places itself on: the context's GPU; on CPUs the local rank
    (DeepSpeed's CPU accelerator ignores it, but a negative one would make it a one-process job)."""
    return ctx.device.index if ctx.device.type == "cuda" else ctx.local_rank


class DeepSpeedStrategy:
    """A DeepSpeed engine around the model and our optimizer; see the module docstring."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: DistributedConfig,
                 ctx: DistContext, *, micro_batch_size: int, accumulation_steps: int,
                 clip_grad_norm: float | None = None) -> None:
        deepspeed = import_extra("deepspeed")
        # DeepSpeed insists on the variable even when it is handed an initialised process group.
        os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))
        self.world_size = ctx.world_size
        self.zero_stage = cfg.zero_stage
        config = deepspeed_config(cfg, micro_batch_size=micro_batch_size, accumulation_steps=accumulation_steps,
                                  world_size=ctx.world_size, clip_grad_norm=clip_grad_norm)
        # DeepSpeed would place itself on cuda:LOCAL_RANK unless told the device: under Ray those differ.
        self.engine, wrapped_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=deepspeed_device_rank(ctx)), model=model, optimizer=optimizer,
            config=config, dist_init_required=False)
        self.model = self.engine
        # ZeRO 1/2 wrap our optimizer and point its param groups at this rank's flat fp32 partitions.
        self.optimizer: torch.optim.Optimizer = getattr(wrapped_optimizer, "optimizer", wrapped_optimizer)
        # Momentum buffers made for the whole parameters would be a full copy per rank that ZeRO never uses.
        self.optimizer.state.clear()
        zero_momentum_buffers(self.optimizer)
        self.nonfinite = torch.zeros((), device=ctx.device)

    def no_sync(self) -> contextlib.AbstractContextManager[object]:
        # With managed_gradient_accumulation off, backward only accumulates; step() reduces.
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.nonfinite = torch.maximum(self.nonfinite, (~torch.isfinite(loss.detach())).float())
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already divided by the micro-batches

    def step(self) -> None:
        found_inf = all_reduce_max(self.nonfinite)
        self.optimizer.found_inf = found_inf  # type: ignore[attr-defined]  # read by fused SGD's step
        try:
            self.engine.step()
        finally:
            del self.optimizer.found_inf  # type: ignore[attr-defined]
        self.nonfinite = torch.zeros_like(self.nonfinite)

    def unwrapped(self) -> nn.Module:
        module = self.engine.module
        assert isinstance(module, nn.Module)
        return module

    def sync_buffers(self) -> None:
        broadcast_buffers(self.unwrapped())

    def save_files(self) -> dict[str, bytes]:
        # Every rank calls save_checkpoint: rank 0 writes the module (and stage 0's optimizer), each ZeRO rank
        # its optimizer partition. They go through our storage and manifest like any other file.
        with tempfile.TemporaryDirectory() as folder:
            self.engine.save_checkpoint(folder, tag=TAG, save_latest=False)
            tag_folder = Path(folder, TAG)
            return {f"{PREFIX}{path.name}": path.read_bytes() for path in sorted(tag_folder.iterdir())}

    def check_file(self, name: str, data: bytes) -> None:
        if name.startswith(PREFIX):
            check_weights_only(name, data)
        else:
            from_bytes(data)

    def load_files(self, names: list[str], read: Callable[[str], bytes]) -> None:
        engine_files = [name for name in names if name.startswith(PREFIX)]
        if not engine_files:
            raise ValueError(f"the checkpoint has no DeepSpeed engine files (its files: {', '.join(names)}): it was "
                             "written by another distributed.strategy; resume it with that strategy")
        partitions = [name for name in engine_files if "optim_states" in name and "zero_pp_rank_" in name]
        if self.zero_stage > 0 and len(partitions) != self.world_size:
            raise IncompatibleSettings(
                f"the checkpoint holds ZeRO optimizer state partitioned over {len(partitions)} ranks, this run has "
                f"{self.world_size}: ZeRO optimizer state only reloads at the same data-parallel world size. Resume "
                f"with {len(partitions)} workers (keeping data.batch_size x workers x optim.accumulation_steps)")
        with tempfile.TemporaryDirectory() as folder:
            tag_folder = Path(folder, TAG)
            tag_folder.mkdir()
            for name in engine_files:
                data = read(name)
                check_weights_only(name, data)
                (tag_folder / name.removeprefix(PREFIX)).write_bytes(data)
            path, _ = self.engine.load_checkpoint(folder, tag=TAG, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise ValueError(f"DeepSpeed could not load the engine files {engine_files}")


def check_weights_only(name: str, data: bytes) -> None:
    """Refuse an engine file that holds anything but tensors, plain containers and three plain DeepSpeed record
    classes: DeepSpeed's own loader unpickles fully, so this check is what keeps code out of a resume."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # the unpickler raises several types; all mean "not plain data"
            raise ValueError(f"checkpoint file {name} holds more than weights and is not loaded: {error}") from error

