"""What every config section uses: the error a bad value raises, and the names of choices owned here."""

from __future__ import annotations

import re
from typing import Any, Literal

RESERVED_ALIAS = re.compile(r"^(v\d+|latest)$", re.IGNORECASE)
"""MLflow model-version aliases it keeps for itself."""


class InvalidValue(ValueError):
    """A field holds a value of the right type that is not allowed; the loader names where it came from."""

    def __init__(self, key: str, value: Any, reason: str) -> None:
        super().__init__(f"{key}={value!r}: {reason}")
        self.key, self.value, self.reason = key, value, reason


def require(ok: bool, key: str, value: Any, reason: str) -> None:
    """Raise `InvalidValue` for `key` unless `ok`."""
    if not ok:
        raise InvalidValue(key, value, reason)


ModelName = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
"""torch.compile's modes."""
