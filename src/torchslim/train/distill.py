"""Knowledge distillation from the dense model while the sparse or compact one trains.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015): the student fits the
teacher's softened output distribution beside the labels,

    L = (1 − α)·CE(z_s, y) + α·T²·KL(softmax(z_t / T) ‖ softmax(z_s / T)),

where the T² keeps the soft term's gradients on the scale of the hard one's as T changes. Here the
teacher is the dense model the run trained before the group Lasso, so fine-tuning a compacted model
is pulled toward the function it was cut from, not only toward the labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Teacher", "distill_loss"]


def distill_loss(logits: Tensor, teacher_logits: Tensor, target: Tensor, *, alpha: float,
                 temperature: float = 1.0, hard: Tensor | None = None) -> Tensor:
    """``(1 − α)·CE(z_s, y) + α·T²·KL(p_t^T ‖ p_s^T)``, averaged over the ``N`` rows.

    Args:
        logits: ``z_s (N, C)``, the student's.
        teacher_logits: ``z_t (N, C)``; no gradient flows into it.
        target: ``y (N,)`` class indices.
        alpha: ``α`` in [0, 1], the soft term's weight; 0 is plain cross-entropy.
        temperature: ``T > 0``, softens both distributions.
        hard: ``CE(z_s, y)`` if the caller already has it (a training loop that also reports it).
    """
    if hard is None:
        hard = F.cross_entropy(logits, target)
    if alpha == 0:
        return hard
    t = temperature
    soft = F.kl_div(F.log_softmax(logits / t, dim=-1), F.log_softmax(teacher_logits.detach() / t, dim=-1),
                    reduction="batchmean", log_target=True)
    return (1 - alpha) * hard + alpha * t * t * soft


@dataclass
class Teacher:
    """A frozen model in eval mode and the weights of :func:`distill_loss`.

    The training loops run ``teacher.model`` under ``torch.no_grad()`` on the student's batch (a language
    model with its own recurrent state, carried across chunks as the student's is).
    """

    model: nn.Module
    alpha: float
    temperature: float = 1.0

    def __post_init__(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def loss(self, logits: Tensor, teacher_logits: Tensor, target: Tensor, hard: Tensor | None = None) -> Tensor:
        """:func:`distill_loss` of ``logits (N, C)`` against ``teacher_logits (N, C)`` and ``target (N,)``;
        ``hard``: their cross-entropy, if already computed."""
        return distill_loss(logits, teacher_logits, target, alpha=self.alpha, temperature=self.temperature, hard=hard)
