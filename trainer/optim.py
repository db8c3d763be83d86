"""The optimiser: SGD with momentum, LARS for very large batches, AdamW, or LAMB; weight decay only where it
regularises."""

from __future__ import annotations

import math

import torch
from torch import nn

from configs.schema import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Conv and linear weights decay; BatchNorm weights/biases and all biases (every 1-D tensor) do not.

    Decaying BN scales and biases hurts accuracy at large batch (Goyal et al. 2017 keep it, later
    recipes such as https://arxiv.org/abs/1807.11205 and NVIDIA's drop it).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update of each weight tensor is scaled by a layer-wise trust ratio
    eta * ||w|| / (||g|| + weight_decay * ||w||) (You et al. 2017, https://arxiv.org/abs/1708.03888).

    Groups with weight_decay 0 (BatchNorm and bias parameters) take plain SGD steps, as in the MLPerf
    ResNet-50 LARS recipe. Momentum follows torch.optim.SGD's convention: buf = m * buf + d; w -= lr * buf.
    """

    def __init__(self, params: list[dict[str, object]], *, lr: float, momentum: float, nesterov: bool,
                 eta: float) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "eta": eta,
                                  "weight_decay": 0.0})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            weight_decay, momentum, eta = group["weight_decay"], group["momentum"], group["eta"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if weight_decay:
                    weight_norm, grad_norm = param.norm(), update.norm()
                    trust = eta * weight_norm / (grad_norm + weight_decay * weight_norm)
                    # A zero norm (fresh zero-init weights, or no gradient) means no information: ratio 1.
                    trust = torch.where((weight_norm > 0) & (grad_norm > 0), trust, torch.ones_like(trust))
                    update = (update + weight_decay * param) * trust
                if momentum:
                    buffer = self.state[param].setdefault("momentum_buffer", torch.zeros_like(param))
                    buffer.mul_(momentum).add_(update)
                    update = update + momentum * buffer if group["nesterov"] else buffer
                param.add_(update, alpha=-group["lr"])


class LAMB(torch.optim.Optimizer):
    """Adam's bias-corrected moments, then a layer-wise trust ratio (You et al. 2019,
    https://arxiv.org/abs/1904.00962), in the NVLAMB form of NVIDIA's apex FusedLAMB and timm's `Lamb`:
    update = m_hat / (sqrt(v_hat) + eps) + weight_decay * w, scaled by ||w|| / ||update||; w -= lr * update.

    As in timm (which "ResNet strikes back" trained with), groups with weight_decay 0 (BatchNorm and bias
    parameters) take the Adam update without the trust ratio. Unlike timm's, this class does not clip the
    global gradient norm itself: optim.clip_grad_norm does, after fp16 unscaling, for every optimiser. A step
    whose gradients are non-finite is skipped: the gradient scaler checks them (DDP, one process), or the
    DeepSpeed strategy sets `found_inf` for the step.
    """

    def __init__(self, params: list[dict[str, object]], *, lr: float, betas: tuple[float, float],
                 eps: float) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf):  # one host sync, only under DeepSpeed
            return
        for group in self.param_groups:
            (beta1, beta2), eps, weight_decay = group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(param),
                                 exp_avg_sq=torch.zeros_like(param))
                state["step"] += 1
                step = int(state["step"])
                state["exp_avg"].lerp_(param.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                denominator = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                update = (state["exp_avg"] / (1 - beta1**step)).div_(denominator)
                if weight_decay:
                    update.add_(param, alpha=weight_decay)
                    weight_norm, update_norm = param.norm(), update.norm()
                    # A zero norm (zero-initialised weights, no update) carries no scale: ratio 1.
                    trust = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm,
                                        torch.ones_like(weight_norm))
                    update.mul_(trust)
                param.add_(update, alpha=-group["lr"])


def build_optimizer(model: nn.Module, cfg: OptimConfig, peak_lr: float) -> torch.optim.Optimizer:
    """The configured optimiser over `model`'s parameters; the schedule sets the lr of every group each step,
    from `peak_lr`."""
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(groups, lr=peak_lr, momentum=cfg.momentum, nesterov=cfg.nesterov, eta=cfg.lars_eta)
    if cfg.name == "lamb":
        return LAMB(groups, lr=peak_lr, betas=cfg.adam_betas, eps=1e-6 if cfg.adam_eps is None else cfg.adam_eps)
    if cfg.name == "adamw":
        # Fused, like SGD below: one kernel, and it reads the scaler's found-inf flag on the device.
        return torch.optim.AdamW(groups, lr=peak_lr, betas=cfg.adam_betas,
                                 eps=1e-8 if cfg.adam_eps is None else cfg.adam_eps, fused=True)
    optimizer = torch.optim.SGD(
        groups, lr=peak_lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
        # One kernel for all parameters, and it reads the gradient scaler's found-inf flag on the device,
        # so skipping a non-finite step needs no host sync.
        fused=True,
    )
    zero_momentum_buffers(optimizer)
    return optimizer


def zero_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter of a momentum optimizer a zero momentum buffer now.

    Trap: when the very first step is skipped for non-finite gradients, fused SGD still creates its
    momentum buffers, uninitialised, and every later step turns NaN. Zero buffers from the start avoid
    that and change nothing else: 0.9 * 0 + g is exactly g, what a first step stores.
    """
    for group in optimizer.param_groups:
        if group.get("momentum", 0) > 0:
            for param in group["params"]:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)


def peak_learning_rate(cfg: OptimConfig, global_batch_size: int) -> float:
    """The configured lr, scaled by global_batch_size / 256 when the linear scaling rule is on."""
    return cfg.lr * global_batch_size / 256 if cfg.scale_lr else cfg.lr
