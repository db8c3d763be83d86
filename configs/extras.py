"""The heavy optional dependencies, each installed by an extra of the package and imported only where used."""

from __future__ import annotations

import importlib
from types import ModuleType

from configs.errors import MissingExtraError

DISTRIBUTION = "resnet-train"
"""This package's name on the package index, for the install hint."""
EXTRAS: dict[str, str] = {
    "nvidia.dali": "dali",
    "pynvml": "dali",  # nvidia-ml-py, also in the mlflow extra
    "deepspeed": "deepspeed",
    "ray": "ray",
    "mlflow": "mlflow",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
}
"""Top-level module of each optional dependency -> the extra that installs it."""


def modules_of(extra: str) -> list[str]:
    """The top-level modules `extra` installs (what to `require_extras` before work that needs all of it)."""
    return [module for module, owner in EXTRAS.items() if owner == extra]


def import_extra(module: str) -> ModuleType:
    """Import `module` (or one of its submodules) from an optional dependency, or say which extra to install."""
    extra = next((extra for top, extra in EXTRAS.items() if module == top or module.startswith(f"{top}.")), None)
    if extra is None:
        raise KeyError(f"{module!r} is not an optional dependency; known: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"{module} is not installed ({error}); install the extra {extra!r}: pip install '{DISTRIBUTION}[{extra}]'"
        ) from error


def require_extras(modules: list[str]) -> None:
    """Fail before any work if one of `modules` (optional dependencies) is not installed, naming its extra."""
    import importlib.util

    for module in modules:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            import_extra(module)  # raises MissingExtraError with the install command
