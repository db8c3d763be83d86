"""data.*: where the images come from and how they are batched and augmented."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from configs.schema.base import require


@dataclass(frozen=True, slots=True, kw_only=True)
class DataConfig:
    """Where the images come from and how they are batched and augmented."""

    dataset: Literal["folder", "digits", "synthetic"] = "folder"
    """folder: an ImageNet-layout tree (train/<class>/*, val/<class>/*) at `root`;
    digits: the built-in handwritten digits set, rendered into `root` at first use;
    synthetic: random tensors made once on the device (compute benchmarks; `root` is not read)."""
    root: str = "data/imagenet"
    """Folder or URL (s3://, gs://, http(s)://) of the data set: an ImageNet-layout tree, staged to `stage_dir`
    first when at a URL; or a packed data set (`python -m launch data pack`: shards.json at its root), read from
    its shards in place on local disk and streamed through a shard cache under `stage_dir` from a URL."""
    index_dir: str | None = None
    """Folder or URL of the index written by `python -m launch data prepare` (only indexed images are read);
    None: <root>/index."""
    stage_dir: str = "~/.cache/resnet-train/datasets"
    """Local folder (fast disk) that a data set at a URL is copied to, once per node, before training; `~` and
    environment variables (`$LOCAL_NVME/datasets`) are expanded on each node, for nodes whose fast disk is
    at different paths."""
    cache_limit_gb: float | None = None
    """A packed data set at a URL: the most the node's shard cache holds, in GB (1e9 bytes), least recently used
    shards deleted first (the node's ranks share it); None: no limit (from the second epoch on nothing is
    fetched). Two blocks of shards (shuffle_block_shards) are needed at a time; less fetches shards twice."""
    shuffle_block_shards: int = 4
    """A packed data set: a training epoch reads the shards in a seeded order, this many at a time, their samples
    shuffled together (shards are packed in a random order, so every block mixes the classes)."""
    fetch_threads: int = 4
    """A packed data set at a URL: threads of each training worker that fetch shards ahead of need."""
    loader: Literal["dali", "torch"] = "dali"
    """dali: NVIDIA DALI decodes on the GPU (CPU threads without one); torch: the PIL DataLoader baseline."""
    batch_size: int = 256
    """Images per worker per micro-batch; the global batch is this x world size x optim.accumulation_steps."""
    dali_threads: int = 8
    """dali: CPU threads of each training worker's pipeline (all of the decoding where there is no GPU). On
    one H200 with 16 cores, 12 threads decode 9% faster than 8, 4 threads 39% slower (BENCHMARKS.md, 9755cf5):
    give each GPU's worker most of its share of the node's cores. (Was data.num_workers.)"""
    loader_workers: int = 8
    """torch: DataLoader worker processes per training worker (0: decode on the training thread). (Was
    data.num_workers.)"""
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
    """RandAugment: strength of every operation, a bin of 0..30 (torchvision's 9). timm counts strengths from 0
    to 10 over the same ranges: its m6 is bin 18 here."""
    rand_augment_magnitude_std: float = 0.0
    """RandAugment: standard deviation of a normal noise on each operation's strength, in bins, before rounding
    and clipping to 0..30 (timm's mstd, x 3: its mstd0.5 is 1.5 here); 0: every operation at exactly
    rand_augment_magnitude."""
    rand_augment_prob: float = 1.0
    """RandAugment: probability that each drawn operation is applied (timm's RandAugment: 0.5; torchvision's
    and the paper's: 1); a skipped one leaves the image as it is."""
    repeated_augmentation: int = 1
    """Repeated augmentation (Hoffer et al. 2020; torchvision's RASampler, timm's --aug-repeats): each training
    epoch shows 1/N of the images N times each, with different crops and augmentations, in N consecutive
    micro-batches (so on different ranks when there are N or more); epochs keep their length. 1: off.
    torchvision's ResNet-50 V2 recipe uses 4."""
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
        require(bool(self.root), "root", self.root, "must name a folder")
        require(self.dataset != "digits" or "://" not in self.root, "root", self.root,
                 "is a URL, but data.dataset='digits' renders the digits into a local folder there; for a data set "
                 "at a URL set data.dataset='folder'")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(self.cache_limit_gb is None or self.cache_limit_gb > 0, "cache_limit_gb", self.cache_limit_gb,
                 "must be > 0 (or null: no limit)")
        require(self.shuffle_block_shards >= 1, "shuffle_block_shards", self.shuffle_block_shards, "must be >= 1")
        require(self.fetch_threads >= 1, "fetch_threads", self.fetch_threads, "must be >= 1")
        require(self.dali_threads >= 1, "dali_threads", self.dali_threads, "must be >= 1")
        require(self.loader_workers >= 0, "loader_workers", self.loader_workers, "must be >= 0")
        require(self.reader_threads >= 0, "reader_threads", self.reader_threads, "must be >= 0")
        require(self.reader_lookahead >= 1, "reader_lookahead", self.reader_lookahead, "must be >= 1")
        require(0 <= self.dali_hw_decoder_load <= 1, "dali_hw_decoder_load", self.dali_hw_decoder_load,
                 "must be in [0, 1]")
        require(self.dali_prefetch_depth >= 1, "dali_prefetch_depth", self.dali_prefetch_depth, "must be >= 1")
        require(self.dali_memory_padding_mb is None or self.dali_memory_padding_mb >= 0, "dali_memory_padding_mb",
                 self.dali_memory_padding_mb, "must be >= 0 (or null: DALI's defaults)")
        require(self.image_size >= 8, "image_size", self.image_size, "must be >= 8")
        require(self.val_image_size is None or self.val_image_size >= 8, "val_image_size", self.val_image_size,
                 "must be >= 8")
        require(self.rand_augment_ops >= 1, "rand_augment_ops", self.rand_augment_ops, "must be >= 1")
        require(0 <= self.rand_augment_magnitude <= 30, "rand_augment_magnitude", self.rand_augment_magnitude,
                 "must be a bin of 0..30")
        require(self.repeated_augmentation >= 1, "repeated_augmentation", self.repeated_augmentation,
                 "must be >= 1 (1: off)")
        require(self.rand_augment_magnitude_std >= 0, "rand_augment_magnitude_std", self.rand_augment_magnitude_std,
                 "must be >= 0")
        require(0 <= self.rand_augment_prob <= 1, "rand_augment_prob", self.rand_augment_prob, "must be in [0, 1]")
        require(0 <= self.random_erasing_prob <= 1, "random_erasing_prob", self.random_erasing_prob,
                 "must be in [0, 1]")
        require(self.mixup_alpha >= 0, "mixup_alpha", self.mixup_alpha, "must be >= 0 (0: off)")
        require(self.cutmix_alpha >= 0, "cutmix_alpha", self.cutmix_alpha, "must be >= 0 (0: off)")
        require(0 <= self.mix_prob <= 1, "mix_prob", self.mix_prob, "must be in [0, 1]")
        require(0 <= self.mix_switch_prob <= 1, "mix_switch_prob", self.mix_switch_prob, "must be in [0, 1]")
        require(self.progressive_multiple >= 1, "progressive_multiple", self.progressive_multiple, "must be >= 1")
        if self.progressive_start_size is not None:
            require(8 <= self.progressive_start_size, "progressive_start_size", self.progressive_start_size,
                     "must be >= 8")
            require(0 <= self.progressive_start_epoch < self.progressive_end_epoch, "progressive_end_epoch",
                     self.progressive_end_epoch,
                     f"must be after progressive_start_epoch={self.progressive_start_epoch} (>= 0)")
        require(0 < self.min_crop_area <= 1, "min_crop_area", self.min_crop_area, "must be in (0, 1]")
        require(0 < self.val_crop_ratio <= 1, "val_crop_ratio", self.val_crop_ratio, "must be in (0, 1]")
        require(self.synthetic_images >= 1, "synthetic_images", self.synthetic_images, "must be >= 1")
        require(self.synthetic_classes >= 2, "synthetic_classes", self.synthetic_classes, "must be >= 2")

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
