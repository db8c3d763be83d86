"""model.*: which ResNet to build."""

from __future__ import annotations

from dataclasses import dataclass

from configs.schema.base import ModelName, require


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
    drop_path_rate: float = 0.0
    """Stochastic depth: the rate at which training skips the last residual block's branch per image, growing
    linearly from 0 at the first block (timm's drop_path_rate; "ResNet strikes back" uses 0.05). Evaluation
    and the exported model keep every branch; the state dict is unchanged. 0: off."""
    init_from: str | None = None
    """Fine-tuning: start from these weights instead of random ones (a fresh optimizer and schedule): a
    torchvision-layout state dict file or URL (e.g. torchvision's ImageNet weights), a run's checkpoints
    folder or step folder, or a registered model (models:/NAME/VERSION or @ALIAS). A classifier of another
    number of classes is re-initialised. A run that resumes from its own checkpoint ignores it."""

    def __post_init__(self) -> None:
        require(self.num_classes >= 2, "num_classes", self.num_classes, "must be >= 2")
        require(0 <= self.drop_path_rate < 1, "drop_path_rate", self.drop_path_rate, "must be in [0, 1)")
