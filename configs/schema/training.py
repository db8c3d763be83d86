"""optim.*, schedule.*, precision.*, distributed.*: how the model is trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from configs.schema.base import CompileMode, require


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimConfig:
    """Loss and optimiser: SGD, LARS, AdamW or LAMB, no weight decay on BatchNorm and bias parameters."""

    name: Literal["sgd", "lars", "adamw", "lamb"] = "sgd"
    """sgd: SGD with momentum; lars: layer-wise adaptive rate scaling, for global batches of 8k and more;
    adamw: Adam with decoupled weight decay (torch's fused AdamW); lamb: Adam moments with a layer-wise trust
    ratio (You et al. 2019), the optimiser of timm's "ResNet strikes back" recipes."""
    lars_eta: float = 0.001
    """LARS trust coefficient: each layer's step is scaled by eta x ||w|| / (||g|| + weight_decay x ||w||)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW and LAMB: decay rates of the gradient's running mean and of its running square."""
    adam_eps: float | None = None
    """AdamW and LAMB: the term added to the root of the running square; None: each one's usual default
    (AdamW 1e-8 as torch, LAMB 1e-6 as timm and NVIDIA's apex)."""
    lr: float = 0.1
    """Peak learning rate; with `scale_lr` it is the rate for a global batch of 256 images."""
    scale_lr: bool = True
    """Linear scaling rule (Goyal et al. 2017): peak lr = lr x global_batch_size / 256."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """Use Nesterov momentum."""
    weight_decay: float = 1e-4
    """L2 penalty on conv and FC weights (never on BatchNorm or bias parameters)."""
    loss: Literal["ce", "bce"] = "ce"
    """ce: softmax cross-entropy; bce: binary cross-entropy of each class's sigmoid against its target
    probability (timm's BinaryCrossEntropy, as in "ResNet strikes back"), mixed targets included."""
    label_smoothing: float = 0.1
    """Mass spread uniformly over all classes in the target (ce and bce alike; bce: before the threshold)."""
    bce_target_threshold: float | None = None
    """bce: targets above this become 1 and the rest 0, after mixing and smoothing (timm's --bce-target-thresh;
    "ResNet strikes back" uses 0.2); None: the probabilities as they are."""
    clip_grad_norm: float | None = None
    """Scale the gradients down where their global L2 norm exceeds this, after they are averaged over ranks and
    unscaled (fp16), before the optimiser steps; None: no clipping."""
    accumulation_steps: int = 1
    """Micro-batches of data.batch_size per optimiser step: the global batch is batch_size x world size x this."""
    max_nonfinite_steps: int = 20
    """Stop with an error after this many consecutive steps with a non-finite loss (each is skipped)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights, updated every step with this decay (e.g. 0.9998),
    and evaluate it beside the model; 0: off."""

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(self.lars_eta > 0, "lars_eta", self.lars_eta, "must be > 0")
        require(len(self.adam_betas) == 2 and all(0 <= beta < 1 for beta in self.adam_betas), "adam_betas",
                 self.adam_betas, "must be two decay rates in [0, 1)")
        require(self.adam_eps is None or self.adam_eps > 0, "adam_eps", self.adam_eps, "must be > 0 (or null)")
        require(self.bce_target_threshold is None or 0 <= self.bce_target_threshold < 1, "bce_target_threshold",
                 self.bce_target_threshold, "must be in [0, 1) (or null)")
        require(self.bce_target_threshold is None or self.loss == "bce", "bce_target_threshold",
                 self.bce_target_threshold, "applies to optim.loss='bce' only")
        require(self.clip_grad_norm is None or self.clip_grad_norm > 0, "clip_grad_norm", self.clip_grad_norm,
                 "must be > 0 (or null: no clipping)")
        require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        require(not self.nesterov or self.momentum > 0, "nesterov", self.nesterov, "needs momentum > 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "must be in [0, 1)")
        require(self.accumulation_steps >= 1, "accumulation_steps", self.accumulation_steps, "must be >= 1")
        require(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "must be in [0, 1)")
        require(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", self.max_nonfinite_steps, "must be >= 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleConfig:
    """Length of training and the per-iteration learning-rate schedule."""

    epochs: int = 90
    """Passes over the training set."""
    warmup_epochs: float = 5.0
    """Linear warm-up from 0 to the peak lr over this many epochs (counted in iterations)."""
    decay: Literal["cosine", "linear", "step"] = "cosine"
    """After warm-up: cosine or a straight line to zero at the last iteration (linear: FFCV's "cyclic"
    schedule), or step decay at `step_milestones`."""
    step_milestones: tuple[int, ...] = (30, 60, 80)
    """Epochs at which step decay multiplies the lr by `step_gamma` (checked and used only with decay: step)."""
    step_gamma: float = 0.1
    """Factor applied at each step milestone."""
    target_top1: float | None = None
    """End the run at the first end-of-epoch evaluation whose val top-1 (a fraction: 0.98) reaches this; its
    checkpoint, summary and registration are those of a normal end. None: train every epoch."""

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        require(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", self.warmup_epochs,
                 f"must be in [0, epochs={self.epochs}]")
        if self.decay == "step":
            milestones = list(self.step_milestones)
            require(milestones == sorted(set(milestones)) and all(0 < m < self.epochs for m in milestones),
                     "step_milestones", self.step_milestones,
                     f"must be strictly increasing epochs between 1 and epochs-1={self.epochs - 1}")
        require(0 < self.step_gamma < 1, "step_gamma", self.step_gamma, "must be in (0, 1)")
        require(self.target_top1 is None or 0 < self.target_top1 <= 1, "target_top1", self.target_top1,
                 "must be a fraction in (0, 1] (0.98 for 98%)")


@dataclass(frozen=True, slots=True, kw_only=True)
class PrecisionConfig:
    """Numeric format and memory layout of the training step."""

    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Autocast type: auto is bf16 on GPUs and fp32 on CPUs (bf16 on a CPU without native support
    runs many times slower); fp16 adds a gradient scaler."""
    channels_last: bool = True
    """Keep the model and its inputs in NHWC memory format (what tensor cores and oneDNN prefer)."""
    compile: Literal["auto", True, False] = "auto"
    """Compile the model with torch.compile (inductor): fused BatchNorm/ReLU kernels for about 30 s of compile
    time at start-up (reported as first_step_s, apart from images/s). auto: on GPUs (1.46x for ResNet-50 on
    one H200, 1.40x fed by DALI: BENCHMARKS.md, 9755cf5), off on CPUs (inductor's CPU compile of a ResNet takes
    minutes for little gain) and under DeepSpeed (not supported)."""
    compile_mode: CompileMode = "default"
    """torch.compile's mode: reduce-overhead adds CUDA graphs, max-autotune also times kernel variants (longer
    compiles). `bench gpu` measures them side by side: on one H200, CUDA graphs added 1.4% to the bare step
    (BENCHMARKS.md, 9755cf5), not enough to make them the default."""
    tf32: bool = True
    """GPUs: let fp32 matmuls and convolutions (those autocast leaves in fp32) use TF32 tensor cores."""
    cudnn_benchmark: bool = True
    """GPUs: let cuDNN time its convolution algorithms once per input shape and keep the fastest."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DistributedConfig:
    """How workers share the step."""

    strategy: Literal["none", "ddp", "deepspeed"] = "none"
    """none: one process; ddp: PyTorch DistributedDataParallel; deepspeed: a DeepSpeed engine with ZeRO
    (`zero_stage`), over all launched processes."""
    bucket_cap_mb: int = 25
    """Gradient bucket size (DDP buckets; DeepSpeed's reduce bucket): larger buckets mean fewer all-reduce
    calls, smaller ones earlier overlap with the backward pass."""
    sync_batchnorm: bool = False
    """Compute BatchNorm statistics over the global batch (GPUs only): for per-GPU batches below ~32."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0 plain data parallel, 1 partitioned optimizer state, 2 also partitioned
    gradients. (Stage 3, partitioned weights, buys nothing for a 25M-parameter ResNet.)"""
    timeout_s: float = 1800.0
    """Process-group timeout: a collective that waits longer (a rank that hangs or stopped answering) fails
    the process, and Ray restarts the group from the last checkpoint instead of the job hanging for ever.
    Must exceed the longest legitimate wait between collectives: rank 0 writing a checkpoint or evaluating,
    a node staging its data set at start-up (PyTorch's own defaults: 10 min nccl, 30 min gloo)."""

    def __post_init__(self) -> None:
        require(self.bucket_cap_mb >= 1, "bucket_cap_mb", self.bucket_cap_mb, "must be >= 1")
        require(self.zero_stage in (0, 1, 2), "zero_stage", self.zero_stage, "must be 0, 1 or 2")
        require(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be > 0")
