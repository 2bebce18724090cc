"""Config loading: sections map 1:1 onto dataclasses, unknown keys are refused by name."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from draftadapt.cache import CacheConfig
from draftadapt.config import load_section, load_yaml
from draftadapt.trainer import TrainerConfig


@dataclass(frozen=True)
class Inner:
    size: int = 1  # a field
    shape: tuple[int, ...] = (1, 2)  # a tuple field YAML gives as a list


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None


def test_nested_sections_and_lists_become_dataclasses_and_tuples():
    cfg = load_section(Outer, {"name": "y", "inner": {"size": 3, "shape": [4, 5]}, "maybe": {"size": 7}})
    assert cfg == Outer("y", Inner(3, (4, 5)), Inner(7))
    assert load_section(Outer, None) == Outer()


def test_unknown_key_lists_the_valid_ones_with_its_path():
    with pytest.raises(ValueError, match=r"Outer\.inner: unknown keys \['sise'\]; valid keys: \['shape', 'size'\]"):
        load_section(Outer, {"inner": {"sise": 3}})
    with pytest.raises(ValueError, match="must be a mapping"):
        load_section(Outer, [1, 2])


def test_library_sections_validate_their_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  lr: 1.0e-3\n  betas: [0.8, 0.9]\ncache:\n  max_tokens: 4096\n")
    assert load_yaml(TrainerConfig, path, "trainer") == TrainerConfig(lr=1e-3, betas=(0.8, 0.9))
    assert load_yaml(CacheConfig, path, "cache").max_tokens == 4096
    with pytest.raises(ValueError, match="no section 'adapter'"):
        load_yaml(CacheConfig, path, "adapter")
    with pytest.raises(ValueError, match="max_tokens"):
        load_section(CacheConfig, {"max_tokens": -1})



@dataclass(frozen=True)
class _OvInner:
    lr: float = 1.0
    steps: int = 1


@dataclass(frozen=True)
class _OvOuter:
    inner: _OvInner = field(default_factory=_OvInner)


def test_overrides_reach_nested_fields_and_bad_ones_name_the_fix():
    from draftadapt.config import apply_overrides

    cfg = load_section(_OvOuter, apply_overrides({"inner": {"lr": 2.0}}, ["inner.steps=7", "inner.lr=3e-4"]))
    assert cfg == _OvOuter(_OvInner(lr=3e-4, steps=7))
    with pytest.raises(ValueError, match="section.field=value"):
        apply_overrides({}, ["inner.steps"])
    with pytest.raises(ValueError, match="valid keys"):
        load_section(_OvOuter, apply_overrides({}, ["inner.stepz=3"]))
