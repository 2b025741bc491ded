"""Tiny fx-traceable models with normalization over channels, for the norm rules and their compaction.

``GPT``: a pre-norm decoder (nanoGPT's layout) with token and learned position embeddings and an LM head
tied to the token table; its attention is one head (q, k, v, softmax(q·kᵀ/√d)·v), since heads are not
what these tests are about. ``ViT``: the same blocks over patches, with a class token concatenated and
a position-embedding parameter added (timm's ``_pos_embed``). ``ConvNeXt``: a patchify stem, blocks of a
depthwise conv, a LayerNorm over the channels and a pointwise MLP on a residual.
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, width: int, context: int, bias: bool = True) -> None:
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Linear(width, width, bias=bias) for _ in range(4))
        self.register_buffer("mask", torch.tril(torch.ones(context, context)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)  # (B, T, C), T = context
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, T, T)
        att = att.masked_fill(self.mask == 0, float("-inf")).softmax(-1)
        return self.proj(att @ v)


class Block(nn.Module):
    def __init__(self, width: int, context: int, norm: type[nn.Module], bias: bool = True) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = norm(width), Attention(width, context, bias), norm(width)
        self.fc, self.out = nn.Linear(width, 4 * width, bias=bias), nn.Linear(4 * width, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int = 50, width: int = 32, context: int = 16, layers: int = 2,
                 norm: type[nn.Module] = nn.LayerNorm, bias: bool = True, tied: bool = True) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, context, norm, bias) for _ in range(layers))
        self.ln_f, self.head = norm(width), nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C) + (T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, V)


class ViT(nn.Module):
    """Patches ``(B, N, P)`` in (already flattened), a class token, a position-embedding parameter."""

    def __init__(self, patch: int = 12, patches: int = 8, width: int = 24, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(patch, width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, width))
        self.blocks = nn.ModuleList(Block(width, patches + 1, nn.LayerNorm) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)  # (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N + 1, C)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class ConvNeXtBlock(nn.Module):
    """Depthwise conv → LayerNorm over the channels (timm's ``LayerNorm2d``, or ``nn.LayerNorm`` channels-last)
    → pointwise MLP → residual."""

    def __init__(self, width: int, layer_norm_2d: bool) -> None:
        super().__init__()
        self.layer_norm_2d = layer_norm_2d
        self.dw = nn.Conv2d(width, width, 7, padding=3, groups=width)
        self.norm = timm.layers.LayerNorm2d(width) if layer_norm_2d else nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x)
        if self.layer_norm_2d:
            y = self.norm(y).permute(0, 2, 3, 1)  # (B, H, W, C)
        else:
            y = self.norm(y.permute(0, 2, 3, 1))
        return x + self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, width: int = 16, layer_norm_2d: bool = True) -> None:
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(3, width, 4, stride=4), timm.layers.LayerNorm2d(width)
        self.blocks = nn.Sequential(*(ConvNeXtBlock(width, layer_norm_2d) for _ in range(2)))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem_norm(self.stem(x)))
        return self.head(x.mean((2, 3)))


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """γ ~ U(0.5, 1.5) and β ~ N(0, 0.1) in every norm (as after training: β = 0 would hide a wrong cut)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if not type(m).__name__.endswith(("Norm", "Norm2d")):
            continue
        if isinstance(getattr(m, "weight", None), nn.Parameter):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        if isinstance(getattr(m, "bias", None), nn.Parameter):
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model
