"""Knowledge distillation: the loss, and a student that learns the teacher's function, not only the labels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchslim.data import batchify
from torchslim.models import create_model
from torchslim.train.distill import Teacher, distill_loss
from torchslim.train.lm import train_lm_epoch
from torchslim.train.loop import Regularizers

pytestmark = pytest.mark.usefixtures("one_thread")


def test_loss_is_the_labels_cross_entropy_blended_with_the_softened_kl():
    gen = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    y = torch.randint(0, 5, (6,), generator=gen)
    ce = F.cross_entropy(z_s, y)
    assert distill_loss(z_s, z_t, y, alpha=0.0) == ce
    t = 2.0
    p_t = torch.softmax(z_t / t, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(z_s / t, -1))).sum(-1).mean()
    expected = 0.25 * ce + 0.75 * t * t * kl
    torch.testing.assert_close(distill_loss(z_s, z_t, y, alpha=0.75, temperature=t), expected)
    torch.testing.assert_close(distill_loss(z_s, z_t, y, alpha=0.75, temperature=t, hard=ce), expected)
    # a student that already matches the teacher pays the labels' share only
    torch.testing.assert_close(distill_loss(z_t, z_t, y, alpha=0.75, temperature=t), 0.25 * F.cross_entropy(z_t, y))


def test_no_gradient_reaches_the_teacher():
    teacher = Teacher(torch.nn.Linear(4, 3), alpha=0.5)
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    student = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    teacher.loss(student(x), teacher.model(x), y).backward()
    assert student.weight.grad is not None and teacher.model.weight.grad is None


def _kl_to(teacher, student, data, bptt=10) -> float:
    """Mean KL(teacher ‖ student) per token over ``data (T, B)``, each model's state carried."""
    teacher.eval(), student.eval()
    total, n, s_state, t_state = 0.0, 0, None, None
    with torch.no_grad():
        for i in range(0, len(data) - 1, bptt):
            x = data[i:i + bptt]
            z_s, s_state = student.step(x, s_state)
            z_t, t_state = teacher.step(x, t_state)
            total += float(F.kl_div(z_s.log_softmax(-1), z_t.log_softmax(-1), reduction="sum", log_target=True))
            n += x.numel()
    return total / n


def test_a_language_model_student_learns_the_teachers_distribution():
    """Trained on the same tokens, the distilled student is closer to the teacher than one fit to the labels."""
    gen = torch.Generator().manual_seed(0)
    data = batchify(torch.randint(0, 20, (3000,), generator=gen), 8)  # (375, 8): unpredictable words
    torch.manual_seed(1)
    teacher = create_model("wordlm", vocab_size=20, hidden_size=16, dropout=0.0)
    with torch.no_grad():
        teacher.decoder.bias.copy_(torch.linspace(-2, 2, 20))  # a skewed word distribution for the student to learn
    kl = {}
    for alpha in (0.0, 0.9):
        torch.manual_seed(2)
        student = create_model("wordlm", vocab_size=20, hidden_size=8, dropout=0.0)
        opt = torch.optim.SGD(student.parameters(), lr=2.0)
        teach = Teacher(teacher, alpha=alpha) if alpha else None
        train_lm_epoch(student, opt, data, bptt=10, lr=lambda i: 2.0,
                       regularizers=Regularizers(grad_clip=0.25, teacher=teach))  # the LM loop's default clip
        kl[alpha] = _kl_to(teacher, student, data)
    assert kl[0.9] < 0.5 * kl[0.0]
