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
from torchslim.errors import ConfigError
from torchslim.train.loop import NO_CHECKPOINTS, Checkpointing, Regularizers, optimizer_step, set_lr
from torchslim.train.progress import progress_bar
from torchslim.train.world import SOLO, World

__all__ = ["LM_DEFAULT", "evaluate_lm", "evaluate_lm_loss", "train_lm_epoch"]

LM_DEFAULT = Regularizers(grad_clip=0.25)  # PyTorch's word_language_model example clips the gradient norm at 0.25


def _detach(state):
    """The state with its history cut: a tensor, an ``(h, c)`` tuple, a list of them (one per layer), or None
    (a model without state, e.g. a transformer whose context is the chunk)."""
    if state is None:
        return None
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
    regularizers: Regularizers = LM_DEFAULT,
    desc: str = "train",
    progress: bool | None = False,
    world: World = SOLO,
    checkpointing: Checkpointing = NO_CHECKPOINTS,
) -> tuple[float, float]:
    """One pass over ``data (T, B)``; returns ``(mean cross-entropy per token in nats, next-word accuracy)``.

    In a :class:`~torchslim.train.world.World` of N processes each trains ``model`` (its DDP wrapper, see
    :meth:`~torchslim.train.world.World.wrap`) on its B/N columns with its own hidden state; the returned means
    are over all columns. ``checkpointing``: as :func:`torchslim.train.loop.train_epoch`'s; the saved progress
    carries the hidden states of all columns, so a resumed epoch goes on with them.

    Each chunk is :func:`torchslim.train.loop.optimizer_step` at rate ``lr(i)`` for chunk ``i``, on the
    cross-entropy or, with ``regularizers.teacher`` (its own state carried), on
    :func:`torchslim.train.distill.distill_loss`. The default ``regularizers`` only clip the gradient norm at
    0.25; pass ``Regularizers(grad_clip=0.25, ...)`` to keep that clipping beside others.
    ``progress``: a bar on stderr (``None``: on a terminal, lines every ~30 s elsewhere).

    Raises:
        ConfigError: ``data`` is not ``(T, B)`` with ``T >= 2``.
    """
    if data.dim() != 2 or data.shape[0] < 2:
        raise ConfigError(f"data must be (T, B) token columns with T >= 2, got shape {tuple(data.shape)}")
    data = data[:, world.part(data.shape[1])]  # equal parts: World's batch check wants N to divide B
    model.train()
    teacher = regularizers.teacher
    start = checkpointing.resume
    state, teacher_state = world.take_columns(start.carry) if start.carry is not None else (None, None)
    total, correct, tokens = checkpointing.start(world)
    chunks = math.ceil((len(data) - 1) / bptt)
    bar = progress_bar(bptt_batches(data, bptt), total=chunks, desc=desc, unit="chunk", progress=progress)
    for i, (x, y) in enumerate(bar):
        if i < start.step:
            continue
        rate = lr(i)
        set_lr(optimizer, rate)
        logits, state = model.step(x, state)  # (t, B, V)
        state = _detach(state)
        loss = objective = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        if teacher is not None:
            with torch.no_grad():
                soft, teacher_state = teacher.model.step(x, teacher_state)  # (t, B, V)
            objective = teacher.loss(logits.flatten(0, 1), soft.flatten(0, 1), y.flatten(), hard=loss)
        optimizer_step(model, optimizer, objective, rate=rate, regularizers=regularizers)
        total += float(loss.detach()) * y.numel()
        correct += int((logits.detach().argmax(-1) == y).sum())
        tokens += y.numel()
        if i % 50 == 0 and tokens:
            bar.set_postfix(ppl=f"{math.exp(total / tokens):.1f}")
        checkpointing.after(i + 1, chunks, world, (total, correct, tokens),
                            carry=lambda: world.gather_columns((state, teacher_state)))
    total, correct, tokens = world.sum([total, correct, tokens])
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
