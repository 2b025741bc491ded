"""Rules for normalization over channels: LayerNorm, RMSNorm, GroupNorm (placeholder)."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

from torch import nn

from torchslim.structure.op import OpRule

RULES: dict[Any, OpRule] = {}


def functional_norms(model: nn.Module) -> ContextManager[None]:
    """While capturing ``model``: norm modules written out in Python run as one functional op."""
    return contextlib.nullcontext()
