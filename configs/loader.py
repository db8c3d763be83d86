"""YAML recipes plus dotted command-line overrides, checked against the schema before any work starts."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from configs.errors import ConfigError
from configs.schema import DEPRECATED_KEYS, InvalidValue, RunConfig, renamed_values

CONFIG_DIR = Path(__file__).resolve().parent
"""Where the shipped recipes live; `--config NAME` looks here when NAME is not a path."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key that appears twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path as given if it exists, else the shipped recipe `configs/<name>.yaml`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{path.stem}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config file {str(name_or_path)!r} not found (shipped recipes: {known})")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Build a `RunConfig` from the schema defaults, a YAML file and `key=value` overrides, in that order."""
    values: dict[str, tuple[Any, str]] = {}
    if path is not None:
        path = resolve_config_path(path)
        source = str(path)
        try:
            document = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
        except UnicodeDecodeError as error:
            raise ConfigError(f"{source}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{source}: not valid YAML: {error}") from None
        if document is not None and not isinstance(document, Mapping):
            raise ConfigError(f"{source}: the top level must be a mapping of sections, not {type(document).__name__}")
        values.update(_flatten(document or {}, source))
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"command line: override {override!r} must look like section.key=value")
        values[key.strip()] = (_parse_scalar(text), "command line")
    return _build(RunConfig, "", _renamed(values))


def config_from_dict(document: Mapping[str, Any], source: str) -> RunConfig:
    """Build a `RunConfig` from the schema defaults and `document` (what `config_to_dict` returns)."""
    return _build(RunConfig, "", _renamed(_flatten(document, source)))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-ready data (tuples become lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return {f.name: config_to_dict(v) if dataclasses.is_dataclass(v := getattr(cfg, f.name)) else plain(v)
            for f in dataclasses.fields(cfg)}


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML that `load_config` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _renamed(values: dict[str, tuple[Any, str]]) -> dict[str, tuple[Any, str]]:
    """`values` with each deprecated key replaced by what it stands for now, and a warning naming its source."""
    values = dict(values)
    for key in [key for key in values if key in DEPRECATED_KEYS]:
        value, source = values.pop(key)
        warnings.warn(f"{source}: {key} is deprecated: {DEPRECATED_KEYS[key]}", FutureWarning, stacklevel=3)
        for new, new_value in renamed_values(key, value).items():
            values.setdefault(new, (new_value, source))
    return values


def _parse_scalar(text: str) -> Any:
    """An override's value as YAML reads it (0.4, true, null, [30, 60]); anything else stays a string."""
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


def _flatten(document: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, tuple[Any, str]]:
    flat: dict[str, tuple[Any, str]] = {}
    for key, value in document.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, source, f"{dotted}."))
        else:
            flat[dotted] = (value, source)
    return flat


def _build(cls: type, prefix: str, values: dict[str, tuple[Any, str]]) -> Any:
    """Instantiate dataclass `cls` from the flat `values` under `prefix`, reporting every problem with its source."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in [key for key in values if key.startswith(prefix)]:
        head, _, rest = key[len(prefix):].partition(".")
        if head not in names:
            known = [f"{prefix}{name}" for name in names]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"
            raise ConfigError(f"{values[key][1]}: unknown key {key!r}{hint}")
        if rest and not dataclasses.is_dataclass(hints[head]):
            raise ConfigError(f"{values[key][1]}: unknown key {key!r} ({prefix}{head!s} is a value, not a section)")
    kwargs: dict[str, Any] = {}
    for name in names:
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hints[name]):
            if values.get(key, (None,))[0] is not None:  # an empty YAML section reads as None
                raise ConfigError(f"{values[key][1]}: {key!r} is a section; set its keys, e.g. {key}.<key>=...")
            kwargs[name] = _build(hints[name], f"{key}.", values)
        elif key in values:
            value, source = values[key]
            kwargs[name] = _coerce(value, hints[name], key, source)
    try:
        return cls(**kwargs)
    except InvalidValue as error:
        key = f"{prefix}{error.key}"
        source = values[key][1] if key in values else "default"
        value = list(error.value) if isinstance(error.value, tuple) else error.value  # as YAML writes it
        raise ConfigError(f"{source}: {key}={value!r} {error.reason}") from None


def _coerce(value: Any, kind: Any, key: str, source: str) -> Any:
    """`value` as type `kind`, or a ConfigError naming key, value and source."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) > 1:  # int | tuple[int, int]: a list is the tuple, anything else the other
            sequence = isinstance(value, (list, tuple))
            (kind,) = [a for a in kinds if (typing.get_origin(a) is tuple) == sequence]
        else:
            (kind,) = kinds
        return _coerce(value, kind, key, source)
    if origin is typing.Literal:
        # Type and value: 1 is not True, and "true" is not True.
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        choices = ", ".join(repr(a) for a in args)
        raise ConfigError(f"{source}: {key}={value!r} is not one of {choices}")
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        if Ellipsis not in args and len(items) != len(args):
            raise ConfigError(f"{source}: {key}={value!r} must be a list of {len(args)} values")
        return tuple(_coerce(item, args[0], key, source) for item in items)
    if kind is float and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: {key}={value!r} must be {kind.__name__}, not {type(value).__name__}")
