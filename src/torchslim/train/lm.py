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
from tqdm.auto import tqdm

from torchslim.data import bptt_batches
from torchslim.errors import ConfigError
from torchslim.regularize.force import ForceRegularizer
from torchslim.regularize.lasso import GroupLasso
from torchslim.regularize.masking import ZeroMask
from torchslim.train.distill import Teacher
from torchslim.train.engine import optimizer_step

__all__ = ["evaluate_lm", "evaluate_lm_loss", "train_lm_epoch"]


def _detach(state):
    """The state with its history cut: a tensor, an ``(h, c)`` tuple, or a list of them (one per layer)."""
    if isinstance(state, (tuple, list)):
        return type(state)(_detach(s) for s in state)
    return state.detach()


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
    force: ForceRegularizer | None = None,
    desc: str = "train",
    progress: bool | None = False,
    teacher: Teacher | None = None,
) -> tuple[float, float]:
    """One pass over ``data (T, B)``; returns ``(mean cross-entropy per token in nats, next-word accuracy)``.

    Each chunk is :func:`torchslim.train.engine.optimizer_step` at rate ``lr(i)`` for chunk ``i``, on the
    cross-entropy or, with a ``teacher`` (its own state carried), on :func:`torchslim.train.distill.distill_loss`.
    ``progress``: a bar on stderr (``None``: on a terminal only).
    """
    if data.dim() != 2 or data.shape[0] < 2:
        raise ConfigError(f"data must be (T, B) token columns with T >= 2, got shape {tuple(data.shape)}")
    model.train()
    state, teacher_state, total, correct, tokens = None, None, 0.0, 0, 0
    chunks = math.ceil((len(data) - 1) / bptt)
    bar = tqdm(bptt_batches(data, bptt), total=chunks, desc=desc, leave=False, unit="chunk",
               disable=None if progress is None else not progress)
    for i, (x, y) in enumerate(bar):
        rate = lr(i)
        for group in optimizer.param_groups:
            group["lr"] = rate
        logits, state = model.step(x, state)  # (t, B, V)
        state = _detach(state)
        loss = objective = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        if teacher is not None:
            with torch.no_grad():
                soft, teacher_state = teacher.model.step(x, teacher_state)  # (t, B, V)
            objective = teacher.loss(logits.flatten(0, 1), soft.flatten(0, 1), y.flatten(), hard=loss)
        optimizer_step(model, optimizer, objective, rate=rate, grad_clip=grad_clip, lasso=lasso, mask=mask,
                       force=force)
        total += float(loss.detach()) * y.numel()
        correct += int((logits.detach().argmax(-1) == y).sum())
        tokens += y.numel()
        if i % 50 == 0:
            bar.set_postfix(ppl=f"{math.exp(total / tokens):.1f}")
    return total / tokens, correct / tokens


@torch.no_grad()
def evaluate_lm_loss(model: nn.Module, data: Tensor, bptt: int = 35) -> tuple[float, float]:
    """``(mean cross-entropy per token, next-word accuracy)`` on ``data (T, B)``, the state carried
    across chunks; eval mode, the training flag restored."""
    was_training = model.training
    model.eval()
    state, total, correct, tokens = None, 0.0, 0, 0
    try:
        for x, y in bptt_batches(data, bptt):
            logits, state = model.step(x, state)  # (t, B, V)
            total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            tokens += y.numel()
    finally:
        model.train(was_training)
    return total / tokens, correct / tokens


def evaluate_lm(model: nn.Module, data: Tensor, bptt: int = 35) -> float:
    """Perplexity ``exp(mean cross-entropy per token)`` of ``model`` on ``data (T, B)``, state carried."""
    return math.exp(evaluate_lm_loss(model, data, bptt)[0])
