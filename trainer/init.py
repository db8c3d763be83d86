"""Fine-tuning: a fresh network given another's weights (`model.init_from`) before training starts."""

from __future__ import annotations

import torch
from torch import nn

from configs.errors import IncompatibleSettings

CLASSIFIER = ("fc.weight", "fc.bias")
"""The final layer's parameters (torchvision's names), re-initialised when the number of classes differs."""


def apply_initial_state(network: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> str:
    """Load `state` into `network`, except a classifier of another shape, which keeps its fresh initialisation;
    return what was done, for the log. Any other missing, extra or differently shaped tensor is an error
    naming `source` and the tensors."""
    own = network.state_dict()
    source_classes = state["fc.weight"].shape[0] if "fc.weight" in state else None
    head_differs = any(key in state and state[key].shape != own[key].shape for key in CLASSIFIER)
    if head_differs:
        state = {key: value for key, value in state.items() if key not in CLASSIFIER}
    missing = sorted(set(own) - set(state) - (set(CLASSIFIER) if head_differs else set()))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(key for key in set(own) & set(state) if own[key].shape != state[key].shape)
    if missing or unexpected or shapes:
        problems = [f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                    for what, keys in (("missing", missing), ("unexpected", unexpected),
                                       ("other shapes", shapes)) if keys]
        raise IncompatibleSettings(f"model.init_from={source}: its weights do not fit this network ("
                                   + "; ".join(problems) + "): another architecture, small_input or blurpool?")
    network.load_state_dict(state, strict=not head_differs)
    if head_differs:
        return (f"initialised from {source}; its classifier has {source_classes} classes, this network "
                f"{own['fc.weight'].shape[0]}: fc re-initialised")
    return f"initialised from {source} (all weights, classifier included)"
