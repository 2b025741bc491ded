"""Rules for attention: heads (placeholder)."""

from __future__ import annotations

from typing import Any

from torchslim.structure.op import OpRule

RULES: dict[Any, OpRule] = {}
