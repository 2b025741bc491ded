"""Training and evaluating word-level language models with truncated BPTT (ISS's PTB experiment).

The data are ``(T, B)`` token columns from :func:`torchslim.data.batchify`; each chunk of ``bptt``
steps starts from the previous chunk's final state, detached (truncated backpropagation through
time, as PyTorch's word_language_model example and Zaremba et al. do). The model needs
``step(tokens, state) → (logits, state)`` (:class:`torchslim.models.wordlm.WordLM`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchslim.data import bptt_batches
from torchslim.engine import optimizer_step
from torchslim.errors import ConfigError
from torchslim.lasso import GroupLasso
from torchslim.masking import ZeroMask

__all__ = ["evaluate_lm", "train_lm_epoch"]


def _detach(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def train_lm_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Tensor,
    *,
    bptt: int = 35,
    lr: Callable[[int], float],
    grad_clip: float | None = 0.25,
    lasso: GroupLasso | None = None,
    mask: ZeroMask | None = None,
) -> float:
    """One pass over ``data (T, B)``; returns the mean cross-entropy per token (nats).

    Each chunk is :func:`torchslim.engine.optimizer_step` at rate ``lr(i)`` for chunk ``i``.
    """
    if data.dim() != 2 or data.shape[0] < 2:
        raise ConfigError(f"data must be (T, B) token columns with T >= 2, got shape {tuple(data.shape)}")
    model.train()
    state, total, tokens = None, 0.0, 0
    for i, (x, y) in enumerate(bptt_batches(data, bptt)):
        rate = lr(i)
        for group in optimizer.param_groups:
            group["lr"] = rate
        logits, state = model.step(x, state)
        state = _detach(state)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer_step(model, optimizer, loss, rate=rate, grad_clip=grad_clip, lasso=lasso, mask=mask)
        total += float(loss.detach()) * y.numel()
        tokens += y.numel()
    return total / tokens


@torch.no_grad()
def evaluate_lm(model: nn.Module, data: Tensor, bptt: int = 35) -> float:
    """Perplexity ``exp(mean cross-entropy per token)`` of ``model`` on ``data (T, B)``, state carried."""
    model.eval()
    state, total, tokens = None, 0.0, 0
    for x, y in bptt_batches(data, bptt):
        logits, state = model.step(x, state)
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        tokens += y.numel()
    return math.exp(total / tokens)
