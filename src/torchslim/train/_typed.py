"""Plain data → typed dataclasses for recipes: coercion by type hints, and errors that name the key."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Mapping, Sequence, Union

from torchslim.errors import ConfigError


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """An instance of dataclass ``cls`` from the mapping ``raw``; ``prefix`` names it in errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"'{prefix.rstrip('.') or 'recipe'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(
                f"unknown key '{prefix}{key}'{_suggest(str(key), names)}; valid keys: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except _FieldError as exc:
        raise _FieldError(f"{prefix}{exc.key}", exc.problem) from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (dataclass, Literal, union, list, dict, scalar)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if origin is Literal:
        if value is False and "off" in args:  # YAML 1.1 reads a bare `off` as false
            value = "off"
        if value not in args:
            raise ConfigError(
                f"'{key}' is {value!r}{_suggest(str(value), [str(a) for a in args])}; "
                f"valid options: {', '.join(map(str, args))}"
            )
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, args, key)
    if origin in (list, tuple, Sequence):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    return _coerce_scalar(value, tp, key)


def _coerce_union(value: Any, args: tuple[Any, ...], key: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"'{key}' must not be null")
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(" or ".join(errors))


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    raise ConfigError(f"'{key}': unsupported type {tp!r}")  # a bug in a spec class, not in the recipe


class _FieldError(ConfigError):
    """A bad value of one field; :func:`_build` prefixes the key with its section (``ssl.``)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"'{key}' {problem}")
        self.key, self.problem = key, problem


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_min(key: str, value: float, low: float) -> None:
    if not math.isfinite(value):  # as the API: a NaN λ would turn the Lasso off, an infinite one every weight
        raise _FieldError(key, f"must be a finite number >= {low}, got {value}")
    if value < low:
        raise _FieldError(key, f"must be >= {low}, got {value}")


def _check_positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise _FieldError(key, f"must be a finite number > 0, got {value}")


def _check_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value < high:
        raise _FieldError(key, f"must be in [{low}, {high}), got {value}")
