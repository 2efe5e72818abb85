"""Config fields that carry their own help text and rules, and the one validator that enforces them.

Every config section is a dataclass whose fields are made with :func:`option`: a default, a help text (shown by
``--help-config``) and, where they apply, the allowed ``choices``, numeric bounds (``ge``, ``gt``, ``le``, ``lt``,
applied to each element of a list), and ``nonempty`` for lists. :func:`validate_config` walks a config tree and
raises a :class:`ConfigError` naming the field's full path (``method.beta: must be > 0, got -1.0``); it rejects
non-finite numbers (NaN, +-inf) everywhere. Rules that involve several fields live in a section's ``check(prefix)``
method, which :func:`validate_config` calls after the section's own fields.

This module imports nothing from torch or the rest of fastnabla: building and checking a config is fast
(``python -m fastnabla.train --help-config`` answers without importing torch).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

_UNSET: Any = dataclasses.MISSING


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the field."""


def option(
    default: Any = _UNSET,
    *,
    help: str,
    default_factory: Callable[[], Any] = _UNSET,
    choices: Sequence[Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    nonempty: bool = False,
    renamed: dict[Any, Any] | None = None,
) -> Any:
    """A dataclass field with help text and the rules :func:`validate_config` enforces.

    ``choices`` are appended to the help text; numeric bounds apply to a number, or to every number of a list.
    ``renamed`` maps old names of values to their current names: :func:`validate_config` replaces them (configs
    written before a rename, such as a run directory's ``config.yaml``, keep loading).
    """
    rules = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    text = help
    if choices is not None:
        choices = tuple(choices)
        text = f"{help}; one of {choices}" if help else f"one of {choices}"
    if renamed:
        text += "; " + ", ".join(f"{old!r} is read as {new!r}" for old, new in renamed.items())
    metadata = {"help": text, "choices": choices, "bounds": rules, "nonempty": nonempty, "renamed": renamed or {}}
    if default_factory is not _UNSET:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OK: dict[str, Callable[[float, float], bool]] = {
    "ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b,
}


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, numbers.Real):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    return []


def check_value(path: str, value: Any, metadata: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` if ``value`` breaks the rules in a field's ``metadata`` or is not finite."""
    for number in _numbers(value):
        if not math.isfinite(number):
            raise ConfigError(f"{path}: must be a finite number, got {number}")
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}: {value!r} is not one of {choices}")
    if metadata.get("nonempty") and isinstance(value, (list, tuple, str)) and not value:
        raise ConfigError(f"{path}: must not be empty")
    bounds = metadata.get("bounds") or {}
    rules = " and ".join(f"{_BOUND_TEXT[k]} {b:g}" for k, b in bounds.items())
    for number in _numbers(value):
        if not all(_BOUND_OK[k](number, b) for k, b in bounds.items()):
            each = " (each value)" if isinstance(value, (list, tuple)) else ""
            raise ConfigError(f"{path}: must be {rules}{each}, got {value!r}")


def validate_config(obj: Any, prefix: str = "") -> None:
    """Check every field of the dataclass tree ``obj`` against its rules, then each section's ``check``; values
    under an old name (``option(renamed=...)``) are replaced by the current one first.

    Raises:
        ConfigError: naming the first offending field's full path (``prefix.field``).
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = join(prefix, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate_config(value, path)
        else:
            renamed = f.metadata.get("renamed") or {}
            if isinstance(value, str) and value in renamed:
                value = renamed[value]
                setattr(obj, f.name, value)
            check_value(path, value, dict(f.metadata))
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check(prefix)
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from err


class Section:
    """Mixin of config sections: ``validate()`` checks the section on its own, naming fields under ``path``."""

    path: ClassVar[str] = ""

    def validate(self, prefix: str | None = None) -> None:
        validate_config(self, self.path if prefix is None else prefix)
