"""Normalization layers after their channels were cut (placeholder)."""

from __future__ import annotations

from torch import nn


def sync_norms(model: nn.Module, before: dict[str, tuple[int, ...]]) -> None:
    """Make every norm in ``model`` exact over its kept channels; ``before``: parameter shapes before the cut."""
