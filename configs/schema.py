"""The run configuration: one frozen tree of typed sections.

Defaults are the standard ImageNet ResNet-50 recipe (He et al. 2015 with the Goyal et al. 2017
large-batch rules); a YAML recipe in this folder changes only what differs. Each section checks its
own values when built, so an impossible setting fails before any work starts; the loader adds the
file or override the value came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from configs.errors import IncompatibleSettings

RESERVED_ALIAS = re.compile(r"^(v\d+|latest)$", re.IGNORECASE)
"""MLflow model-version aliases it keeps for itself."""


class InvalidValue(ValueError):
    """A field holds a value of the right type that is not allowed; the loader names where it came from."""

    def __init__(self, key: str, value: Any, reason: str) -> None:
        super().__init__(f"{key}={value!r}: {reason}")
        self.key, self.value, self.reason = key, value, reason


def _require(ok: bool, key: str, value: Any, reason: str) -> None:
    if not ok:
        raise InvalidValue(key, value, reason)


ModelName = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
"""torch.compile's modes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """Which ResNet to build."""

    name: ModelName = "resnet50"
    """Depth of the network: resnet18/34 use BasicBlock, resnet50/101/152 Bottleneck."""
    num_classes: int = 1000
    """Outputs of the final FC layer; must equal the number of classes in the data set."""
    small_input: bool = False
    """3x3/1 stem conv and no max-pool, for 32-64 px images."""
    zero_init_residual: bool = True
    """Start each block's last BatchNorm at zero so every residual block begins as the identity."""
    blurpool: bool = False
    """Anti-aliased downsampling (BlurPool, Zhang 2019, as FFCV's and Composer's ResNet recipes use it): strided
    convolutions and the max-pool blur first. The state dict keeps torchvision's names, but the function
    differs: checkpoints and registered versions record it."""
    init_from: str | None = None
    """Fine-tuning: start from these weights instead of random ones (a fresh optimizer and schedule): a
    torchvision-layout state dict file or URL (e.g. torchvision's ImageNet weights), a run's checkpoints
    folder or step folder, or a registered model (models:/NAME/VERSION or @ALIAS). A classifier of another
    number of classes is re-initialised. A run that resumes from its own checkpoint ignores it."""

    def __post_init__(self) -> None:
        _require(self.num_classes >= 2, "num_classes", self.num_classes, "must be >= 2")


@dataclass(frozen=True, slots=True, kw_only=True)
class DataConfig:
    """Where the images come from and how they are batched and augmented."""

    dataset: Literal["folder", "digits", "synthetic"] = "folder"
    """folder: an ImageNet-layout tree (train/<class>/*, val/<class>/*) at `root`;
    digits: the built-in handwritten digits set, rendered into `root` at first use;
    synthetic: random tensors made once on the device (compute benchmarks; `root` is not read)."""
    root: str = "data/imagenet"
    """Folder or URL (s3://, gs://, http(s)://) of the data set; a URL is staged to `stage_dir` first."""
    index_dir: str | None = None
    """Folder or URL of the index written by `python -m launch data prepare` (only indexed images are read);
    None: <root>/index."""
    stage_dir: str = "~/.cache/resnet-train/datasets"
    """Local folder (fast disk) that a data set at a URL is copied to, once per node, before training; `~` and
    environment variables (`$LOCAL_NVME/datasets`) are expanded on each node, for nodes whose fast disk is
    at different paths."""
    loader: Literal["dali", "torch"] = "dali"
    """dali: NVIDIA DALI decodes on the GPU (CPU threads without one); torch: the PIL DataLoader baseline."""
    batch_size: int = 256
    """Images per worker per micro-batch; the global batch is this x world size x optim.accumulation_steps."""
    num_workers: int = 8
    """Decoding threads (dali) or processes (torch) per training worker. DALI on one H200 with 16 cores: 12
    threads decode 9% faster than 8, 4 threads 39% slower (BENCHMARKS.md, 9755cf5); give each GPU's worker
    most of its share of the node's cores."""
    reader_threads: int = 2
    """dali: threads that read the files and compute the crops of upcoming batches, off the training thread;
    0 reads them on the training thread (DALI's plain external source)."""
    reader_lookahead: int = 4
    """dali: batches read ahead of the pipeline's requests by the reader threads."""
    dali_hw_decoder_load: float = 0.65
    """dali on GPUs: the share of each batch's JPEGs sent to the GPU's hardware JPEG decoder (A100, H100/H200);
    the rest are Huffman-decoded on the CPU threads and finished on the GPU. DALI's own default is 0.65;
    NVIDIA's MLPerf ResNet-50 runs on H100/H200 use 0.99. On one H200 with 8 threads, 0.65 / 0.9 / 0.99 decoded
    within 2% of each other (`bench gpu`, BENCHMARKS.md, commit 9755cf5), so DALI's default stays."""
    dali_prefetch_depth: int = 2
    """dali: batches the pipeline prepares ahead of the one the training step takes (DALI's prefetch queue); 3 or
    5 decoded 3% faster than 2 on one H200 (BENCHMARKS.md, 9755cf5), within the spread."""
    dali_memory_padding_mb: int | None = None
    """dali on GPUs: headroom the decoder adds to each of its device and host buffers when it grows them, so that
    a larger image later does not reallocate (MLPerf's H100/H200 runs: 256); None: DALI's defaults (16 MB device,
    8 MB host). 256 made no difference on one H200 (BENCHMARKS.md, 9755cf5)."""
    dali_decode: Literal["roi", "full"] = "roi"
    """dali: roi decodes only each image's crop window (`decoders.image_slice`); full decodes the whole image and
    slices the window out on the device. The images delivered are the same (tests/gpu); full decoded 18% slower
    on one H200 (BENCHMARKS.md, 9755cf5)."""
    image_size: int = 224
    """Side of the square crops the model trains on (and is validated on unless val_image_size is set)."""
    progressive_start_size: int | None = None
    """Progressive resizing: the training crop side of the first epochs, which grows linearly to image_size
    from progressive_start_epoch to progressive_end_epoch, in steps of progressive_multiple (FFCV's ResNet
    recipes: 160 to 192). The batch size and the learning-rate schedule stay as they are. None: image_size
    throughout."""
    progressive_start_epoch: int = 0
    """The last epoch trained at progressive_start_size (0-based); the ramp starts after it."""
    progressive_end_epoch: int = 0
    """The first epoch trained at image_size (0-based)."""
    progressive_multiple: int = 32
    """Sizes on the ramp are rounded to a multiple of this."""
    val_image_size: int | None = None
    """Side of the validation crops, which is also the size the registered and exported model takes; None:
    image_size. A network trained at low resolution scores best evaluated somewhat higher (FixRes, Touvron
    et al. 2019: train 160, evaluate 224)."""
    min_crop_area: float = 0.08
    """Smallest fraction of the image area a training random-resized crop keeps (Inception-style)."""
    random_flip: bool = True
    """Flip training images horizontally with probability 1/2."""
    auto_augment: Literal["none", "trivial", "rand"] = "none"
    """Automatic augmentation of training images after cropping: trivial: TrivialAugmentWide (Muller and Hutter
    2021; one of 14 operations per image at a random strength); rand: RandAugment (Cubuk et al. 2020;
    rand_augment_ops operations per image at strength rand_augment_magnitude). The operations, strengths and
    signs are drawn from each sample's seed (exact resume); DALI applies them with its auto_aug operations,
    the baseline with torchvision's."""
    rand_augment_ops: int = 2
    """RandAugment: operations applied to each image, one after the other (timm's and torchvision's 2)."""
    rand_augment_magnitude: int = 9
    """RandAugment: strength of every operation, a bin of 0..30 (torchvision's 9; timm's RSB recipes 6-7)."""
    random_erasing_prob: float = 0.0
    """Random erasing (Zhong et al. 2020, torchvision's RandomErasing): with this probability a training image
    has a box of 2-33% of its area, aspect ratio 0.3-3.3, set to the mean colour (0 after normalisation)."""
    mixup_alpha: float = 0.0
    """Mixup (Zhang et al. 2018): blend each training image with another, weight ~ Beta(alpha, alpha), and
    their targets likewise; 0: off. timm's recipes use 0.1-0.8."""
    cutmix_alpha: float = 0.0
    """CutMix (Yun et al. 2019): paste a box of another image, area fraction ~ Beta(alpha, alpha); 0: off."""
    mix_prob: float = 1.0
    """Probability that a micro-batch is mixed at all (with mixup or CutMix on)."""
    mix_switch_prob: float = 0.5
    """With both on: probability of CutMix rather than mixup for a micro-batch."""
    val_flip_average: bool = False
    """Validation scores each image and its mirror image and averages the logits (test-time augmentation, as
    in FFCV's ResNet recipes): about twice the evaluation compute. The served model does not do it."""
    val_crop_ratio: float = 0.875
    """Validation resizes the shorter side to S / val_crop_ratio, then centre-crops S (S: the validation
    crop size, `crop_size(train=False)`)."""
    synthetic_images: int = 1_281_167
    """Training images per epoch of the synthetic data set (ImageNet's count); its validation set is one
    batch per worker."""
    synthetic_classes: int = 1000
    """Classes of the synthetic data set's labels (must equal model.num_classes)."""

    def __post_init__(self) -> None:
        _require(bool(self.root), "root", self.root, "must name a folder")
        _require(self.dataset != "digits" or "://" not in self.root, "root", self.root,
                 "is a URL, but data.dataset='digits' renders the digits into a local folder there; for a data set "
                 "at a URL set data.dataset='folder'")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _require(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0")
        _require(self.reader_threads >= 0, "reader_threads", self.reader_threads, "must be >= 0")
        _require(self.reader_lookahead >= 1, "reader_lookahead", self.reader_lookahead, "must be >= 1")
        _require(0 <= self.dali_hw_decoder_load <= 1, "dali_hw_decoder_load", self.dali_hw_decoder_load,
                 "must be in [0, 1]")
        _require(self.dali_prefetch_depth >= 1, "dali_prefetch_depth", self.dali_prefetch_depth, "must be >= 1")
        _require(self.dali_memory_padding_mb is None or self.dali_memory_padding_mb >= 0, "dali_memory_padding_mb",
                 self.dali_memory_padding_mb, "must be >= 0 (or null: DALI's defaults)")
        _require(self.image_size >= 8, "image_size", self.image_size, "must be >= 8")
        _require(self.val_image_size is None or self.val_image_size >= 8, "val_image_size", self.val_image_size,
                 "must be >= 8")
        _require(self.rand_augment_ops >= 1, "rand_augment_ops", self.rand_augment_ops, "must be >= 1")
        _require(0 <= self.rand_augment_magnitude <= 30, "rand_augment_magnitude", self.rand_augment_magnitude,
                 "must be a bin of 0..30")
        _require(0 <= self.random_erasing_prob <= 1, "random_erasing_prob", self.random_erasing_prob,
                 "must be in [0, 1]")
        _require(self.mixup_alpha >= 0, "mixup_alpha", self.mixup_alpha, "must be >= 0 (0: off)")
        _require(self.cutmix_alpha >= 0, "cutmix_alpha", self.cutmix_alpha, "must be >= 0 (0: off)")
        _require(0 <= self.mix_prob <= 1, "mix_prob", self.mix_prob, "must be in [0, 1]")
        _require(0 <= self.mix_switch_prob <= 1, "mix_switch_prob", self.mix_switch_prob, "must be in [0, 1]")
        _require(self.progressive_multiple >= 1, "progressive_multiple", self.progressive_multiple, "must be >= 1")
        if self.progressive_start_size is not None:
            _require(8 <= self.progressive_start_size, "progressive_start_size", self.progressive_start_size,
                     "must be >= 8")
            _require(0 <= self.progressive_start_epoch < self.progressive_end_epoch, "progressive_end_epoch",
                     self.progressive_end_epoch,
                     f"must be after progressive_start_epoch={self.progressive_start_epoch} (>= 0)")
        _require(0 < self.min_crop_area <= 1, "min_crop_area", self.min_crop_area, "must be in (0, 1]")
        _require(0 < self.val_crop_ratio <= 1, "val_crop_ratio", self.val_crop_ratio, "must be in (0, 1]")
        _require(self.synthetic_images >= 1, "synthetic_images", self.synthetic_images, "must be >= 1")
        _require(self.synthetic_classes >= 2, "synthetic_classes", self.synthetic_classes, "must be >= 2")

    def crop_size(self, *, train: bool, epoch: int | None = None) -> int:
        """Side of the images a validation batch holds, or a training batch of `epoch` (progressive resizing;
        without an epoch: image_size, where training ends)."""
        if not train:
            return self.image_size if self.val_image_size is None else self.val_image_size
        start, end = self.progressive_start_epoch, self.progressive_end_epoch
        if self.progressive_start_size is None or epoch is None or epoch >= end:
            return self.image_size
        if epoch <= start:
            return self.progressive_start_size
        size = self.progressive_start_size + (self.image_size - self.progressive_start_size) * (epoch - start) / (
            end - start)
        return max(8, round(size / self.progressive_multiple) * self.progressive_multiple)


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimConfig:
    """Loss and optimiser: SGD or LARS with momentum, no weight decay on BatchNorm and bias parameters."""

    name: Literal["sgd", "lars"] = "sgd"
    """sgd: SGD with momentum; lars: layer-wise adaptive rate scaling, for global batches of 8k and more."""
    lars_eta: float = 0.001
    """LARS trust coefficient: each layer's step is scaled by eta x ||w|| / (||g|| + weight_decay x ||w||)."""
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
    label_smoothing: float = 0.1
    """Mass spread uniformly over all classes in the cross-entropy target."""
    accumulation_steps: int = 1
    """Micro-batches of data.batch_size per optimiser step: the global batch is batch_size x world size x this."""
    max_nonfinite_steps: int = 20
    """Stop with an error after this many consecutive steps with a non-finite loss (each is skipped)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights, updated every step with this decay (e.g. 0.9998),
    and evaluate it beside the model; 0: off."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr", self.lr, "must be > 0")
        _require(self.lars_eta > 0, "lars_eta", self.lars_eta, "must be > 0")
        _require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        _require(not self.nesterov or self.momentum > 0, "nesterov", self.nesterov, "needs momentum > 0")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _require(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "must be in [0, 1)")
        _require(self.accumulation_steps >= 1, "accumulation_steps", self.accumulation_steps, "must be >= 1")
        _require(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "must be in [0, 1)")
        _require(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", self.max_nonfinite_steps, "must be >= 1")


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
        _require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        _require(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", self.warmup_epochs,
                 f"must be in [0, epochs={self.epochs}]")
        if self.decay == "step":
            milestones = list(self.step_milestones)
            _require(milestones == sorted(set(milestones)) and all(0 < m < self.epochs for m in milestones),
                     "step_milestones", self.step_milestones,
                     f"must be strictly increasing epochs between 1 and epochs-1={self.epochs - 1}")
        _require(0 < self.step_gamma < 1, "step_gamma", self.step_gamma, "must be in (0, 1)")
        _require(self.target_top1 is None or 0 < self.target_top1 <= 1, "target_top1", self.target_top1,
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
        _require(self.bucket_cap_mb >= 1, "bucket_cap_mb", self.bucket_cap_mb, "must be >= 1")
        _require(self.zero_stage in (0, 1, 2), "zero_stage", self.zero_stage, "must be 0, 1 or 2")
        _require(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be > 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointConfig:
    """Where and how often the run is saved; a run always resumes from the newest complete checkpoint there."""

    url: str | None = None
    """Folder (path or fsspec URL) of the run's checkpoints; the launcher sets None to <run dir>/checkpoints."""
    interval_steps: int = 0
    """Also save every this many steps within an epoch; 0: only at the end of each epoch."""
    keep_last: int = 3
    """How many of the newest checkpoints to keep (the best one is kept as well)."""
    lease_timeout_s: float = 300.0
    """A run holds its checkpoint URL (one writer per URL) and renews its claim every tenth of this; a claim
    not renewed for this long is taken over by the next run that wants the URL."""

    def __post_init__(self) -> None:
        _require(self.interval_steps >= 0, "interval_steps", self.interval_steps, "must be >= 0")
        _require(self.keep_last >= 1, "keep_last", self.keep_last, "must be >= 1")
        _require(self.lease_timeout_s > 0, "lease_timeout_s", self.lease_timeout_s, "must be > 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrackingConfig:
    """What the run reports and to whom."""

    log_interval_steps: int = 50
    """Report loss, lr and images/s every this many steps (the only points where the loop syncs with the device)."""
    enabled: bool = True
    """Record the run in MLflow (extra `mlflow`), from the primary process."""
    uri: str | None = None
    """MLflow tracking URI (http://host:5000 for an `mlflow server`); None: sqlite:///<runs_dir>/mlflow.db with
    artifacts in <runs_dir>/mlartifacts."""
    experiment: str = "resnet"
    """MLflow experiment the runs are grouped under."""
    register: bool = True
    """At the end of the run, register its model (register_weights) as a new version of `model_name` in the MLflow
    registry."""
    register_weights: Literal["final", "best", "ema"] = "final"
    """Which weights are registered: final: the last step's; best: the kept checkpoint with the highest val
    top-1; ema: the last step's exponential moving average (needs optim.ema_decay > 0). The version's
    val_* tags are the scores of those weights, its `registered_weights` tag says which."""
    model_name: str | None = None
    """Registered model the versions go to; None: <model.name>-<data set>, the data set being digits/synthetic
    or the last part of data.root (resnet50-imagenet for /data/imagenet)."""
    promote_alias: str | None = None
    """After registering (not without `register`), move this alias (e.g. staging) to the new version if the
    promotion gate allows: `promote_metric` at least `promote_min` and not below the alias's current holder."""
    promote_metric: str = "val_top1"
    """The version tag the promotion gate compares."""
    promote_min: float | None = None
    """The floor the gate requires of `promote_metric`; None: no floor."""
    promote_eval_data: str | None = None
    """Folder or URL of an indexed data set whose val split the gate scores the new version and the alias's
    holder on at the end of the run (in its primary process), comparing those scores; None: the versions' own
    val tags."""
    promote_max_regression: float = 0.0
    """How far below the holder's metric the new version may be and still take the alias."""
    top1_thresholds: tuple[float, ...] = (0.5, 0.7, 0.75, 0.76, 0.78, 0.9, 0.95, 0.98)
    """Val top-1 levels whose time to accuracy the run records (elapsed time and device-hours of the first
    evaluation reaching each; schedule.target_top1 is always one), in metrics, summary.json and MLflow."""

    def __post_init__(self) -> None:
        _require(self.log_interval_steps >= 1, "log_interval_steps", self.log_interval_steps, "must be >= 1")
        thresholds = list(self.top1_thresholds)
        _require(thresholds == sorted(set(thresholds)) and all(0 < t <= 1 for t in thresholds), "top1_thresholds",
                 self.top1_thresholds, "must be increasing fractions in (0, 1]")
        _require(self.promote_max_regression >= 0, "promote_max_regression", self.promote_max_regression,
                 "must be >= 0")
        _require(self.promote_alias is None or RESERVED_ALIAS.match(self.promote_alias) is None, "promote_alias",
                 self.promote_alias, "is reserved by MLflow (v<number>, latest)")


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchConfig:
    """How the job is started and where its outputs go."""

    launcher: Literal["ray", "torchrun"] = "ray"
    """ray: `num_workers` Ray Train workers on a Ray cluster (joined, or started on this machine), restarted
    after failures; torchrun: this process, or each of the processes `torchrun` starts."""
    runs_dir: str = "runs"
    """Folder holding one sub-folder per run (resolved config, metrics, summary, checkpoints); on a multi-node
    Ray cluster it must be storage every node sees (a shared file system)."""
    name: str | None = None
    """Run name, the sub-folder under runs_dir; None: <model>-<UTC time>."""
    num_workers: int | tuple[int, int] = 1
    """Ray: training processes (one per GPU on GPU clusters); or a range [min, max] for elastic training: Ray
    starts with as many as it can get (at least min), shrinks after a failure, and grows back when resources
    return. The global batch stays data.batch_size x max x optim.accumulation_steps at every size: each rank
    accumulates max x accumulation_steps / world size micro-batches, so every size in the range must divide
    that number."""
    resize_interval_s: float = 60.0
    """Ray, with a range: how often a healthy group checks whether more workers can be had (growing restarts
    the group from its latest checkpoint)."""
    group_start_timeout_s: float = 60.0
    """Ray: how long a new worker group waits for its workers. After a node is lost, Ray first asks for the
    size it had (the lost node's resources may still be listed) and only after this timeout starts with the
    workers it can get: most of what a shrink costs. Shorter shrinks faster; it must exceed the time a worker
    takes to start (container pulls, data staging happen after it starts)."""
    cpus_per_worker: float = 1.0
    """Ray: CPUs reserved per worker, for the step and its data loading (DALI threads or DataLoader processes);
    Ray also sets OMP_NUM_THREADS to it."""
    gpus_per_worker: float = 0.0
    """Ray: GPUs per worker (1 on GPU clusters; 0 trains on CPUs with gloo)."""
    max_failures: int = 3
    """Ray: worker-group failures (a dead process or node, a preemption) after which the run is restarted from
    its latest checkpoint; one more ends the run with an error naming that checkpoint."""
    ray_address: str | None = None
    """Ray: the cluster to join ("auto", "host:6379", "ray://host:10001"); None: $RAY_ADDRESS if set, else a
    new single-machine cluster bound to 127.0.0.1."""

    def __post_init__(self) -> None:
        _require(self.name is None or (self.name != "" and "/" not in self.name), "name", self.name,
                 "must be a non-empty folder name without '/'")
        _require(self.min_workers >= 1 and self.min_workers <= self.max_workers, "num_workers", self.num_workers,
                 "must be >= 1, or a range [min, max] with 1 <= min <= max")
        _require(self.resize_interval_s > 0, "resize_interval_s", self.resize_interval_s, "must be > 0")
        _require(self.group_start_timeout_s > 0, "group_start_timeout_s", self.group_start_timeout_s, "must be > 0")
        _require(self.cpus_per_worker > 0, "cpus_per_worker", self.cpus_per_worker, "must be > 0")
        _require(self.gpus_per_worker >= 0, "gpus_per_worker", self.gpus_per_worker, "must be >= 0")
        _require(self.max_failures >= 0, "max_failures", self.max_failures, "must be >= 0")

    @property
    def min_workers(self) -> int:
        """The fewest workers the run trains with (num_workers, or the range's min)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        """The most workers the run trains with (num_workers, or the range's max): the global batch's reference."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        """A range of sizes: the world size may change between starts of the run."""
        return self.min_workers != self.max_workers


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """Everything one training run needs, section by section."""

    seed: int = 0
    """Seed of every random number generator (weights, shuffling, augmentation)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        _require(self.tracking.register_weights != "ema" or self.optim.ema_decay > 0, "tracking.register_weights",
                 self.tracking.register_weights, "needs optim.ema_decay > 0 (no average of the weights is kept)")
        launch = self.launch
        if launch.elastic:
            _require(launch.launcher == "ray", "launch.num_workers", launch.num_workers,
                     "is a range, which needs launch.launcher='ray' (torchrun starts a fixed number of processes)")
            _require(self.distributed.strategy == "ddp", "launch.num_workers", launch.num_workers,
                     "is a range, which needs distributed.strategy='ddp' (a DeepSpeed ZeRO checkpoint only "
                     "reloads at the world size that wrote it)")
            micro_batches = self.micro_batches_per_step
            sizes = range(launch.min_workers, launch.max_workers + 1)
            working = [size for size in range(1, launch.max_workers + 1) if micro_batches % size == 0]
            _require(all(micro_batches % size == 0 for size in sizes), "launch.num_workers", launch.num_workers,
                     f"includes world sizes that do not divide the {micro_batches} micro-batches of "
                     f"data.batch_size={self.data.batch_size} images in each step (max workers x "
                     f"optim.accumulation_steps); sizes that do: {working}: choose a range of those, or change "
                     "optim.accumulation_steps")

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches of data.batch_size images in one optimiser step of all ranks together, at the (max)
        number of workers: launch.max_workers x optim.accumulation_steps."""
        return self.launch.max_workers * self.optim.accumulation_steps

    def accumulation_steps_for(self, world_size: int) -> int:
        """Micro-batches each rank accumulates per step at `world_size`: optim.accumulation_steps, or with a
        range of workers what keeps the global batch at max workers' (data.batch_size x max x accumulation)."""
        if not self.launch.elastic:
            return self.optim.accumulation_steps
        micro_batches = self.micro_batches_per_step
        if micro_batches % world_size:
            sizes = f"[{self.launch.min_workers}, {self.launch.max_workers}]"
            raise IncompatibleSettings(f"launch.num_workers={sizes} does not allow {world_size} workers: they "
                                       f"cannot share {micro_batches} micro-batches per step evenly")
        return micro_batches // world_size
