"""Tiny fx-traceable attention modules, one per way of writing heads, for the head rules and their compaction.

Every module maps ``(B, T, E)`` to ``(B, T, E)`` with ``H`` heads of ``D`` features. ``heads(m)`` gives its
query and key/value head counts and the rows of each projection a head owns, so tests can zero one part.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

E, H, D, T = 32, 4, 8, 6  # width, heads, head width, tokens (rotary tables are built for T)


class Separate(nn.Module):
    """q, k, v Linear; ``view(B, T, -1, D).transpose(1, 2)``; SDPA; transpose, reshape; output Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dim = D
        self.q, self.k, self.v = (nn.Linear(E, H * D) for _ in range(3))
        self.o = nn.Linear(H * D, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class Explicit(nn.Module):
    """softmax(q·kᵀ/√D)·v written out, the head count in ``self.n_head`` (rewritten by compaction)."""

    def __init__(self) -> None:
        super().__init__()
        self.n_head, self.head_dim = H, D
        self.q, self.k, self.v = (nn.Linear(E, H * D) for _ in range(3))
        self.o = nn.Linear(H * D, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, H, T, T)
        y = att.softmax(dim=-1) @ v                                          # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


class Masked(Explicit):
    """HF's eager attention: a causal mask computed from the input's length, ``(1, 1, T, T)``, added to the scores."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        mask = torch.full((t, t), float("-inf"), device=x.device).triu(1)[None, None]  # (1, 1, T, T)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim) + mask            # (B, H, T, T)
        y = torch.softmax(att, dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


class Fused(nn.Module):
    """timm's layout: one qkv Linear, ``reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)``, ``unbind(0)``."""

    def __init__(self, explicit: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim, self.explicit = H, D, H * D, explicit
        self.qkv = nn.Linear(E, 3 * H * D)
        self.proj = nn.Linear(H * D, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
        q, k, v = qkv.unbind(0)
        if self.explicit:
            y = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, self.attn_dim))


class Chunked(nn.Module):
    """One qkv Linear cut by ``chunk(3, -1)``, each third viewed into heads."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dim = D
        self.qkv, self.o = nn.Linear(E, 3 * H * D), nn.Linear(H * D, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (p.view(b, t, -1, self.head_dim).transpose(1, 2) for p in (q, k, v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


class SplitSize(nn.Module):
    """GPT-2's layout: ``c_attn(x).split(self.split_size, dim=2)``, a size compaction rewrites."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.split_size = H, D, H * D
        self.c_attn, self.c_proj = nn.Linear(E, 3 * H * D), nn.Linear(H * D, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(self.split_size, dim=2)
        q, k, v = (p.view(b, t, -1, self.head_dim).transpose(1, 2) for p in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, -1))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Grouped(nn.Module):
    """LLaMA's layout: ``H`` query heads read ``H_kv`` key/value heads (``repeat_kv`` or ``enable_gqa``),
    rotary embeddings on q and k (``rotate_half``), no biases."""

    def __init__(self, kv_heads: int = 2, enable_gqa: bool = False) -> None:
        super().__init__()
        self.head_dim, self.num_key_value_groups, self.enable_gqa = D, H // kv_heads, enable_gqa
        self.q_proj, self.o_proj = nn.Linear(E, H * D, bias=False), nn.Linear(H * D, E, bias=False)
        self.k_proj, self.v_proj = (nn.Linear(E, kv_heads * D, bias=False) for _ in range(2))
        freqs = torch.outer(torch.arange(T).float(), 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, D)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def repeat_kv(self, h: torch.Tensor) -> torch.Tensor:
        """HF's ``repeat_kv``: ``(B, H_kv, T, D) → (B, H_kv·g, T, D)`` by ``expand`` and ``reshape``."""
        b, n, t, d = h.shape
        g = self.num_key_value_groups
        return h[:, :, None, :, :].expand(b, n, g, t, d).reshape(b, n * g, t, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = self.cos[None, None], self.sin[None, None]  # (1, 1, T, D)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.enable_gqa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, self.repeat_kv(k), self.repeat_kv(v), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class BorrowedWidth(nn.Module):
    """nanoGPT's split: head width ``C // n_head`` with ``C`` the block's width, merged back to ``C``."""

    def __init__(self) -> None:
        super().__init__()
        self.n_head = H
        self.c_attn, self.c_proj = nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size(0), x.size(1), x.size(2)
        q, k, v = self.c_attn(x).chunk(3, dim=2)
        q, k, v = (p.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for p in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class QueryReadTwice(Separate):
    """q's projection also feeds another layer, after attention: zero q rows are read there."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Linear(H * D, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        query = self.q(x)
        q, k, v = (y.view(b, t, -1, self.head_dim).transpose(1, 2) for y in (query, self.k(x), self.v(x)))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, -1)) + self.side(query)


class Torch(nn.Module):
    """``nn.MultiheadAttention`` (packed q, k, v): compaction swaps it for a ``NarrowMultiheadAttention``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(E, E), nn.MultiheadAttention(E, H, batch_first=True), nn.Linear(E, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(self.attn(h, h, h, need_weights=False)[0])


BUILDERS = {
    "separate": Separate, "explicit": Explicit, "fused": Fused, "fused_explicit": lambda: Fused(explicit=True),
    "masked": Masked, "chunked": Chunked, "split_size": SplitSize, "repeat_kv": Grouped, "enable_gqa": lambda: Grouped(enable_gqa=True),
    "rotary": lambda: Grouped(kv_heads=H), "multihead_attention": Torch,
}


def parts(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """``{part: (weight, first row of part)}``: rows ``first + h·D + [0, D)`` are head ``h``'s (columns for "o")."""
    fused = {Fused: ("qkv", "proj"), Chunked: ("qkv", "o"), SplitSize: ("c_attn", "c_proj")}.get(type(model))
    if fused is not None:
        w, out = (getattr(model, name).weight for name in fused)
        return {"q": (w, 0), "k": (w, H * D), "v": (w, 2 * H * D), "o": (out, 0)}
    if isinstance(model, Torch):
        return {"q": (model.attn.in_proj_weight, 0), "k": (model.attn.in_proj_weight, H * D),
                "v": (model.attn.in_proj_weight, 2 * H * D), "o": (model.attn.out_proj.weight, 0)}
    if isinstance(model, Grouped):
        return {"q": (model.q_proj.weight, 0), "k": (model.k_proj.weight, 0), "v": (model.v_proj.weight, 0),
                "o": (model.o_proj.weight, 0)}
    return {"q": (model.q.weight, 0), "k": (model.k.weight, 0), "v": (model.v.weight, 0), "o": (model.o.weight, 0)}


@torch.no_grad()
def zero_head(model: nn.Module, head: int, which: str) -> None:
    """Zero head ``head``'s rows of parts ``which`` (letters of "qkvo"; "o": the output projection's columns).

    A key/value head of a grouped model is ``head``; its query heads and output columns are ``g`` times as many.
    """
    g = getattr(model, "num_key_value_groups", 1)
    for part in which:
        weight, first = parts(model)[part]
        rows = slice(first + head * D * (g if part in "qo" else 1), first + (head + 1) * D * (g if part in "qo" else 1))
        (weight[:, rows] if part == "o" else weight[rows]).zero_()
        bias = _bias(model, part)
        if bias is not None and part != "o":
            bias[rows].zero_()


def _bias(model: nn.Module, part: str) -> torch.Tensor | None:
    weight, _ = parts(model)[part]
    if isinstance(model, Torch) and part != "o":
        return model.attn.in_proj_bias
    owner = next(m for m in model.modules() if getattr(m, "weight", None) is weight)
    return owner.bias
