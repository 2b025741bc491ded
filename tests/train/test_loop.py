"""The training loop: Regularizers with nothing set is plain SGD; each field acts where optimizer_step says."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.data import batches, batchify
from torchslim.models import create_model
from torchslim.regularize.lasso import L1
from torchslim.train.lm import LM_DEFAULT, train_lm_epoch
from torchslim.train.loop import NO_REGULARIZERS, Regularizers, train_epoch

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen)  # (N, 6), (N,)


def _rate(i: int) -> float:
    return 0.5 / (1 + i)  # a schedule, so that the loop must set the rate on every step


def _sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9, weight_decay=1e-3)


def _by_hand(model: nn.Module, clip: float | None = None) -> nn.Module:
    """The same epoch written out: cross-entropy, backward, (clip), SGD step at ``_rate(i)``."""
    optimizer = _sgd(model)
    for i, (x, y) in enumerate(batches(*_data(), 8, shuffle=False)):
        for group in optimizer.param_groups:
            group["lr"] = _rate(i)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    return model


def _with_loop(model: nn.Module, regularizers: Regularizers | None) -> nn.Module:
    extra = {} if regularizers is None else {"regularizers": regularizers}
    train_epoch(model, _sgd(model), batches(*_data(), 8, shuffle=False), lr=_rate, steps=5, progress=False, **extra)
    return model


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("regularizers", [None, Regularizers(), NO_REGULARIZERS], ids=["default", "empty", "none"])
def test_nothing_set_trains_exactly_as_plain_sgd(regularizers):
    _assert_same_weights(_with_loop(_mlp(), regularizers), _by_hand(_mlp()))


def test_grad_clip_clips_the_global_norm_before_the_step():
    clipped = _with_loop(_mlp(), Regularizers(grad_clip=0.05))
    _assert_same_weights(clipped, _by_hand(_mlp(), clip=0.05))
    with pytest.raises(AssertionError):
        _assert_same_weights(clipped, _by_hand(_mlp()))  # 0.05 is below the gradients' norm: clipping acted


def test_a_lasso_acts_after_the_step_and_replace_turns_a_field_off():
    """An L1 with a large λ zeroes weights that plain SGD leaves non-zero; ``replace(..., lasso=None)`` is plain."""
    model = _mlp()
    regs = Regularizers(lasso=L1(model, 0.5))
    _with_loop(model, regs)
    assert sum(int((p == 0).sum()) for p in model.parameters()) > 20
    _assert_same_weights(_with_loop(_mlp(), dataclasses.replace(regs, lasso=None)), _by_hand(_mlp()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        regs.grad_clip = 1.0  # type: ignore[misc]


def test_the_lm_loop_clips_at_a_quarter_by_default():
    data = batchify(10 + torch.arange(600) % 10, 4)  # (150, 4): words 10..19 in a cycle
    trained = {}
    for name, extra in (("default", {}), ("explicit", {"regularizers": Regularizers(grad_clip=0.25)}),
                        ("unclipped", {"regularizers": Regularizers()})):
        torch.manual_seed(3)
        model = create_model("wordlm", vocab_size=20, hidden_size=8, dropout=0.0)
        with torch.no_grad():
            model.decoder.bias.copy_(torch.linspace(4, -4, 20))  # against words 10..19: gradient norms above 0.25
        train_lm_epoch(model, torch.optim.SGD(model.parameters(), lr=5.0), data, bptt=10, lr=lambda i: 5.0, **extra)
        trained[name] = model
    assert LM_DEFAULT == Regularizers(grad_clip=0.25)
    _assert_same_weights(trained["default"], trained["explicit"])
    with pytest.raises(AssertionError):
        _assert_same_weights(trained["default"], trained["unclipped"])
