"""Modules a compact checkpoint does not describe (the user's own classes, a Hugging Face attention or
RMSNorm): their plain settings and the shapes of their own tensors.

Compaction may rewrite numbers in such classes (``num_heads``, ``split_size`` after a head cut, an RMSNorm's
``variance_epsilon`` after a width cut) and cut their tensors (an RMSNorm's weight); the skeleton a checkpoint
loads into is built fresh, with the dense values. Only numbers, booleans and strings the skeleton's module
already has, with the same type, are restored, and only tensors it already has, with as many dimensions,
take the file's shape: a file cannot add attributes or tensors or change their kind.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from torchslim.errors import CheckpointError

_PLAIN = (bool, int, float, str)


def plain_attrs(model: nn.Module, described: set[str]) -> dict[str, dict[str, Any]]:
    """``{module name: {attribute: value}}`` for every module not inside a ``described`` one."""
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if not _outside(name, described):
            continue
        values = {k: v for k, v in vars(module).items()
                  if not k.startswith("_") and k != "training" and type(v) in _PLAIN}
        if values:
            out[name] = values
    return out


def restore_attrs(skeleton: nn.Module, attrs: Any, path: str | os.PathLike) -> None:
    """Set each saved setting on the skeleton's module where it has that attribute with the same type."""
    if not isinstance(attrs, dict):
        raise CheckpointError(f"the module settings in '{path}' are not a JSON object; the file is damaged")
    modules = dict(skeleton.named_modules())
    for name, values in attrs.items():
        module = modules.get(name)
        if module is None or not isinstance(values, dict):
            continue  # a module the skeleton does not have: strict state loading reports what matters
        for key, value in values.items():
            old = vars(module).get(key)
            if type(value) in _PLAIN and type(old) is type(value):
                setattr(module, key, value)


def _outside(name: str, described: set[str]) -> bool:
    return not any(d == "" or name == d or name.startswith(f"{d}.") for d in described)


def resize_tensors(skeleton: nn.Module, state: dict[str, Tensor], described: set[str]) -> None:
    """Give each undescribed module's own parameters and buffers the shape they have in ``state`` (same rank)."""
    for name, module in skeleton.named_modules():
        if not _outside(name, described):
            continue
        for table in (module._parameters, module._buffers):
            for key, old in table.items():
                new = state.get(f"{name}.{key}" if name else key)
                if old is None or new is None or new.shape == old.shape or new.dim() != old.dim():
                    continue
                fresh = torch.empty(new.shape, dtype=old.dtype, device=old.device)
                table[key] = nn.Parameter(fresh, old.requires_grad) if isinstance(old, nn.Parameter) else fresh
