"""Top-1/top-5 accuracy and loss over a whole validation set, each image counted once."""

from __future__ import annotations

import torch
from torch import nn

from data_pipeline import Loader
from trainer.dist import all_reduce_sum
from trainer.precision import Precision


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, precision: Precision, *, channels_last: bool,
             flip_average: bool = False) -> dict[str, float]:
    """Mean cross-entropy (without label smoothing), top-1 and top-5 accuracy over every image of every rank's
    `loader`: counts are summed over ranks, so each image counts once however the shards fall. With
    `flip_average`, the logits are the mean of the image's and its mirror image's (test-time augmentation)."""
    device = precision.device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    was_training = model.training
    model.eval()
    # Sums on the device; one host sync at the end.
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    for images, labels in loader.iter_epoch(0):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(images).float()
            if flip_average:
                mirrored = images.flip(3).contiguous(memory_format=memory_format)
                logits = (logits + model(mirrored).float()) / 2
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        totals += torch.stack([
            nn.functional.cross_entropy(logits, labels, reduction="sum"),
            hits[:, 0].sum(),
            hits.any(dim=1).sum(),
            torch.tensor(labels.numel(), device=device),
        ]).double()
    model.train(was_training)
    loss_sum, top1, top5_hits, count = all_reduce_sum(totals).tolist()
    if count == 0:
        raise ValueError("evaluated no images: the val split is empty")
    return {"val_loss": loss_sum / count, "val_top1": top1 / count, "val_top5": top5_hits / count,
            "val_images": count}
