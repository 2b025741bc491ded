"""Attention modules after their heads were cut (placeholder)."""

from __future__ import annotations

from torch import nn


def sync_attention(model: nn.Module, before: dict[str, tuple[int, ...]]) -> None:
    """Make every attention module's head count agree with its cut projections; ``before``: shapes before the cut."""
