"""Example inputs: one tensor or a sequence of them, and what a model does with them."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

Inputs = Tensor | Sequence[Tensor]


def as_tuple(inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Example inputs as the tuple a model is called with: ``model(*as_tuple(x))``."""
    return (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)


@torch.no_grad()
def outputs(model: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    """The tensors of ``model(*inputs)`` in eval mode, in pytree order; every module's training flag is restored
    (a submodule kept in eval inside a training model stays so)."""
    with eval_mode(model):
        return [t for t in tree_leaves(model(*inputs)) if isinstance(t, Tensor)]


def first_inputs(model: nn.Module, inputs: tuple[Tensor, ...], names: list[str]) -> dict[str, Tensor]:
    """The first input each module in ``names`` (module paths) receives while ``model`` runs on ``inputs``."""
    seen: dict[str, Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.setdefault(n, a[0].detach())) for n in names]
    try:
        outputs(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the duration, then every module's own training flag back."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag
