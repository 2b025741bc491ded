import copy

import pytest
import torch
from nets import MLP, TinyLeNet, randomize_bn
from torch import nn

from torchslim import ConfigError, compact, magnitude_prune, structures, verify
from torchslim.deploy.profile import profile
from torchslim.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _macs(model, x):
    return profile(model, x, latency=False).macs


def _by_family(groups):
    out = {}
    for g in groups:
        out.setdefault(g.family, []).append(g)
    return out


def _width(small, family):
    """Members of ``family`` (of the dense model) left in ``small``: its first producer's output rows."""
    return small.get_submodule(family.label.split("+")[0]).weight.shape[0]


def _resnet20():
    return randomize_bn(create_model("resnet20", in_channels=1)).eval()


def test_layer_scope_removes_the_fraction_of_every_layer_with_the_least_norm():
    model, x = TinyLeNet().eval(), torch.randn(2, 1, 28, 28)
    norms = {f.label: torch.stack([g.norm() for g in gs]) for f, gs in _by_family(structures(model, x)).items()}
    small = magnitude_prune(model, x, amount=0.5)
    assert (small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features) == (3, 4, 16)
    kept = norms["conv1"].argsort()[3:].sort().values  # the 3 of 6 largest ||w_g||, in layer order
    torch.testing.assert_close(small.conv1.weight, model.conv1.weight[kept], rtol=0, atol=0)
    torch.testing.assert_close(small.conv2.weight[:, :, 0, 0], model.conv2.weight[:, kept, 0, 0][
        norms["conv2"].argsort()[4:].sort().values], rtol=0, atol=0)


def test_lenet_keeps_the_floor_of_the_fraction():
    small = magnitude_prune(create_model("lenet"), torch.randn(2, 1, 28, 28), amount=0.3)
    assert (small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features) == (14, 35, 350)


def _zero_lowest_(model, x, amount):
    """The reference: zero the ``⌊amount·n⌋`` lowest-norm groups of every family, with the Group API.

    All norms are taken before any zeroing: coupled families share weights (a residual block's
    ``conv2`` rows belong to the trunk, its columns to the block's inner channels).
    """
    families = _by_family(structures(model, x)).values()
    lowest = [[gs[i] for i in torch.stack([g.norm() for g in gs]).argsort()[: int(amount * len(gs))]]
              for gs in families]
    for gs in lowest:
        for g in gs:
            g.zero_()
    return model


def test_result_equals_compact_of_the_zeroed_model_and_leaves_the_model_alone():
    model, x = _resnet20(), torch.randn(2, 1, 28, 28)
    before = copy.deepcopy(model.state_dict())
    small = magnitude_prune(model, x, amount=0.4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    zeroed = _zero_lowest_(copy.deepcopy(model), x, 0.4)
    reference = compact(zeroed, x)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in reference.parameters())
    assert small.layer3[0].conv1.out_channels == 64 - 25 and small.conv1.out_channels == 16 - 6
    for seed in range(2):
        probe = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
        assert verify(zeroed, small, probe).max_abs_diff <= 1e-5


def _previous_step(families, small, scope):
    """The amount one step of pruning below what ``small`` shows (layer: next breakpoint j/n down)."""
    sizes = {f: f.size for f in families}
    removed = {f: f.size - _width(small, f) for f in families}
    if scope == "global":
        total = sum(sizes.values())
        return (sum(removed.values()) - 1) / total
    amount = max(removed[f] / sizes[f] for f in families)  # the least amount that removes this many
    return max(j / n for n in sizes.values() for j in range(n) if j / n < amount)


@pytest.mark.parametrize("name,scope,fraction", [
    ("lenet", "layer", 0.4), ("resnet20", "layer", 0.5), ("mlp", "global", 0.3),
])
def test_target_macs_is_met_by_the_least_pruning(name, scope, fraction):
    model = _resnet20() if name == "resnet20" else create_model(name).eval()
    x = torch.randn(2, 1, 28, 28)
    target = int(_macs(model, x) * fraction)
    small = magnitude_prune(model, x, target_macs=target, scope=scope)
    assert _macs(small, x) <= target
    families = list(_by_family(structures(model, x)))
    less = magnitude_prune(model, x, _previous_step(families, small, scope), scope=scope)
    assert _macs(less, x) > target
    assert sum(_width(less, f) for f in families) > sum(_width(small, f) for f in families)


def test_a_target_above_the_dense_macs_prunes_nothing():
    model, x = TinyLeNet().eval(), torch.randn(2, 1, 28, 28)
    small = magnitude_prune(model, x, target_macs=_macs(model, x))
    assert (small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features) == (6, 8, 32)


def test_global_scope_ranks_all_layers_by_rms_weight():
    model, x = MLP().eval(), torch.randn(2, 8, 8)  # neurons: net.1 (40), net.3 (30)
    with torch.no_grad():
        model.net[1].weight.mul_(100)  # only net.1's neurons hold these rows: they rank last
    small = magnitude_prune(model, x, 0.3, scope="global")  # ⌊0.3 · 70⌋ = 21 groups, all from net.3
    assert (small.net[1].out_features, small.net[3].out_features) == (40, 9)
    small = magnitude_prune(model, x, 0.3, scope="layer")
    assert (small.net[1].out_features, small.net[3].out_features) == (28, 21)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_every_layer_keeps_one_member(scope):
    model, x = MLP().eval(), torch.randn(2, 8, 8)
    small = magnitude_prune(model, x, 0.99, scope=scope)
    assert (small.net[1].out_features, small.net[3].out_features) == (1, 1)


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one"),
    ({"amount": 0.5, "target_macs": 1000}, "exactly one"),
    ({"amount": 1.0}, r"\[0, 1\)"),
    ({"amount": -0.1}, r"\[0, 1\)"),
    ({"amount": True}, r"\[0, 1\)"),
    ({"target_macs": 0}, "positive"),
    ({"amount": 0.5, "kinds": ("filter",)}, "kinds"),
    ({"amount": 0.5, "kinds": "channel"}, "kinds"),
    ({"amount": 0.5, "kinds": ()}, "kinds"),
    ({"amount": 0.5, "scope": "net"}, "scope"),
    ({"target_macs": 1}, "below"),
])
def test_bad_arguments_raise_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        magnitude_prune(MLP().eval(), torch.randn(2, 8, 8), **kwargs)


def test_a_model_without_groups_is_an_error():
    with pytest.raises(ConfigError, match="no removable"):
        magnitude_prune(nn.Linear(4, 2), torch.randn(2, 4), amount=0.5)


def test_a_transformer_prunes_heads_neurons_and_width_to_a_target():
    torch.manual_seed(0)
    model, x = create_model("vit", n_layer=2, width=32, n_head=4, head_dim=8, d_ff=32).eval(), torch.randn(2, 1, 28, 28)
    target = 0.4 * _macs(model, x)
    small = magnitude_prune(model, x, target_macs=target, kinds=("head", "neuron", "embed"))
    assert _macs(small, x) <= target
    assert small.patch_embed.out_channels < 32                           # the width (embed)
    assert all(b.attn.q.out_features < 4 * 8 and b.fc.out_features < 32 for b in small.blocks)  # heads, neurons
    one_head = magnitude_prune(model, x, 0.99, kinds=("head",))
    assert [b.attn.q.out_features for b in one_head.blocks] == [8, 8]   # every attention keeps a head
