"""Generic dataclass configs: defaults <- preset <- YAML file <- ``key.path=value`` overrides.

Every field is type-checked against its annotation and unknown keys are rejected, each error naming
the full field path (``method.td_lambda``) and what was expected; the finished config is then checked
against each field's rules (:func:`fastnabla.config.fields.validate_config`: choices, bounds, finite
numbers, and each section's cross-field ``check``). Values of overrides are parsed as YAML
scalars/lists (``train.iterations=300``, ``gmm.reward.center=[1,2]``). Torch-free.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fastnabla.config.fields import ConfigError, validate_config

T = TypeVar("T")

__all__ = ["ConfigError", "build_config", "describe", "load_yaml", "merge_into", "parse_override", "to_dict", "to_yaml"]


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check/convert ``value`` to the annotation ``tp``; raise :class:`ConfigError` naming ``path``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, path)
            except ConfigError as err:
                errors.append(str(err))
        for error in errors:
            if "finite number" in error:
                raise ConfigError(error)
        raise ConfigError(f"{path}: {value!r} matches none of {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return merge_into(tp(), value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)  # YAML 1.1 reads "1e-3" as a string
        if number is None:
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if origin in (list, tuple, Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    raise ConfigError(f"{path}: unsupported annotation {tp!r}")


def merge_into(obj: T, updates: Mapping[str, Any], path: str = "") -> T:
    """A copy of dataclass ``obj`` with ``updates`` (a nested mapping) applied and type-checked."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in updates.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; valid keys here: {sorted(names)}")
        tp = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = merge_into(current, value, full)
        elif isinstance(current, dict) and isinstance(value, Mapping):
            # dict-valued fields (e.g. a scheduler config) are merged key by key, not replaced
            changes[key] = _coerce(_deep_update(dict(current), value), tp, full)
        else:
            changes[key] = _coerce(value, tp, full)
    return dataclasses.replace(obj, **changes)


def parse_override(text: str) -> dict[str, Any]:
    """``"a.b.c=value"`` -> ``{"a": {"b": {"c": parsed}}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _deep_update(base: dict, new: Mapping) -> dict:
    """Merge ``new`` into ``base`` in place; values are copied, so later merges never write into ``new``
    (a preset is merged first and must come out of every ``build_config`` unchanged)."""
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return dict(data)


def build_config(
    cls: type[T],
    preset: Mapping[str, Any] | None = None,
    yaml_path: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Defaults of ``cls``, then ``preset``, the YAML file and the overrides, validated."""
    layers: dict[str, Any] = {}
    if preset:
        _deep_update(layers, preset)
    if yaml_path is not None:
        _deep_update(layers, load_yaml(yaml_path))
    for text in overrides:
        _deep_update(layers, parse_override(text))
    cfg = merge_into(cls(), layers)
    validate_config(cfg)
    return cfg


def to_dict(cfg: Any) -> Any:
    """Plain (YAML/JSON-serialisable) form of a config dataclass."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


class _ConfigDumper(yaml.SafeDumper):
    """Block style, except lists of scalars, which read better inline (``[2.0, 1.0]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, (list, tuple, dict)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ConfigDumper.add_representer(list, _represent_list)
_ConfigDumper.add_representer(tuple, _represent_list)


def to_yaml(cfg: Any) -> str:
    """The config as YAML that :func:`build_config` reads back."""
    return yaml.dump(to_dict(cfg), Dumper=_ConfigDumper, sort_keys=False)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(path, default, help)`` for every leaf field, for ``--help-config``."""
    rows = []
    obj = cls()
    for f in dataclasses.fields(obj):
        path = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(type(value), path + ".")
        else:
            rows.append((path, repr(to_dict(value)), f.metadata.get("help", "")))
    return rows
