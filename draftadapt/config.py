"""YAML / dict -> frozen config dataclasses, 1:1, with unknown keys refused.

`load_section(cls, mapping)` builds one dataclass from a mapping: nested dataclass fields are
built from nested mappings, lists become tuples where the field is a tuple, and an unknown key
is a ValueError that lists the valid ones. Each component then receives only its own section.
Values are validated by the dataclasses themselves (their `__post_init__`), not here.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def load_section(cls: type[T], mapping: Mapping[str, Any] | None, where: str = "") -> T:
    """An instance of dataclass `cls` from `mapping` (None or {} = all defaults).

    where: the dotted path of this section, used in error messages (defaults to the class name).
    """
    where = where or cls.__name__
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where} must be a mapping of field: value, got {type(mapping).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints.get(name), value, f"{where}.{name}") for name, value in mapping.items()}
    return cls(**kwargs)


def load_yaml(cls: type[T], path: str | os.PathLike, section: str | None = None) -> T:
    """`load_section` on a YAML file, or on one top-level `section` of it."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if section is not None:
        if not isinstance(data, Mapping) or section not in data:
            have = sorted(data) if isinstance(data, Mapping) else []
            raise ValueError(f"{path} has no section {section!r}; it has {have}")
        data = data[section]
    return load_section(cls, data, where=section or cls.__name__)


def _convert(hint: Any, value: Any, where: str) -> Any:
    """Nested dataclass from a mapping; tuple from a list; anything else unchanged."""
    for option in _options(hint):
        if dataclasses.is_dataclass(option) and isinstance(value, Mapping):
            return load_section(option, value, where)
        if (option is tuple or typing.get_origin(option) is tuple) and isinstance(value, list):
            return tuple(value)
    return value


def _options(hint: Any) -> tuple:
    """The members of a `X | Y` / Optional hint, or the hint itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def apply_overrides(data: Mapping[str, Any], overrides: list[str]) -> dict:
    """A copy of nested `data` with `section.field=value` strings applied (values parsed as YAML).

    Unknown keys are not checked here: `load_section` refuses them with the list of valid ones.
    """
    import copy

    import yaml

    out = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r}: write it as section.field=value")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"override {item!r}: {part!r} is a value, not a section")
            node = nxt
        node[leaf] = _number_or_str(yaml.safe_load(raw))
    return out


def _number_or_str(value: Any) -> Any:
    """PyYAML reads `3e-4` (no dot) as a string; on a command line it means a float."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
