"""The model registry: :func:`register_model` by decorator, :func:`create_model` by name (as timm's)."""

from __future__ import annotations

import difflib
import inspect
import json
from typing import Any, Callable, TypeVar

from torch import nn

from torchslim.errors import ConfigError

_Factory = TypeVar("_Factory", bound=Callable[..., nn.Module])
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[_Factory], _Factory]:
    """Decorator registering a factory (function or ``nn.Module`` class) under ``name``.

    Raises:
        ConfigError: ``name`` is already registered.
    """

    def decorator(factory: _Factory) -> _Factory:
        if name in _REGISTRY:
            raise ConfigError(f"a model named {name!r} is already registered ({_REGISTRY[name]!r}); pick another name")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` and record ``model.arch = {"name": name, "kwargs": ...}``.

    ``arch["kwargs"]`` holds every argument of the factory, defaults included, with tuples as lists.

    Raises:
        ConfigError: an unknown name (the message suggests close matches), an argument the factory
            does not take, or an argument that is not JSON-able.
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise ConfigError(f"unknown model {name!r}; {hint}registered models: {', '.join(list_models())}")
    factory = _REGISTRY[name]
    signature = inspect.signature(factory)
    try:
        bound = signature.bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {name!r} takes {_describe(signature)}; got {sorted(kwargs)} ({exc})") from exc
    bound.apply_defaults()
    arch = {"name": name, "kwargs": _jsonable(name, dict(bound.arguments))}
    model = factory(**bound.arguments)
    model.arch = arch
    return model


def _describe(signature: inspect.Signature) -> str:
    params = signature.parameters.values()
    return ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params) or "no arguments"


def _jsonable(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with tuples turned into lists, checked to survive a JSON round trip."""
    try:
        return json.loads(json.dumps(kwargs))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"arguments of model {name!r} must be JSON-able (numbers, strings, lists, dicts) so that "
            f"model.arch can rebuild it: {exc}"
        ) from exc
