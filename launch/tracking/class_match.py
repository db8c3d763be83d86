"""Which of a model's outputs each class of an evaluation data set is: matched by name, never by position.

A model records its class names (checkpoints' `classes`, a registered version's classes.txt). An evaluation
set's classes are its folder names, sorted: a held-out set whose folders sort differently (a re-export, a
subset) is remapped by name; one with names the model does not know is refused, naming them; one without
names (ImageNetV2's folders 0..999) needs a class map, a file giving each folder its class name. Each
evaluation reports the digest of the mapping it used, so that two scores can be told to rest on the same
labels.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from configs.errors import ConfigError, IncompatibleSettings
from data_pipeline import Loader


@dataclass(frozen=True, slots=True)
class ClassMatch:
    """Evaluation-set label i is model output `remap[i]`."""

    remap: tuple[int, ...]
    how: str
    """In words: the same classes, remapped by name, by the class map, or by position (a model without names)."""

    @property
    def digest(self) -> str:
        """16 hex digits of SHA-256 over the mapping (label -> output)."""
        return hashlib.sha256(json.dumps(self.remap).encode()).hexdigest()[:16]

    @property
    def identity(self) -> bool:
        return self.remap == tuple(range(len(self.remap)))


def read_class_map(path: str) -> dict[str, str]:
    """A class map file: a JSON object {"folder": "class name"}, or lines "folder class-name" (whitespace-
    separated; ImageNetV2's 0..999 against the wnids of ImageNet's val set, for example)."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"--class-map {path}: cannot read it ({error})") from error
    if text.lstrip().startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--class-map {path}: not valid JSON ({error})") from error
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
            raise ConfigError(f"--class-map {path}: must map folder names to class names (strings)")
        return dict(mapping)
    pairs = [line.split(maxsplit=1) for line in text.splitlines() if line.strip()]
    bad = [i + 1 for i, pair in enumerate(pairs) if len(pair) != 2]
    if bad:
        raise ConfigError(f"--class-map {path}: line {bad[0]} is not 'folder class-name'")
    return {folder: name.strip() for folder, name in pairs}


def match_classes(data_classes: Sequence[str], model_classes: Sequence[str] | None, *, outputs: int, data: str,
                  class_map: dict[str, str] | None = None) -> ClassMatch:
    """Match the classes of the data set at `data` to the model's `outputs` by name (`class_map` renames the
    folders it lists first). A model that records no names (older checkpoints) is matched by position when
    the counts agree."""
    if model_classes is None:
        if class_map is not None:
            raise IncompatibleSettings(f"the model records no class names, so --class-map cannot name its outputs "
                                       f"for {data}")
        if len(data_classes) != outputs:
            raise IncompatibleSettings(f"the data set at {data} has {len(data_classes)} classes, the model "
                                       f"{outputs} (and it records no class names to match them by)")
        return ClassMatch(tuple(range(len(data_classes))), "by position (the model records no class names)")
    names = [class_map.get(folder, folder) for folder in data_classes] if class_map else list(data_classes)
    output = {name: i for i, name in enumerate(model_classes)}
    unknown = [folder for folder, name in zip(data_classes, names, strict=True) if name not in output]
    if unknown:
        hint = ("; a data set of numbered folders needs --class-map FILE giving each folder its class name"
                if all(folder.isdigit() for folder in unknown) else "")
        raise IncompatibleSettings(
            f"the data set at {data} has {len(unknown)} classes the model does not know: "
            f"{', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''} (the model's "
            f"{len(model_classes)} classes are e.g. {', '.join(map(repr, model_classes[:3]))}){hint}")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise IncompatibleSettings(f"the data set at {data} gives two folders the class {twice[0]!r}: one output "
                                   "cannot be two labels")
    remap = tuple(output[name] for name in names)
    if class_map is not None and names != list(data_classes):
        how = f"by the class map ({sum(a != b for a, b in zip(names, data_classes, strict=True))} folders renamed)"
    elif remap == tuple(range(len(remap))):
        how = "the model's classes, in its order"
    else:
        how = f"by name ({len(remap)} of the model's {len(model_classes)} classes, in another order)"
    return ClassMatch(remap, how)


class RemappedLoader:
    """A loader whose labels are the model's outputs (`ClassMatch.remap`)."""

    def __init__(self, loader: Loader, match: ClassMatch) -> None:
        self.loader = loader
        self.remap = torch.tensor(match.remap, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.loader)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader.iter_epoch(epoch, start_batch):
            yield images, self.remap.to(labels.device)[labels]


__all__ = ["ClassMatch", "RemappedLoader", "match_classes", "read_class_map"]
