"""The op-rule table: register_op with "elementwise", "opaque" and a handler; strict errors; the warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from torchslim import (
    ConfigError,
    UnsupportedOperation,
    compact,
    register_op,
    structures,
    verify,
)
from torchslim.errors import UnknownOpWarning


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class ChannelScale(nn.Module):
    """A learned per-channel scale ``x · s``, ``s: (C, 1, 1)``: channels stay apart and ``s`` goes with them."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x):
        return x * self.scale


def scale_rule(op):
    """The handler of docs/op_rules.md: ``scale`` row ``k`` writes channel ``k``."""
    chans = op.channels(op.input)
    if chans is None or chans.dim != 1:
        op.unknown()
        return
    op.attach(chans, op.param("scale"), 0, "out")
    op.output(chans)


def _net(mid: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3), mid, nn.Conv2d(8, 4, 1))


def _labels(net, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOpWarning)
        return {g.family.label for g in structures(net, x, **kw)}


X = torch.randn(2, 3, 8, 8)


def test_an_elementwise_module_lets_channels_through_and_compacts_exactly():
    net = _net(Swish()).eval()
    assert _labels(net, X, leaf_modules=(Swish,)) == set()      # an unknown leaf pins conv 0's channels
    with register_op(Swish, "elementwise"):
        groups = structures(net, X, leaf_modules=(Swish,))
        assert [g.name for g in groups] == [f"0:channel[{k}]" for k in range(8)]
        assert {s.param for s in groups[0].family.stripes} == {"0.weight", "0.bias", "2.weight"}
        groups[1].zero_()                                        # its filter and bias: Swish(0) = 0
        groups[5].zero_()
        small = compact(net, X, leaf_modules=(Swish,))
    assert small[0].out_channels == 6 and small[2].in_channels == 6
    assert verify(net, small, torch.randn(4, 3, 8, 8)).ok
    assert _labels(net, X, leaf_modules=(Swish,)) == set()      # the registration is gone


@pytest.mark.parametrize(("zero_preserving", "kept"), [(True, 7), (False, 8)])
def test_a_silent_channel_goes_only_behind_an_op_that_keeps_zeros(zero_preserving, kept):
    net = _net(Swish()).eval()
    with torch.no_grad():
        net[0].weight[1], net[0].bias[1] = 0.0, 0.0                # channel 1 is zero; conv 2 still reads it
    with register_op(Swish, "elementwise", zero_preserving=zero_preserving):
        small = compact(net, X, leaf_modules=(Swish,))
    assert small[0].out_channels == kept and verify(net, small, X).ok
    assert compact(net, X)[0].out_channels == 8                  # traced into Swish: sigmoid(0) = 1/2


def test_opaque_pins_channels_that_would_flow_and_does_not_warn():
    net = _net(nn.ReLU())
    assert _labels(net, X) == {"0"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownOpWarning)
        with register_op(nn.ReLU, "opaque"):                     # overrides the built-in rule
            assert structures(net, X, strict=True) == []
    assert _labels(net, X) == {"0"}


def test_a_handler_attaches_the_modules_parameter_and_compaction_cuts_it():
    net = _net(ChannelScale(8)).eval()
    registration = register_op(ChannelScale, scale_rule)
    try:
        groups = structures(net, X, leaf_modules=(ChannelScale,), strict=True)
        assert "1.scale" in {s.param for s in groups[0].family.stripes}
        groups[2].zero_()
        small = compact(net, X, leaf_modules=(ChannelScale,), strict=True)
    finally:
        registration.remove()
    assert small[1].scale.shape == (7, 1, 1) and small[2].in_channels == 7
    assert verify(net, small, torch.randn(4, 3, 8, 8)).ok


def test_names_register_methods_and_qualified_classes():
    class Rolled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(self.a(x).roll(1, 3))                  # a shift along the width

    assert _labels(Rolled(), X) == set()
    with register_op("roll", "elementwise"):
        assert _labels(Rolled(), X, strict=True) == {"a"}
    with register_op(f"{Swish.__module__}.{Swish.__qualname__}", "elementwise"):
        assert _labels(_net(Swish()), X, leaf_modules=(Swish,), strict=True) == {"0"}


def test_registrations_stack_and_unwind_in_any_order():
    net = _net(nn.ReLU())
    first, second = register_op(nn.ReLU, "opaque"), register_op(nn.ReLU, "elementwise")
    assert _labels(net, X) == {"0"}                              # the last registration wins
    second.remove()
    assert _labels(net, X) == set()
    first.remove()
    assert _labels(net, X) == {"0"}


def test_a_bad_rule_is_a_config_error():
    with pytest.raises(ConfigError, match="elementwise"):
        register_op(Swish, "pointwise")
    with pytest.raises(ConfigError, match="callable"):
        register_op(Swish, 3)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.roll(self.conv(x), 1, 1)


class _TwoUnknowns(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.head = _Block(), nn.Conv2d(4, 2, 1)
        self.side, self.norm, self.out = nn.Conv2d(3, 5, 1), nn.LayerNorm([5, 8, 8]), nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.head(self.block(x)), self.out(self.norm(self.side(x)))


def test_strict_names_the_op_its_module_and_register_op():
    with pytest.raises(UnsupportedOperation) as info:
        structures(_TwoUnknowns(), X, strict=True)
    message = str(info.value)
    assert "roll" in message and "module 'block' (_Block)" in message and "torchslim.register_op(torch.roll" in message
    with pytest.raises(UnsupportedOperation, match=r"LayerNorm at module 'norm'.*register_op\(LayerNorm"):
        compact(_TwoUnknowns(), X, strict=True, leaf_modules=(_Block,))   # the leaf has no rule either


def test_one_warning_per_call_counts_the_channels_each_unknown_op_pinned():
    net = _TwoUnknowns().eval()
    for call in (lambda: structures(net, X, kinds=("channel", "depth")), lambda: compact(net, X)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        pinned = [w for w in caught if issubclass(w.category, UnknownOpWarning)]
        assert len(pinned) == 1, [str(w.message) for w in caught]
        message = str(pinned[0].message)
        assert "2 operation(s)" in message and "register_op" in message
        assert "roll at 'roll' in module 'block' (_Block): 4 channels" in message
        assert "LayerNorm at module 'norm': 5 channels" in message


class ExpScale(ChannelScale):
    """``x · exp(s)``: a factor computed from the parameter, which the built-in product rule cannot follow."""

    def forward(self, x):
        return x * self.scale.exp()


def test_a_case_a_builtin_rule_cannot_follow_points_at_the_module_around_it():
    with pytest.raises(UnsupportedOperation, match=r"mul of two tensors at 'mul' in module '1' \(ExpScale\)"
                                                   r".*leaf_modules=\(ExpScale,\).*register_op\(ExpScale"):
        structures(_net(ExpScale(8)), X, strict=True)


def test_a_layer_scale_needs_no_handler():
    """``x * self.scale`` with one entry per channel is built in: the same groups as the handler gives."""
    net = _net(ChannelScale(8)).eval()
    groups = structures(net, X, strict=True)
    assert ("1.scale", 0, [2]) in [(p, d, i.tolist()) for p, d, i in groups[2].slices]
