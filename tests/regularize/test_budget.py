"""SizeBudget alone (Zhu & Gupta's cubic k_t, hold, pause, cut) and as GroupLasso's budget=."""

import pytest
import torch
from torch import nn

from torchslim import ConfigError, GroupLasso, structures
from torchslim.regularize.budget import LayerBudget, SizeBudget
from torchslim.structure.groups import KINDS


def test_k_t_follows_the_cubic_on_a_hand_computed_ramp():
    # G = 10, k = 3, T = 8: k_t = 3 + floor(7·(1 − t/8)³), 7·(7/8)³ = 4.69, 7·(6/8)³ = 2.95, 7·(5/8)³ = 1.71, 7/8
    ramp = SizeBudget(0.3, ramp=8)
    layer = LayerBudget(keep=3, size=10)
    assert [ramp.groups_at(layer, t) for t in range(11)] == [10, 7, 5, 4, 3, 3, 3, 3, 3, 3, 3]
    # G = 100, k = 25, T = 4: 75·(3/4)³ = 31.6, 75·(1/2)³ = 9.4, 75·(1/4)³ = 1.2
    assert [SizeBudget(0.25, ramp=4).groups_at(LayerBudget(25, 100), t) for t in range(6)] == [100, 56, 34, 26, 25, 25]
    assert [SizeBudget(0.3).groups_at(layer, t) for t in (0, 5)] == [3, 3]  # no ramp: k from the first step


def test_keep_per_kind_and_the_layer_state():
    assert SizeBudget(0.5).keep == dict.fromkeys(KINDS, 0.5)
    budget = SizeBudget({"neuron": 0.3})
    assert budget.keep == {"neuron": 0.3} and budget and not SizeBudget()
    assert budget.layer("channel", torch.ones(10, dtype=torch.bool)) is None  # a kind without budget
    fresh = budget.layer("neuron", torch.ones(10, dtype=torch.bool))
    assert (fresh.keep, fresh.size, fresh.met) == (3, 10, False)
    assert budget.layer("neuron", torch.ones(3, dtype=torch.bool)).keep == 1  # floor(0.9) = 0: a layer keeps one
    resumed = budget.layer("neuron", torch.tensor([True, True, False, True] + [False] * 6))
    assert resumed.met and resumed.dead.tolist() == [False, False, True, False] + [True] * 6


def test_adjust_pauses_on_the_ramp_holds_at_k_and_cuts_each_step():
    norms = torch.arange(1.0, 11.0)  # group g has norm g + 1
    strong = torch.zeros(10)  # a shrink that would zero every group
    ramp = SizeBudget(0.3, ramp=8)
    layer = LayerBudget(3, 10)
    paused = ramp.adjust(layer, norms, strong, step=1)  # k_1 = 7: the 7 largest stay, unshrunk
    assert paused.tolist() == [0.0] * 3 + [1.0] * 7 and not layer.met
    held = ramp.adjust(layer, norms, strong, step=8)  # k reached: held from now on
    assert held.tolist() == [0.0] * 7 + [1.0] * 3 and layer.met
    assert ramp.adjust(layer, norms, torch.ones(10), step=9).tolist() == held.tolist()
    weak = torch.full((10,), 0.9)  # zeroes no group
    assert torch.equal(ramp.adjust(LayerBudget(3, 10), norms, weak, step=2), weak)  # cut="end": λ sets the pace
    cut = SizeBudget(0.3, ramp=8, cut="step").adjust(LayerBudget(3, 10), norms, weak, step=2)  # k_2 = 5
    assert cut.tolist() == pytest.approx([0.0] * 5 + [0.9] * 5)


@pytest.mark.parametrize("kwargs, message", [
    ({"keep": {"neuron": 0.0}}, "fractions in \\(0, 1\\]"),
    ({"keep": {"neurons": 0.5}}, "kinds in"),
    ({"keep": 0.5, "ramp": -1}, "keep_ramp .* >= 0 steps"),
    ({"ramp": 5}, "needs keep"),
    ({"keep": 0.5, "cut": "epoch"}, "must be 'end' or 'step'"),
    ({"cut": "step"}, "'step' needs keep"),
])
def test_bad_budget_is_a_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SizeBudget(**kwargs)


def _ranked_net():
    """Linear(4, 10) → ReLU → Linear(10, 1); hidden neuron k has norm ∝ k + 1 (as in test_lasso)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 10, bias=False), nn.ReLU(), nn.Linear(10, 1, bias=False))
    with torch.no_grad():
        for p, dim in ((net[0].weight, 1), (net[2].weight, 0)):
            p.div_(p.norm(dim=dim, keepdim=True)).mul_(0.1 * torch.arange(1.0, 11.0).view(-1, 1 if dim else 10))
    return net, structures(net, torch.randn(1, 4), kinds=("neuron",))


@pytest.mark.parametrize("lam, keep, ramp, cut", [(5.0, 0.3, 0, "end"), (5.0, 0.3, 8, "end"),
                                                   (0.05, {"neuron": 0.3}, 8, "step"), (0.5, 0.3, 0, "end")])
def test_group_lasso_with_budget_equals_the_keep_keywords(lam, keep, ramp, cut):
    weights = []
    for by_object in (False, True):
        net, groups = _ranked_net()
        keywords = {"keep": keep, "keep_ramp": ramp, "keep_cut": cut}
        lasso = GroupLasso(groups, lam, **({"budget": SizeBudget(keep, ramp, cut)} if by_object else keywords))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(12):
            opt.zero_grad()
            (-0.1 * (net[0].weight.sum() + net[2].weight.sum())).backward()
            opt.step()
            lasso.step_(0.1)
        cut_at_end = lasso.meet_budget_()
        weights.append((net[0].weight.detach().clone(), net[2].weight.detach().clone(), cut_at_end, lasso.steps))
    (a0, a2, a_cut, a_steps), (b0, b2, b_cut, b_steps) = weights
    assert torch.equal(a0, b0) and torch.equal(a2, b2) and a_cut == b_cut and a_steps == b_steps == 12
    assert int((a0.norm(dim=1) > 0).sum()) == 3


def test_budget_and_keep_keywords_together_or_without_prox_are_errors():
    net, groups = _ranked_net()
    with pytest.raises(ConfigError, match="either as budget="):
        GroupLasso(groups, 1.0, budget=SizeBudget(0.3), keep=0.3)
    with pytest.raises(ConfigError, match="mode='prox'"):
        GroupLasso(groups, 1.0, mode="subgradient", budget=SizeBudget(0.3))
    assert GroupLasso(groups, 1.0, mode="subgradient", budget=SizeBudget()).budget is None  # no kind: no budget
