"""A registry of the models the paper's experiments use, built only from ``torch.nn`` layers.

Each entry point states only what differs; :func:`create_model` records how a model was built in
``model.arch`` (``{"name": ..., "kwargs": {...}}``, JSON-able) so a checkpoint can rebuild it::

    model = create_model("resnet20", num_classes=10)
    twin = create_model(model.arch["name"], **model.arch["kwargs"])
"""

from __future__ import annotations

import difflib
import inspect
import json
from typing import Any, Callable, TypeVar

from torch import nn

from torchslim.errors import ConfigError
from torchslim.models.lenet import LeNet
from torchslim.models.mlp import MLP
from torchslim.models.resnet import BasicBlock, CifarResNet

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "LeNet",
    "MLP",
    "create_model",
    "list_models",
    "register_model",
]

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


@register_model("lenet")
def lenet(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> LeNet:
    """Caffe's LeNet (20-50-500), no ReLU after the convolutions."""
    return LeNet(num_classes, in_channels, input_size)


@register_model("mlp")
def mlp(
    num_classes: int = 10, in_channels: int = 1, input_size: int = 28, hidden: tuple[int, int] = (500, 300)
) -> MLP:
    """784-500-300-10 with ReLUs."""
    return MLP(num_classes, in_channels, input_size, tuple(hidden))


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 1) -> CifarResNet:
    """ResNet-20: three stages of three BasicBlocks (16/32/64 channels)."""
    return CifarResNet(20, num_classes, in_channels)


@register_model("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 1) -> CifarResNet:
    """ResNet-32: three stages of five BasicBlocks (16/32/64 channels)."""
    return CifarResNet(32, num_classes, in_channels)


from torchslim.models import fc as _fc  # noqa: E402,F401  registers "fcnet" (it needs register_model above)


@register_model("rowlstm")
def rowlstm(num_classes: int = 10, input_size: int = 28, hidden_size: int = 128, num_layers: int = 2,
            dropout: float = 0.0, per_layer: bool = False) -> nn.Module:
    """An LSTM over image rows (sequential Fashion-MNIST), for ISS (``per_layer``: one nn.LSTM per layer)."""
    from torchslim.models.rnn import RowLSTM

    return RowLSTM(num_classes, input_size, hidden_size, num_layers, dropout, per_layer)


@register_model("wordlm")
def wordlm(vocab_size: int = 10_002, hidden_size: int | list[int] = 200, num_layers: int = 2, dropout: float = 0.2,
           tie_weights: bool = True, per_layer: bool = False) -> nn.Module:
    """A PTB-style word LSTM language model, for ISS (``per_layer``: one nn.LSTM per layer)."""
    from torchslim.models.wordlm import WordLM

    return WordLM(vocab_size, hidden_size, num_layers, dropout, tie_weights, per_layer)
