import pytest
import torch
from nets import TinyLeNet, TinyResNet
from torch import nn

from torchslim import ConfigError, GroupLasso, structures


def _two_filter_conv():
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([3.0, 0.5]).view(2, 1, 1, 1))
    return conv


def _filters(conv):
    return structures(conv, torch.randn(1, 1, 2, 2), kinds=("filter",))


def test_penalty_is_lambda_times_sum_of_norms_with_square_root():
    net = TinyLeNet()
    groups = structures(net, torch.randn(1, 1, 28, 28), kinds=("filter",))
    lasso = GroupLasso(groups, 0.1)
    expected = 0.1 * sum(m.weight.flatten(1).norm(dim=1).sum() for m in (net.conv1, net.conv2, net.fc1, net.fc2))
    torch.testing.assert_close(lasso.penalty(), expected)


def test_strength_per_kind_multipliers_and_size_weighting():
    net = TinyLeNet()
    groups = structures(net, torch.randn(1, 1, 28, 28), kinds=("filter", "shape"))
    lasso = GroupLasso(groups, {"shape": 0.2}, multipliers={"conv1": 0.5}, weight_by_size=True)
    w1, w2 = net.conv1.weight, net.conv2.weight
    expected = (0.2 * 0.5 * 6 ** 0.5 * w1.flatten(1).norm(dim=0).sum()
                + 0.2 * 8 ** 0.5 * w2.flatten(1).norm(dim=0).sum())
    torch.testing.assert_close(lasso.penalty(), expected)


def test_prox_is_the_group_soft_threshold():
    conv = _two_filter_conv()
    GroupLasso(_filters(conv), 1.0).prox_(lr=1.0)
    # ||w|| = 3 -> scaled by 1 - 1/3; ||w|| = 0.5 < lr*lambda -> exactly zero
    torch.testing.assert_close(conv.weight.flatten(), torch.tensor([2.0, 0.0]))


def test_prox_reaches_exact_zeros_on_a_real_layer():
    net = TinyLeNet()
    groups = structures(net, torch.randn(1, 1, 28, 28), kinds=("channel", "shape"))
    lasso = GroupLasso(groups, 0.05)
    for _ in range(30):
        lasso.prox_(lr=1.0)
    assert lasso.zero_fraction() == {"channel": 1.0, "shape": 1.0}
    assert net.conv2.weight.abs().sum() == 0


def test_subgradient_mode_gradient_is_w_over_norm_and_zero_at_zero():
    conv = _two_filter_conv()
    with torch.no_grad():
        conv.weight[1] = 0
    lasso = GroupLasso(_filters(conv), 1.0, mode="subgradient")
    assert lasso.uses_penalty
    lasso.penalty().backward()
    torch.testing.assert_close(conv.weight.grad.flatten(), torch.tensor([1.0, 0.0]))


def test_subgradient_mode_step_zeroes_small_weights():
    conv = _two_filter_conv()
    with torch.no_grad():
        conv.weight[1] = 5e-5
    GroupLasso(_filters(conv), 1.0, mode="subgradient", threshold=1e-4).step_(lr=0.1)
    torch.testing.assert_close(conv.weight.flatten(), torch.tensor([3.0, 0.0]))


@pytest.mark.parametrize("bad", [dict(strength=-1.0), dict(strength={"filters": 1.0}),
                                 dict(strength=1.0, mode="adam")])
def test_bad_configuration_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        GroupLasso(_filters(_two_filter_conv()), **bad)


def test_layer_kind_multiplier_scales_one_kind_of_one_layer():
    net = TinyLeNet()
    groups = structures(net, torch.randn(1, 1, 28, 28), kinds=("filter", "shape"))
    lasso = GroupLasso(groups, 0.1, multipliers={"conv1": 0.0, "conv1:shape": 2.0})
    expected = 0.2 * net.conv1.weight.flatten(1).norm(dim=0).sum() + 0.1 * sum(
        m.weight.flatten(1).norm(dim=1).sum() + (m.weight.flatten(1).norm(dim=0).sum() if m is net.conv2 else 0)
        for m in (net.conv2, net.fc1, net.fc2))
    torch.testing.assert_close(lasso.penalty(), expected)


def test_a_multiplier_that_selects_nothing_is_an_error():
    groups = structures(TinyLeNet(), torch.randn(1, 1, 28, 28), kinds=("filter",))
    with pytest.raises(ConfigError, match="did you mean 'conv1'"):
        GroupLasso(groups, 0.1, multipliers={"convv1": 2.0})
    with pytest.raises(ConfigError, match="selects no group"):
        GroupLasso(groups, 0.1, multipliers={"conv1:shape": 2.0})


def test_include_exclude_and_multipliers_take_names_prefixes_and_globs():
    net = TinyLeNet()
    groups = structures(net, torch.randn(1, 1, 28, 28), kinds=("filter",))
    lasso = GroupLasso(groups, 0.1, include=["conv*", "fc2"], exclude=["*2"], multipliers={"c?nv*": 0.5})
    assert [b.family.label for b in lasso.blocks] == ["conv1"]
    torch.testing.assert_close(lasso.penalty(), 0.05 * net.conv1.weight.flatten(1).norm(dim=1).sum())
    with pytest.raises(ConfigError, match="include pattern 'cnv1'.*did you mean 'conv1'"):
        GroupLasso(groups, 0.1, include=["cnv1"])
    with pytest.raises(ConfigError, match="exclude pattern '\\*.bn'"):
        GroupLasso(groups, 0.1, exclude=["*.bn"])


def test_a_family_of_several_producers_is_chosen_by_its_first():
    groups = structures(TinyResNet(), torch.randn(2, 1, 16, 16), kinds=("channel",))
    labels = sorted({g.family.label for g in groups})
    assert "stem+2" in labels and "layer2.0.conv2+2" in labels  # the stem and the residual adds it feeds
    chosen = {b.family.label for b in GroupLasso(groups, 0.1, include=["stem", "layer2.0"], exclude=["*.conv1"]).blocks}
    assert chosen == {"stem+2", "layer2.0.conv2+2"}
    rest = {b.family.label for b in GroupLasso(groups, 0.1, exclude=["layer2", "stem+2"]).blocks}
    assert rest == {"layer1.0.conv1", "layer1.1.conv1"}  # a whole label, as reports print it, selects too
    lasso = GroupLasso(groups, 0.1, multipliers={"layer*": 0.0, "layer2.0.conv2": 2.0})
    assert {b.family.label: b.lam[0].item() for b in lasso.blocks} == pytest.approx({"stem+2": 0.1,
                                                                                     "layer2.0.conv2+2": 0.2})


@pytest.mark.parametrize("reset", [False, True])
def test_reset_momentum_keeps_a_zero_group_at_zero_while_its_gradient_is_below_lambda(reset):
    # loss = <C, W>: a constant gradient per group with norm 0.5·λ, so w_g = 0 is the proximal fixed point.
    # Momentum SGD builds a velocity of up to 10·C and, without the reset, pushes the group out of zero.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 3, bias=False), torch.nn.ReLU(), torch.nn.Linear(3, 1, bias=False))
    groups = structures(net, torch.randn(1, 2), kinds=("neuron",))
    lasso = GroupLasso(groups, 1.0, reset_momentum=reset)
    c1, c2 = torch.randn(3, 2), torch.randn(1, 3)
    scale = 0.5 / torch.cat([c1, c2.T], dim=1).norm(dim=1)  # each neuron's gradient norm = 0.5
    c1, c2 = c1 * scale[:, None], c2 * scale[None, :]
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(20):
        opt.zero_grad()
        ((net[0].weight * c1).sum() + (net[2].weight * c2).sum()).backward()
        opt.step()
        lasso.step_(0.1, opt)
    alive = sum(bool(g.norm()) for g in groups)
    assert alive == (0 if reset else 3)


def _ranked_net():
    """Linear(4, 10) → ReLU → Linear(10, 1); hidden neuron k has norm ∝ k + 1."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 10, bias=False), nn.ReLU(), nn.Linear(10, 1, bias=False))
    with torch.no_grad():
        for p, dim in ((net[0].weight, 1), (net[2].weight, 0)):
            p.div_(p.norm(dim=dim, keepdim=True)).mul_(0.1 * torch.arange(1.0, 11.0).view(-1, 1 if dim else 10) / 2**0.5)
    return net, structures(net, torch.randn(1, 4), kinds=("neuron",))


def _train(net, lasso, steps):
    # a constant gradient that would pull every group away from zero without the Lasso
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        (-0.1 * (net[0].weight.sum() + net[2].weight.sum())).backward()
        opt.step()
        lasso.step_(0.1)


def test_keep_stops_the_lasso_at_the_budget_and_holds_the_rest_at_zero():
    net, groups = _ranked_net()
    lasso = GroupLasso(groups, 5.0, keep=0.3)           # λ alone zeroes all 10 neurons in 2 steps
    _train(net, lasso, 10)
    alive = [k for k, g in enumerate(groups) if g.norm() > 0]
    assert alive == [7, 8, 9]                           # floor(0.3 · 10), the largest
    before = net[0].weight.clone()
    _train(net, GroupLasso(groups, 5.0, keep=0.3), 5)  # as after a resume: the budget is met at once
    assert [k for k, g in enumerate(groups) if g.norm() > 0] == alive
    assert torch.all(net[0].weight[alive] > before[alive])  # no shrink any more: only the gradient moves them
    _train(net, GroupLasso(groups, 5.0), 5)
    assert all(g.norm() == 0 for g in groups)           # without the budget, λ takes them all


def test_keep_ramp_thins_a_layer_no_faster_than_the_cubic_and_ends_at_the_budget():
    net, groups = _ranked_net()
    lasso = GroupLasso(groups, 5.0, keep=0.3, keep_ramp=8)  # λ alone would take all 10 in 2 steps
    alive = []
    for _ in range(10):
        _train(net, lasso, 1)
        alive.append(sum(bool(g.norm()) for g in groups))
    budget = [3 + int(7 * (1 - min(t, 8) / 8) ** 3) for t in range(10)]  # k_t = k + (G - k)(1 - t/T)^3
    assert all(a >= b for a, b in zip(alive, budget))  # λ sets the pace, the ramp caps it
    assert alive[:3] == budget[:3] == [10, 7, 5] and alive[-1] == 3
    assert [k for k, g in enumerate(groups) if g.norm() > 0] == [7, 8, 9]  # the largest, as without a ramp


def test_keep_ramp_resumes_where_it_stood():
    net, groups = _ranked_net()
    first = GroupLasso(groups, 5.0, keep=0.3, keep_ramp=8)
    _train(net, first, 4)
    resumed = GroupLasso(groups, 5.0, keep=0.3, keep_ramp=8)
    resumed.steps = first.steps
    _train(net, resumed, 1)
    assert sum(bool(g.norm()) for g in groups) == 3 + int(7 * (1 - 4 / 8) ** 3)


def test_keep_cut_step_makes_a_weak_lambda_follow_the_ramp():
    budget = [3 + int(7 * (1 - min(t, 8) / 8) ** 3) for t in range(10)]  # k_t at each step
    alive = {}
    for cut in ("end", "step"):
        net, groups = _ranked_net()
        lasso = GroupLasso(groups, 0.05, keep=0.3, keep_ramp=8, keep_cut=cut)  # too weak to zero any group alone
        alive[cut] = []
        for _ in range(10):
            _train(net, lasso, 1)
            alive[cut].append(sum(bool(g.norm()) for g in groups))
        if cut == "step":
            assert [k for k, g in enumerate(groups) if g.norm() > 0] == [7, 8, 9]  # the largest stay
    assert alive["end"] == [10] * 10                       # λ sets the pace: here, none
    assert alive["step"] == budget                         # cut to k_t by magnitude after every step


def test_a_small_keep_still_leaves_every_layer_one_group():
    net, groups = _ranked_net()
    _train(net, GroupLasso(groups, 5.0, keep=0.05), 10)  # floor(0.05 · 10) = 0 would remove the layer
    assert [k for k, g in enumerate(groups) if g.norm() > 0] == [9]


def test_keep_needs_the_proximal_mode():
    net, groups = _ranked_net()
    with pytest.raises(ConfigError, match="mode='prox'"):
        GroupLasso(groups, 1.0, mode="subgradient", keep=0.5)
    with pytest.raises(ConfigError, match="fractions"):
        GroupLasso(groups, 1.0, keep={"neuron": 2.0})
    with pytest.raises(ConfigError, match="fractions"):
        GroupLasso(groups, 1.0, keep=0.0)               # would remove every unit: the layer itself
    with pytest.raises(ConfigError, match="needs keep"):
        GroupLasso(groups, 1.0, keep_ramp=10)
    with pytest.raises(ConfigError, match="'step' needs keep"):
        GroupLasso(groups, 1.0, keep_cut="step")


def test_meet_budget_cuts_what_lambda_left_above_it_by_magnitude():
    net, groups = _ranked_net()
    lasso = GroupLasso(groups, 0.5, keep=0.3)           # too weak to reach 3 of 10 in 2 steps
    _train(net, lasso, 2)
    assert sum(bool(g.norm()) for g in groups) > 3
    lasso.meet_budget_()
    assert [k for k, g in enumerate(groups) if g.norm() > 0] == [7, 8, 9]
    assert lasso.meet_budget_() == {}                   # met: nothing more to cut


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1])
def test_nan_infinite_or_negative_strength_and_multipliers_are_refused(bad):
    groups = _filters(_two_filter_conv())
    with pytest.raises(ConfigError, match="strength must be a finite number >= 0"):
        GroupLasso(groups, bad)
    with pytest.raises(ConfigError, match=r"strength\['filter'\] must be a finite number >= 0"):
        GroupLasso(groups, {"filter": bad})
    with pytest.raises(ConfigError, match="multiplier '' must be a finite number >= 0"):
        GroupLasso(groups, 0.1, multipliers={"": bad})


@pytest.mark.parametrize("mode", ["prox", "subgradient"])
def test_nan_step_is_refused_before_it_writes_nan_weights(mode):
    conv = _two_filter_conv()
    lasso = GroupLasso(_filters(conv), 0.1, mode=mode)
    for lr in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ConfigError, match="lr must be a finite number >= 0"):
            lasso.step_(lr)
    assert torch.equal(conv.weight.flatten(), torch.tensor([3.0, 0.5]))  # untouched
