"""tracking.register_weights=average: the mean of the weights of a run's last K committed checkpoints (timm's
avg_checkpoints; the "checkpoint averaging" of Composer and of many published recipes), with each BatchNorm's
statistics estimated again on training data, since the average of K running statistics is not the
statistics of the averaged network (SWA's update_bn). The average is then evaluated, so that its version's
val_* tags are its own scores.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

from configs.errors import ConfigError
from configs.loader import config_from_dict
from launch.tracking.artifacts import Trained
from trainer.checkpoint import open_checkpoints
from trainer.models import build_model
from trainer.models.drop_path import DropPath
from trainer.precision import Precision
from trainer.serialize import from_bytes


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating tensors (summed in float64), the newest state's value of the rest
    (BatchNorm's num_batches_tracked)."""
    newest = states[-1]
    return {name: (torch.stack([state[name].double() for state in states]).mean(0).to(value.dtype)
                   if value.is_floating_point() else value.clone())
            for name, value in newest.items()}


@torch.no_grad()
def reestimate_batchnorm(network: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                         precision: Precision, *,
                         channels_last: bool) -> int:
    """Reset every BatchNorm's running statistics and set them to the plain mean over `batches` (training
    batches, with their augmentation) of each batch's statistics, in training mode with stochastic depth
    off; returns the images seen."""
    norms = [module for module in network.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches, not an exponential one
    was_training = network.training
    network.train()
    for module in network.modules():
        if isinstance(module, DropPath):
            module.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images_seen = 0
    for images, _ in batches:
        with precision.autocast():
            network(images.to(precision.device, non_blocking=True, memory_format=memory_format))
        images_seen += images.shape[0]
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    network.train(was_training)
    return images_seen


def averaged_trained(checkpoints_url: str, *, last: int, bn_batches: int, device: torch.device) -> Trained:
    """The mean of the weights of the last `last` committed steps under `checkpoints_url`, BatchNorm
    statistics re-estimated over `bn_batches` training batches and then scored on the val split, on
    `device`; the network comes back on the CPU. meta: the newest step's, with the average's own val_*
    and `averaged_steps`."""
    from data_pipeline import build_loaders
    from trainer.engine import prepare_model
    from trainer.evaluate import evaluate
    from trainer.precision import resolve_precision

    manager = open_checkpoints(checkpoints_url)
    steps = manager.committed()[-last:]
    if len(steps) < 2:
        raise ConfigError(f"tracking.register_weights='average' needs 2 or more committed checkpoints under "
                          f"{checkpoints_url}; there are {len(steps)}")
    newest = steps[-1]
    cfg = config_from_dict(newest.meta["config"], f"{manager.url(newest.step)}/manifest.json")
    network = build_model(cfg.model)
    network.load_state_dict(average_states([from_bytes(manager.read_verified(m, "model.pt")) for m in steps]))
    precision = resolve_precision(cfg.precision, device)
    loaders = build_loaders(cfg.data, seed=cfg.seed, device=device, dtype=precision.input_dtype)
    channels_last = cfg.precision.channels_last
    model = prepare_model(network, device, channels_last=channels_last)
    reestimate_batchnorm(model, itertools.islice(loaders.train.iter_epoch(0), bn_batches), precision,
                         channels_last=channels_last)
    scores = evaluate(model, loaders.val, precision, channels_last=channels_last,
                      flip_average=cfg.data.val_flip_average)
    meta = {**{k: v for k, v in newest.meta.items() if not k.startswith(("val_", "ema_val_"))}, **scores,
            "weights": "average", "averaged_steps": [m.step for m in steps]}
    return Trained(model.cpu().eval(), cfg, f"{checkpoints_url} (the mean of steps "
                   f"{', '.join(str(m.step) for m in steps)})", meta)


__all__ = ["average_states", "averaged_trained", "reestimate_batchnorm"]
