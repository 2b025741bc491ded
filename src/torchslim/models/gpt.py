"""A small decoder-only transformer (GPT-2's layout, Radford et al. 2019) for word-level language modelling:
pre-norm blocks (:mod:`~torchslim.models.transformer`), learned positions, the LM head tied to the token table."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from torchslim.models.transformer import Block, per_layer


class GPT(nn.Module):
    """Token and position embeddings → blocks → LayerNorm → tied LM head.

    ``forward(tokens (T, B)) → logits (T, B, V)``: sequence first, like :class:`~torchslim.models.wordlm.WordLM`,
    so the word-LM training loop serves both; :meth:`step` keeps its interface (there is no state: each
    chunk of ``bptt`` tokens is its own context).

    Args:
        vocab_size: ``V``.
        width: the residual stream ``C``.
        n_layer: blocks.
        n_head: heads per block (one number, or one per block).
        head_dim: features per head ``D``.
        d_ff: MLP neurons per block (one number, or one per block).
        block_size: the longest context (learned positions).
        dropout: on embeddings, attention weights, block outputs.
    """

    def __init__(self, vocab_size: int = 10_002, width: int = 256, n_layer: int = 6, n_head: int | Sequence[int] = 8,
                 head_dim: int = 32, d_ff: int | Sequence[int] = 1024, block_size: int = 64,
                 dropout: float = 0.1) -> None:
        super().__init__()
        heads, ffs = per_layer(n_head, n_layer, "n_head"), per_layer(d_ff, n_layer, "d_ff")
        self.block_size = block_size
        self.wte, self.wpe = nn.Embedding(vocab_size, width), nn.Embedding(block_size, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, h, head_dim, f, dropout, causal=True) for h, f in zip(heads, ffs))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.apply(self._init)
        self.head.weight = self.wte.weight
        for block in self.blocks:  # GPT-2: residual writers scaled by 1/sqrt(2·layers)
            for w in (block.attn.proj.weight, block.out.weight):
                nn.init.normal_(w, std=0.02 / (2 * n_layer) ** 0.5)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens (T, B)`` (``T <= block_size``) → ``logits (T, B, V)``."""
        x = tokens.t()                                                    # (B, T)
        pos = torch.arange(x.shape[1], device=x.device)
        h = self.drop(self.wte(x) + self.wpe(pos))                       # (B, T, C)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h)).transpose(0, 1)                  # (T, B, V)

    def step(self, tokens: Tensor, state: None = None) -> tuple[Tensor, None]:
        """:meth:`forward` with the word-LM loop's interface: ``(logits (T, B, V), None)``."""
        return self(tokens), None

    @torch.no_grad()
    def generate(self, prompt: Tensor, new_tokens: int) -> Tensor:
        """Greedy continuation of ``prompt (T,)``: ``(T + new_tokens,)``, the context cut to ``block_size``."""
        out = prompt.clone()
        for _ in range(new_tokens):
            logits = self(out[-self.block_size:, None])                 # (t, 1, V)
            out = torch.cat([out, logits[-1, 0].argmax().view(1)])
        return out
