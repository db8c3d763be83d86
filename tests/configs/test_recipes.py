"""Every shipped recipe loads, passes the checks a launch would make, and builds its network (on the meta
device: no memory, no time); the ImageNet recipes hold the batch sizes and learning rates their comments
state."""

from __future__ import annotations

import pytest
import torch
import torchvision

from configs import CONFIG_DIR, load_config
from trainer.engine import check_distributed
from trainer.dist import DistContext
from trainer.models import build_model
from trainer.optim import peak_learning_rate

RECIPES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
IMAGENET_TRAIN_IMAGES = 1_281_167


def test_the_recipes_the_readme_lists_are_shipped() -> None:
    assert set(RECIPES) >= {
        "quickstart", "resnet18-imagenet-90ep-8gpu", "resnet50-imagenet-90ep-8gpu", "resnet50-imagenet-90ep-64gpu",
        "resnet50-imagenet-lars-32k-64gpu", "resnet50-imagenet-zero1-8gpu", "resnet101-imagenet-90ep-8gpu",
        "resnet152-imagenet-90ep-8gpu", "resnet50-synthetic-bench-1gpu",
        *(f"resnet50-imagenet-ffcv-{epochs}ep-8gpu" for epochs in (16, 24, 32, 40, 88)),
        "resnet50-imagenet-composer-mild-36ep-8gpu", "resnet50-imagenet-rsb-a3-100ep-8gpu",
        "resnet50-imagenet-tv2-600ep-8gpu"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_resolves_and_builds_its_network(recipe: str) -> None:
    cfg = load_config(recipe)
    workers = cfg.launch.num_workers
    device = torch.device("cuda", 0) if cfg.launch.gpus_per_worker else torch.device("cpu")
    check_distributed(cfg, DistContext(rank=0, local_rank=0, world_size=workers, device=device))
    with torch.device("meta"):
        network = build_model(cfg.model)
        reference = getattr(torchvision.models, cfg.model.name)(num_classes=cfg.model.num_classes)
    shapes = {name: tuple(t.shape) for name, t in network.state_dict().items()}
    if not cfg.model.small_input:  # the same tensors as torchvision's network, so weights move both ways
        assert shapes == {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    global_batch = cfg.data.batch_size * workers * cfg.optim.accumulation_steps
    if cfg.data.dataset == "folder":
        steps_per_epoch = IMAGENET_TRAIN_IMAGES // global_batch
        assert 0 < cfg.checkpoint.interval_steps < steps_per_epoch  # a lost node costs less than an epoch
        assert cfg.data.loader == "dali" and cfg.precision.dtype in ("auto", "bf16") and cfg.precision.channels_last
        assert cfg.launch.gpus_per_worker == 1


@pytest.mark.parametrize(("recipe", "global_batch", "peak_lr"), [
    ("resnet50-imagenet-90ep-8gpu", 2048, 0.8),
    ("resnet50-imagenet-90ep-64gpu", 8192, 3.2),
    ("resnet50-imagenet-lars-32k-64gpu", 32768, 10.8),
    ("resnet50-imagenet-zero1-8gpu", 2048, 0.8),
    ("resnet18-imagenet-90ep-8gpu", 2048, 0.8),
    ("resnet101-imagenet-90ep-8gpu", 2048, 0.8),
    ("resnet152-imagenet-90ep-8gpu", 1024, 0.4),
])
def test_imagenet_recipes_scale_as_their_comments_say(recipe: str, global_batch: int, peak_lr: float) -> None:
    cfg = load_config(recipe)
    assert cfg.data.batch_size * cfg.launch.num_workers == global_batch
    assert peak_learning_rate(cfg.optim, global_batch) == pytest.approx(peak_lr)
    assert cfg.schedule.epochs == 90 and cfg.schedule.warmup_epochs == 5 and cfg.schedule.decay == "cosine"
    assert cfg.optim.label_smoothing == 0.1


def test_each_recipe_registers_under_a_name_that_says_model_and_data_set() -> None:
    from launch.tracking.registry import model_name

    assert model_name(load_config("quickstart")) == "resnet18-digits"
    assert model_name(load_config("resnet50-imagenet-90ep-8gpu")) == "resnet50-imagenet"  # /data/imagenet
    assert model_name(load_config("resnet50-imagenet-90ep-64gpu")) == "resnet50-imagenet"  # s3://my-bucket/imagenet
    assert model_name(load_config("resnet152-imagenet-90ep-8gpu", ["tracking.model_name=r152"])) == "r152"


@pytest.mark.parametrize(("epochs", "ramp"), [(16, (11, 13)), (24, (17, 20)), (32, (23, 27)), (40, (29, 34)),
                                             (88, (65, 76))])
def test_the_ffcv_recipes_ramp_160_to_192_and_validate_at_256_with_flips(epochs: int, ramp: tuple[int, int]) -> None:
    cfg = load_config(f"resnet50-imagenet-ffcv-{epochs}ep-8gpu")
    assert cfg.data.batch_size * cfg.launch.num_workers == 4096  # FFCV's 512 per GPU, lr 1.7 as it is
    assert peak_learning_rate(cfg.optim, 4096) == pytest.approx(1.7) and cfg.schedule.warmup_epochs == 2
    sizes = [cfg.data.crop_size(train=True, epoch=epoch) for epoch in range(epochs)]
    assert sizes[:ramp[0] + 1] == [160] * (ramp[0] + 1) and sizes[ramp[1]:] == [192] * (epochs - ramp[1])
    assert cfg.schedule.epochs == epochs and cfg.schedule.decay == "linear"
    assert cfg.data.crop_size(train=False) == 256 and cfg.data.val_flip_average and cfg.model.blurpool


def test_the_composer_mild_recipe_grows_88_to_176_px_between_40_and_80_percent_and_keeps_an_ema() -> None:
    cfg = load_config("resnet50-imagenet-composer-mild-36ep-8gpu")
    sizes = [cfg.data.crop_size(train=True, epoch=epoch) for epoch in range(36)]
    assert sizes[:15] == [88] * 15 and sizes[29:] == [176] * 7  # 40% and 80% of 36 epochs
    assert sizes[15:29] == sorted(sizes[15:29]) and all(size % 4 == 0 for size in sizes)
    assert cfg.data.crop_size(train=False) == 224 and round(224 / cfg.data.val_crop_ratio) == 232
    assert cfg.optim.ema_decay ** 100 == pytest.approx(0.5, abs=0.01)  # half-life of 100 steps
    assert peak_learning_rate(cfg.optim, 2048) == pytest.approx(2.048) and cfg.optim.label_smoothing == 0.08
    assert cfg.model.blurpool and cfg.schedule.epochs == 36


def test_the_rsb_a3_recipe_is_timms_a3() -> None:
    cfg = load_config("resnet50-imagenet-rsb-a3-100ep-8gpu")
    assert cfg.data.crop_size(train=True, epoch=0) == 160 and cfg.data.crop_size(train=False) == 224
    assert cfg.data.val_crop_ratio == 0.95 and cfg.data.auto_augment == "rand"
    data = cfg.data
    assert (data.rand_augment_ops, data.rand_augment_magnitude, data.rand_augment_magnitude_std,
            data.rand_augment_prob) == (2, 18, 1.5, 0.5)  # rand-m6-mstd0.5 on timm's 0..10 scale
    assert (data.mixup_alpha, data.cutmix_alpha, data.random_erasing_prob, data.repeated_augmentation) == (
        0.1, 1.0, 0.0, 1)
    assert cfg.data.batch_size * cfg.launch.num_workers == 2048 and cfg.schedule.epochs == 100
    optim = cfg.optim
    assert (optim.name, optim.loss, optim.bce_target_threshold, optim.label_smoothing) == ("lamb", "bce", 0.2, 0.0)
    assert peak_learning_rate(optim, 2048) == 0.008 and optim.weight_decay == 0.02 and optim.ema_decay == 0
    assert cfg.model.drop_path_rate == 0.05 and optim.clip_grad_norm == 1.0


def test_the_torchvision_v2_recipe_is_torchvisions_command() -> None:
    cfg = load_config("resnet50-imagenet-tv2-600ep-8gpu")
    data, optim = cfg.data, cfg.optim
    assert data.batch_size * cfg.launch.num_workers == 1024 and peak_learning_rate(optim, 1024) == 0.5
    assert (data.crop_size(train=True, epoch=0), data.crop_size(train=False), round(224 / data.val_crop_ratio)) == (
        176, 224, 232)
    assert (data.auto_augment, data.random_erasing_prob, data.repeated_augmentation) == ("trivial", 0.1, 4)
    assert (data.mixup_alpha, data.cutmix_alpha, optim.label_smoothing, optim.weight_decay) == (0.2, 1.0, 0.1, 2e-5)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, optim.name) == (600, 5, "sgd")
    # The EMA's half-life in images matches torchvision's (decay 0.99998 adjusted, every 32 steps).
    assert optim.ema_decay ** 32 == pytest.approx(1 - (1 - 0.99998) * 1024 * 32 / 600, abs=1e-6)
