"""The training loop: momentum SGD steps with the regularizers of SSL, ISS, force and distillation.

:class:`Regularizers` carries what acts on a step besides the data loss (a group Lasso, a zero mask, a
force regularizer, a teacher, gradient clipping); :func:`optimizer_step` applies them in one fixed
order, and :func:`train_epoch` runs it over an epoch of image batches (:mod:`torchslim.train.lm` over
BPTT chunks). Nothing here knows about phases or run folders (:mod:`torchslim.train.phases`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchslim.data import batches
from torchslim.errors import ConfigError, DivergenceError
from torchslim.regularize.force import ForceRegularizer
from torchslim.regularize.lasso import L1, GroupLasso
from torchslim.regularize.masking import ZeroMask
from torchslim.train.distill import Teacher
from torchslim.train.progress import progress_bar
from torchslim.train.recipes import PhaseSpec
from torchslim.train.world import SOLO, World

__all__ = [
    "NO_CHECKPOINTS", "NO_REGULARIZERS", "Checkpointing", "EpochProgress", "Regularizers", "evaluate", "lr_at",
    "optimizer_step", "set_lr", "sgd", "train_epoch",
]


@dataclass(frozen=True)
class Regularizers:
    """What a training step applies besides the data loss; every field is optional, and none set is plain SGD.

    Attributes:
        lasso: the group Lasso (SSL, ISS, the rank Lasso) or element-wise :class:`L1`: its proximal step after
            ``optimizer.step()``, or its penalty ``λ·Σ_g ||w_g||`` added to the loss in subgradient mode.
        mask: keeps removed structures at zero (fine-tuning), weights and momentum, after each step.
        force: the force regularizer's gradient, added after clipping (Wen et al., ICCV 2017).
        teacher: a frozen model whose soft targets join the loss (:func:`torchslim.train.distill.distill_loss`).
        grad_clip: the global gradient norm is clipped to this before the update; None: no clipping.
    """

    lasso: GroupLasso | L1 | None = None
    mask: ZeroMask | None = None
    force: ForceRegularizer | None = None
    teacher: Teacher | None = None
    grad_clip: float | None = None


NO_REGULARIZERS = Regularizers()  # plain SGD: the default of the loops


@dataclass(frozen=True)
class EpochProgress:
    """Where an epoch stands after its first ``step`` steps: the sums of all processes that its means come from,
    and a word LM's hidden states ``carry`` into the next chunk (all batch columns). A checkpoint inside an epoch
    holds one; the resumed epoch starts from it."""

    step: int = 0
    loss_sum: float = 0.0  # Σ cross-entropy over the examples (tokens) seen
    correct: int = 0
    seen: int = 0
    carry: Any = None  # (model state, teacher state) of a word LM; None for images


@dataclass(frozen=True)
class Checkpointing:
    """Inside an epoch, call ``save(progress)`` after every ``every`` steps (not after the last: the epoch's end
    checkpoints); ``resume``: where a checkpointed epoch stood."""

    every: int | None = None
    save: Callable[[EpochProgress], None] | None = None
    resume: EpochProgress = EpochProgress()

    def start(self, world: World) -> tuple[float, int, int]:
        """The epoch's sums to start from: the resumed ones on rank 0 and zeros elsewhere, so the ranks' add up."""
        r = self.resume
        return (r.loss_sum, r.correct, r.seen) if world.is_main else (0.0, 0, 0)

    def after(self, step: int, steps: int, world: World, sums: tuple[float, int, int],
              carry: Callable[[], Any] | None = None) -> None:
        """Save the progress after ``step`` of ``steps`` if it is due: the ranks' ``sums`` added (every rank calls
        this, as it is a collective), ``carry()`` the state to carry on."""
        if self.every is None or self.save is None or step % self.every or step >= steps:
            return
        loss_sum, correct, seen = world.sum(sums)
        self.save(EpochProgress(step, loss_sum, int(correct), int(seen), carry() if carry is not None else None))


NO_CHECKPOINTS = Checkpointing()


def lr_at(spec: PhaseSpec, step: int, total_steps: int) -> float:
    """The learning rate at ``step`` (0-based) of ``total_steps`` under ``spec.lr_schedule``."""
    t = step / max(total_steps, 1)
    if spec.lr_schedule == "cosine":
        return spec.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if spec.lr_schedule == "step":
        return spec.lr * (0.1 if t >= 0.5 else 1.0) * (0.1 if t >= 0.75 else 1.0)
    return spec.lr


def sgd(model: nn.Module, spec: PhaseSpec) -> torch.optim.Optimizer:
    """The phase's optimizer (its rate is set every step): SGD with ``spec``'s momentum and L2 weight decay, or
    AdamW (betas 0.9, 0.95 as GPT-2-style training uses; decoupled decay, none on 1-d tensors: biases, norms)."""
    if spec.optimizer == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2]},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: Tensor,
    *,
    rate: float,
    regularizers: Regularizers = NO_REGULARIZERS,
) -> None:
    """One SSL update: ``loss (+ λ·Σ||w_g|| in subgradient mode) → backward → clip the global gradient
    norm to grad_clip (if set) → force.apply_() → optimizer.step() → lasso.step_(rate) → mask.apply_(optimizer)``.

    The force goes after clipping, as the authors add it to the data gradient just before the update.
    ``regularizers.teacher`` is not used here: it is already in ``loss``.

    Raises:
        DivergenceError: the objective, or the gradient norm when clipping, is NaN or infinite; nothing was
            updated (the weights may already be non-finite if the previous step made them so).
    """
    lasso, mask, force, clip = regularizers.lasso, regularizers.mask, regularizers.force, regularizers.grad_clip
    objective = loss + lasso.penalty() if lasso is not None and lasso.uses_penalty else loss
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    _check_finite("the training loss", objective.detach())  # after backward: the GPU is not kept waiting twice
    if clip is not None:  # a NaN gradient would make every weight NaN, clipped or not
        _check_finite("the gradient norm", torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    if force is not None:
        force.apply_()
    optimizer.step()
    if lasso is not None:
        lasso.step_(rate, optimizer)
    if mask is not None:
        mask.apply_(optimizer)


def _check_finite(what: str, value: Tensor) -> None:
    """Raise :class:`DivergenceError` if the 0-d ``value`` is NaN or infinite (one host sync, as ``float(loss)``)."""
    if not bool(torch.isfinite(value)):
        raise DivergenceError(f"{what} is {float(value)}: training diverged. Lower the learning rate, or clip "
                              "the gradient norm (Regularizers(grad_clip=...), a recipe's <phase>.grad_clip)")


def set_lr(optimizer: torch.optim.Optimizer, rate: float) -> None:
    """Set every parameter group's learning rate to ``rate``."""
    for group in optimizer.param_groups:
        group["lr"] = rate


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Iterable[tuple[Tensor, Tensor]],
    *,
    lr: Callable[[int], float],
    steps: int,
    regularizers: Regularizers = NO_REGULARIZERS,
    desc: str = "train",
    progress: bool | None = None,
    world: World = SOLO,
    checkpointing: Checkpointing = NO_CHECKPOINTS,
) -> tuple[float, float]:
    """One pass of momentum SGD over ``data`` (``x (B, ...)``, ``y (B,)``); returns ``(mean cross-entropy,
    accuracy)``.

    In a :class:`~torchslim.train.world.World` of N processes ``data`` holds the global batches, each process
    trains ``model`` (its DDP wrapper) on its part, and the returned means are over all processes' examples.
    ``checkpointing``: save the epoch's progress every few steps, or continue from a saved one (the batches it
    trained are drawn and skipped, so the rest come in the uninterrupted order).

    Each step is :func:`optimizer_step` at rate ``lr(i)`` for the epoch's step ``i``, on the
    cross-entropy or, with ``regularizers.teacher``, on :func:`torchslim.train.distill.distill_loss`.
    ``steps`` sizes the progress bar; ``progress``: see :func:`torchslim.train.progress.progress_bar`.

    Raises:
        ConfigError: ``data`` is empty.
        DivergenceError: a step's loss or gradient norm is NaN or infinite.
    """
    model.train()
    teacher = regularizers.teacher
    total_loss, correct, seen = checkpointing.start(world)
    bar = progress_bar(data, total=steps, desc=desc, unit="batch", progress=progress)
    for i, (x, y) in enumerate(bar):
        if i < checkpointing.resume.step:
            continue
        rate = lr(i)
        set_lr(optimizer, rate)
        weight = 1.0
        if world.distributed:
            part = world.part(len(y))
            weight = world.loss_weight(part.stop - part.start, len(y))
            x, y = x[part], y[part]
        logits = model(x)  # (B, classes)
        loss = objective = F.cross_entropy(logits, y) if len(y) else logits.sum() * 0.0
        if teacher is not None:
            with torch.no_grad():
                soft = teacher.model(x)  # (B, classes)
            objective = teacher.loss(logits, soft, y, hard=loss)
        if weight != 1.0:
            objective = objective * weight
        optimizer_step(model, optimizer, objective, rate=rate, regularizers=regularizers)
        total_loss += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        if i % 20 == 0 and seen:
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        checkpointing.after(i + 1, steps, world, (total_loss, correct, seen))
    total_loss, correct, seen = world.sum([total_loss, correct, seen])
    if seen == 0:
        raise ConfigError("the training set is empty; check data.train_limit")
    return total_loss / seen, correct / seen


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` on ``images (N, ...)``, ``labels (N,)`` in eval mode;
    its training flag is restored."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for x, y in batches(images, labels, batch_size, shuffle=False):
            logits = model(x)
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    n = max(len(labels), 1)
    return total_loss / n, correct / n
