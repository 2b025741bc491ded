"""Pre-norm transformer blocks (GPT-2, ViT): ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``.

Each block may have its own head count and MLP width (what SSL on heads and neurons leaves, trained
from scratch as a direct design). Every head has ``head_dim`` features, so attention splits its
projections with ``view(B, T, -1, head_dim)`` and works for any head count.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from torchslim.errors import ConfigError


def per_layer(value: int | Sequence[int], layers: int, what: str) -> list[int]:
    """``value`` for each of ``layers`` blocks: one number for all, or one per block."""
    values = [int(value)] * layers if isinstance(value, int) else [int(v) for v in value]
    if len(values) != layers or min(values) < 1:
        raise ConfigError(f"{what} must be a positive integer or one per layer ({layers}), got {value}")
    return values


class Attention(nn.Module):
    """Multi-head self-attention: ``(B, T, C) → (B, T, C)`` with ``n_head`` heads of ``head_dim``."""

    def __init__(self, width: int, n_head: int, head_dim: int, dropout: float, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        inner = n_head * head_dim
        self.head_dim = head_dim
        self.q, self.k, self.v = (nn.Linear(width, inner) for _ in range(3))
        self.proj = nn.Linear(inner, width)
        self.drop = nn.Dropout(dropout)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))  # (B, H, T, D)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=p)  # (B, H, T, D)
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, t, -1)))


class Block(nn.Module):
    """``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` with a GELU MLP of ``d_ff`` neurons."""

    def __init__(self, width: int, n_head: int, head_dim: int, d_ff: int, dropout: float, causal: bool = False) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, n_head, head_dim, dropout, causal)
        self.fc, self.out = nn.Linear(width, d_ff), nn.Linear(d_ff, width)
        self.act, self.drop = nn.GELU(), nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.drop(self.out(self.act(self.fc(self.ln2(x)))))
