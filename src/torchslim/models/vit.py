"""A small vision transformer (ViT, Dosovitskiy et al. 2021) for 28×28 images: patches, a class token, blocks."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from torchslim.errors import ConfigError
from torchslim.models.transformer import Block, per_layer


class ViT(nn.Module):
    """Patch embedding (a strided conv) → class token and learned positions → blocks → LayerNorm → head.

    Args:
        num_classes, in_channels, input_size: the images ``(N, in_channels, input_size, input_size)``.
        patch: patch side; ``input_size`` must be a multiple.
        width, n_layer, n_head, head_dim, d_ff, dropout: as :class:`~torchslim.models.gpt.GPT`'s blocks
            (``n_head`` and ``d_ff`` one number or one per block).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28, patch: int = 4,
                 width: int = 128, n_layer: int = 4, n_head: int | Sequence[int] = 4, head_dim: int = 32,
                 d_ff: int | Sequence[int] = 256, dropout: float = 0.0) -> None:
        super().__init__()
        if input_size % patch:
            raise ConfigError(f"input_size {input_size} must be a multiple of patch {patch}")
        heads, ffs = per_layer(n_head, n_layer, "n_head"), per_layer(d_ff, n_layer, "d_ff")
        tokens = (input_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, h, head_dim, f, dropout) for h, f in zip(heads, ffs))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x (N, C, H, W)`` → logits ``(N, num_classes)`` from the class token."""
        h = self.patch_embed(x).flatten(2).transpose(1, 2)                       # (N, tokens, width)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)[:, 0])
