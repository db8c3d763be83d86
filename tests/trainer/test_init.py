"""model.init_from: a network starts from another's weights; a classifier of another size starts fresh."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from configs import RunConfig, load_config
from configs.errors import IncompatibleSettings
from configs.schema import ModelConfig
from launch.tracking.artifacts import load_initial_state
from trainer import run as train
from trainer.dist import single_process_context
from trainer.init import apply_initial_state
from trainer.models import build_model


def test_torchvision_imagenet_weights_load_with_a_fresh_head_for_another_number_of_classes(tmp_path: Path) -> None:
    imagenet = torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(imagenet, tmp_path / "resnet18.pth")
    state = load_initial_state(str(tmp_path / "resnet18.pth"))  # a torchvision weights file
    network = build_model(ModelConfig(name="resnet18", num_classes=10))
    fresh_head = network.fc.weight.detach().clone()
    done = apply_initial_state(network, state, source="resnet18.pth")
    assert "1000 classes, this network 10: fc re-initialised" in done
    assert torch.equal(network.layer4[1].conv2.weight, imagenet["layer4.1.conv2.weight"])
    assert torch.equal(network.fc.weight, fresh_head)
    # Same number of classes: the classifier comes along too.
    network = build_model(ModelConfig(name="resnet18", num_classes=1000))
    assert "classifier included" in apply_initial_state(network, state, source="x")
    assert torch.equal(network.fc.weight, imagenet["fc.weight"])
    # Another stem: refused, naming the tensor.
    with pytest.raises(IncompatibleSettings, match=r"model.init_from=x: .*other shapes: conv1.weight"):
        apply_initial_state(build_model(ModelConfig(name="resnet18", num_classes=10, small_input=True)), state,
                            source="x")


def test_fine_tuning_from_a_digits_checkpoint_beats_training_from_scratch_side_by_side(digits_root: Path,
                                                                                       tmp_path: Path) -> None:
    def config(name: str, *extra: str) -> RunConfig:
        return load_config("quickstart", [
            f"data.root={digits_root}", "data.dataset=folder", "data.image_size=8", "data.batch_size=64",
            "data.dali_threads=1", "data.loader_workers=0", "schedule.epochs=1", "schedule.warmup_epochs=0",
            f"checkpoint.url={tmp_path / name}", *extra])

    source = train(config("source", "schedule.epochs=3"), single_process_context(), [])
    scratch = train(config("scratch"), single_process_context(), [])
    tuned_cfg = config("tuned", f"model.init_from={tmp_path / 'source'}", "optim.lr=0.02")
    tuned = train(tuned_cfg, single_process_context(), [], initial_state=load_initial_state(str(tmp_path / "source")))
    # One epoch each: the fine-tuned run starts where the source left off; from scratch it is far behind.
    assert tuned.val["val_top1"] > scratch.val["val_top1"] + 0.2, (tuned.val, scratch.val)
    assert tuned.val["val_top1"] > source.val["val_top1"] - 0.05, (tuned.val, source.val)
    with pytest.raises(IncompatibleSettings, match="model.init_from"):
        train(tuned_cfg, single_process_context(), [])  # a launcher must load the weights it names
