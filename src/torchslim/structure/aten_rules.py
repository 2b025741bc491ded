"""Rules for aten operations, as ``torch.export`` captures them (placeholder: filled in by the export capture)."""

from __future__ import annotations

from typing import Any, Callable

from torchslim.structure.op import OpRule


def aten_rule(target: Any, get: Callable[[Any], OpRule | None]) -> OpRule | None:
    """The rule for an aten overload ``target``; ``get(key)`` reads the table (user registrations first)."""
    return get(target)
