import math

import pytest
import torch
from torch import nn

from torchslim.errors import ConfigError, UnsupportedOperation
from torchslim.regularize.force import ForceRegularizer, force, force_penalty

KINDS = ("l2", "l1")


def _naive_force(W: torch.Tensor, kind: str) -> torch.Tensor:
    """ΔW_i = ||W_i|| Σ_j (f_ji − (f_jiᵀw_i) w_i), one pair at a time, with the authors' skips."""
    out = torch.zeros_like(W)
    for i in range(len(W)):
        if W[i].norm() <= 1e-4:
            continue
        wi = W[i] / W[i].norm()
        for j in range(len(W)):
            if j == i or W[j].norm() <= 1e-4:
                continue
            f = W[j] / W[j].norm() - wi
            if kind == "l1":
                if f.norm() <= 1e-4:
                    continue
                f = f / f.norm()
            out[i] += W[i].norm() * (f - (f @ wi) * wi)
    return out


def _rank95(W: torch.Tensor) -> int:
    """Smallest r whose top-r singular values hold ≥ 95% of Σσ² (the paper's ≤ 5% PCA error)."""
    s2 = torch.linalg.svdvals(W).square()
    return int((s2.cumsum(0) / s2.sum() < 0.95).sum()) + 1


def test_hand_computed_three_filters_and_a_zero_one():
    # w1 = (1,0); w2 = w3 = (0,1) with ||W3|| = 2; W4 = 0 is skipped and pulls nothing.
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 0.0]])
    # l2: F1 = (w2−w1)+(w3−w1) = (−2,2) → tangent (0,2); F2 = w1−w2 = (1,−1) → (1,0); F3 = F2·||W3||.
    l2 = torch.tensor([[0.0, 2.0], [1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    # l1: each force has unit length; the coincident pair (2,3) is skipped.
    r = 1 / math.sqrt(2)
    l1 = torch.tensor([[0.0, 2 * r], [r, 0.0], [2 * r, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(force(W, "l2"), l2)
    torch.testing.assert_close(force(W, "l1"), l1)


@pytest.mark.parametrize("kind", KINDS)
def test_all_pairs_at_once_equals_a_loop_over_pairs(kind):
    W = torch.randn(7, 5, dtype=torch.float64)
    W[3] *= 1e-5  # below the norm threshold
    torch.testing.assert_close(force(W, kind), _naive_force(W, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_grouped_conv_forces_stay_within_each_group(kind):
    conv = nn.Conv2d(4, 6, 3, groups=2).double()  # weight (6, 2, 3, 3): 2 groups of 3 filters, d = 18
    conv.weight.grad = torch.zeros_like(conv.weight)
    ForceRegularizer(conv, 0.5, kind).apply_()
    rows = conv.weight.detach().flatten(1)
    expected = torch.cat([_naive_force(rows[:3], kind), _naive_force(rows[3:], kind)])
    torch.testing.assert_close(conv.weight.grad.flatten(1), -0.5 * expected)


@pytest.mark.parametrize("kind", KINDS)
def test_force_is_tangent_to_each_filter(kind):
    W = torch.randn(2, 9, 12)  # two independent sets
    dots = (force(W, kind) * W).sum(-1) / W.norm(dim=-1)
    torch.testing.assert_close(dots, torch.zeros_like(dots), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind, lr, steps", [("l2", 1.0, 100), ("l1", 0.3, 200)])
def test_force_alone_aligns_filters_and_keeps_their_lengths(kind, lr, steps):
    lin = nn.Linear(16, 8)
    reg = ForceRegularizer(nn.Sequential(lin), 0.01, kind)
    start = lin.weight.detach().clone()
    opt = torch.optim.SGD(lin.parameters(), lr=lr)
    for _ in range(steps):
        lin.weight.grad = torch.zeros_like(lin.weight)  # no data loss: the force is the whole gradient
        reg.apply_()
        opt.step()
    end = lin.weight.detach()
    assert _rank95(start) >= 5 and _rank95(end) == 1
    torch.testing.assert_close(end.norm(dim=1), start.norm(dim=1), rtol=0.05, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_penalty_gradient_is_the_force_over_the_squared_norm(kind):
    W = (torch.randn(6, 4, dtype=torch.float64) * torch.rand(6, 1, dtype=torch.float64) * 3).requires_grad_()
    W.data[5] = W.data[4]  # a coincident pair
    force_penalty(W, kind).backward()
    expected = 2 * force(W.detach(), kind) / W.detach().norm(dim=1, keepdim=True) ** 2
    torch.testing.assert_close(-W.grad, expected)
    cos = torch.nn.functional.cosine_similarity(-W.grad, force(W.detach(), kind), dim=1)
    torch.testing.assert_close(cos, torch.ones(6, dtype=torch.float64))


def test_penalty_values_match_the_pair_sums():
    W = torch.randn(5, 3, dtype=torch.float64)
    w = W / W.norm(dim=1, keepdim=True)
    dist = (w[:, None] - w[None]).norm(dim=-1)  # (N, N)
    torch.testing.assert_close(force_penalty(W, "l2"), 0.5 * dist.square().sum())
    torch.testing.assert_close(force_penalty(W, "l1"), dist.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l1_penalty_has_no_nan_at_coincident_or_zero_filters(dtype):
    conv = nn.Conv2d(2, 4, 3, bias=False).to(dtype)
    with torch.no_grad():
        conv.weight[1] = conv.weight[0]
        conv.weight[2] = 0
    reg = ForceRegularizer(conv, 1.0, "l1")
    reg.penalty().backward()
    assert torch.isfinite(conv.weight.grad).all()
    assert conv.weight.grad[2].abs().max() == 0
    reg.apply_()
    assert torch.isfinite(conv.weight.grad).all()


def test_multipliers_and_exclude_select_layers():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(36, 5), nn.Linear(5, 3))
    net(torch.randn(2, 1, 5, 5)).sum().backward()
    before = {n: p.grad.clone() for n, p in net.named_parameters()}
    reg = ForceRegularizer(net, 0.1, multipliers={"0": 0.0, "2": 2.0}, exclude=["3"])
    assert reg.layers == {"2": 2.0}
    reg.apply_()
    for name in ("0.weight", "3.weight", "2.bias", "0.bias"):
        torch.testing.assert_close(net.get_parameter(name).grad, before[name], rtol=0, atol=0)
    expected = before["2.weight"] - 0.2 * force(net[2].weight.detach())
    torch.testing.assert_close(net[2].weight.grad, expected)


def _blocks_net() -> nn.Module:
    net = nn.Module()
    for b in ("block1", "block2"):
        net.add_module(b, nn.Module())
        net.get_submodule(b).add_module("conv", nn.Conv2d(2, 3, 1))
        net.get_submodule(b).add_module("fc", nn.Linear(3, 3))
    return net


def test_include_exclude_and_multipliers_take_globs():
    net = _blocks_net()
    reg = ForceRegularizer(net, 0.1, include=["*.conv", "block2"], exclude=["block2.fc"],
                           multipliers={"block*": 0.5, "block1.conv": 3.0})
    assert reg.layers == {"block1.conv": 3.0, "block2.conv": 0.5}  # the longest matching key wins
    assert list(ForceRegularizer(net, 0.1, exclude=["*.fc"]).layers) == ["block1.conv", "block2.conv"]
    with pytest.raises(ConfigError, match="include pattern 'blok1.conv'.*did you mean 'block1.conv'"):
        ForceRegularizer(net, 0.1, include=["blok1.conv"])
    with pytest.raises(ConfigError, match="include pattern '\\*.bn'"):
        ForceRegularizer(net, 0.1, include=["*.bn"])


def test_named_modules_none_grad_and_zero_strength():
    a, b = nn.Linear(3, 4), nn.Linear(4, 1)  # b has a single filter: no pairs, no force
    b.weight.grad = torch.randn(1, 4)
    g = b.weight.grad.clone()
    ForceRegularizer({"a": a, "b": b}, 1.0, "l1").apply_()  # a.weight.grad is None: skipped
    assert a.weight.grad is None
    torch.testing.assert_close(b.weight.grad, g)
    a.weight.grad = torch.randn(4, 3)
    g = a.weight.grad.clone()
    reg = ForceRegularizer([("a", a)], 0.0)
    reg.apply_()
    torch.testing.assert_close(a.weight.grad, g, rtol=0, atol=0)
    assert reg.penalty() == 0


def test_adaptive_force_is_a_ratio_to_the_data_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3), nn.Flatten(), nn.Linear(54, 5))
    net(torch.randn(4, 1, 5, 5)).square().sum().backward()
    before = {n: m.weight.grad.clone() for n, m in (("0", net[0]), ("2", net[2]))}
    reg = ForceRegularizer(net, 0.1, adaptive=True, multipliers={"2": 0.5})
    reg.apply_()
    for name, ratio in (("0", 0.1), ("2", 0.05)):
        m = net.get_submodule(name)
        applied = before[name] - m.weight.grad
        torch.testing.assert_close(applied.norm(), ratio * before[name].norm())
        delta = force(m.weight.detach().flatten(1)).reshape(applied.shape)  # same direction as the fixed-scale force
        torch.testing.assert_close(applied / applied.norm(), delta / delta.norm())
    with torch.no_grad():
        net[2].weight.mul_(10.0)  # the fixed force grows with ||W_i||; the adaptive one does not
    net[2].weight.grad = before["2"].clone()
    reg.apply_()
    torch.testing.assert_close((before["2"] - net[2].weight.grad).norm(), 0.05 * before["2"].norm())
    with pytest.raises(ConfigError, match="apply_"):
        reg.penalty()


def test_adaptive_force_leaves_aligned_filters_and_zero_gradients_alone():
    lin = nn.Linear(3, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([2.0, 0.0, 0.0]).expand(4, 3))  # all filters aligned: ΔW = 0
    lin.weight.grad = torch.randn(4, 3)
    g = lin.weight.grad.clone()
    ForceRegularizer(lin, 1.0, adaptive=True).apply_()
    torch.testing.assert_close(lin.weight.grad, g)
    lin.reset_parameters()
    lin.weight.grad = torch.zeros(4, 3)
    ForceRegularizer(lin, 1.0, adaptive=True).apply_()
    assert torch.isfinite(lin.weight.grad).all() and lin.weight.grad.abs().max() == 0


def test_bad_config_raises_with_a_close_match():
    net = nn.Sequential()
    net.add_module("conv1", nn.Conv2d(1, 4, 3))
    net.add_module("fc", nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="'conv11'.*did you mean 'conv1'"):
        ForceRegularizer(net, 0.1, multipliers={"conv11": 2.0})
    with pytest.raises(ConfigError, match="'fcc'.*did you mean 'fc'"):
        ForceRegularizer(net, 0.1, exclude=["fcc"])
    with pytest.raises(ConfigError, match="'l2'"):
        ForceRegularizer(net, 0.1, kind="L2")
    with pytest.raises(ConfigError, match=">= 0"):
        ForceRegularizer(net, -1.0)
    with pytest.raises(ConfigError, match=">= 0"):
        ForceRegularizer(net, 0.1, multipliers={"fc": -1})
    net.add_module("up", nn.ConvTranspose2d(2, 2, 2))
    with pytest.raises(UnsupportedOperation, match="ConvTranspose2d.*exclude=\\['up'\\]"):
        ForceRegularizer(net, 0.1)
    assert list(ForceRegularizer(net, 0.1, exclude=["up"]).layers) == ["conv1", "fc"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind):
    conv = nn.Conv2d(4, 8, 3, groups=2)
    cpu = force(conv.weight.detach().reshape(2, 4, -1), kind)
    gpu = force(conv.weight.detach().reshape(2, 4, -1).cuda(), kind)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    conv.cuda().weight.grad = torch.zeros_like(conv.weight)
    ForceRegularizer(conv, 1.0, kind).apply_()
    ForceRegularizer(conv, 1.0, kind).penalty().backward()
    assert conv.weight.grad.is_cuda and torch.isfinite(conv.weight.grad).all()
