"""profile: hand-computed MACs, latency statistics, restored state; compare: matched rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim.deploy.profile import Profile, compare, machine_info, profile
from torchslim.errors import ConfigError
from torchslim.layers import LoweredConv2d


class Tiny(nn.Module):
    """Conv2d(1, 2, 3) on 1x5x5 -> 2x3x3 -> Linear(18, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(18, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.act(self.conv(x)), 1))


def _by_name(p: Profile) -> dict[str, object]:
    return {layer.name: layer for layer in p.layers}


def test_hand_computed_macs_per_sample() -> None:
    torch.manual_seed(0)
    p = profile(Tiny(), torch.randn(3, 1, 5, 5), latency=False)
    layers = _by_name(p)
    assert layers["conv"].macs == 2 * 1 * 3 * 3 * 3 * 3  # N * C * kh * kw * H' * W' = 162
    assert layers["fc"].macs == 18 * 4  # 72
    assert layers["act"].macs == 0
    assert p.macs == 162 + 72
    assert p.params == (2 * 9 + 2) + (18 * 4 + 4)
    assert layers["conv"].out_shape == (3, 2, 3, 3)
    assert layers["conv"].type == "Conv2d" and layers["conv"].params == 20
    assert p.batch_size == 3
    assert p.latency_ms is None and p.latency_p10_ms is None and p.latency_p90_ms is None


def test_lowered_conv_counts_live_columns_only() -> None:
    torch.manual_seed(0)
    columns = torch.tensor([0, 4, 7, 11, 17])  # K = 5 of C * kh * kw = 18
    layer = LoweredConv2d(2, 3, 3, columns, padding=1)
    p = profile(layer, torch.randn(2, 2, 4, 4), latency=False)
    assert p.macs == 3 * 5 * 16  # N * K * L with L = 4 * 4
    assert p.layers[0].type == "LoweredConv2d" and p.layers[0].out_shape == (2, 3, 4, 4)


def test_grouped_conv_and_lstm_macs() -> None:
    torch.manual_seed(0)
    grouped = profile(nn.Conv2d(4, 6, 3, groups=2, padding=1), torch.randn(1, 4, 5, 5), latency=False)
    assert grouped.macs == 6 * (4 // 2) * 9 * 25
    lstm = profile(nn.LSTM(3, 5), torch.randn(7, 2, 3), latency=False, batch_dim=1)  # (T, B, in)
    assert lstm.batch_size == 2
    assert lstm.macs == 4 * 5 * (3 + 5) * 7  # gates * H * (in + H) * T
    gru = profile(nn.GRU(3, 5, num_layers=2, batch_first=True), torch.randn(2, 7, 3), latency=False)
    assert gru.macs == 3 * 5 * (3 + 5) * 7 + 3 * 5 * (5 + 5) * 7


def test_latency_statistics_and_restored_state() -> None:
    torch.manual_seed(0)
    model = Tiny().train()
    model.fc.eval()  # a mixed flag that must come back as it was
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        p = profile(model, torch.randn(2, 1, 5, 5), threads=1, repeats=7, warmup=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert p.threads == 1
    assert 0 < p.latency_p10_ms <= p.latency_ms <= p.latency_p90_ms
    assert model.training and model.conv.training and not model.fc.training
    assert not model.conv._forward_hooks  # hooks removed


def test_state_restored_when_forward_fails() -> None:
    before = torch.get_num_threads()
    model = Tiny().train()
    with pytest.raises(RuntimeError):
        profile(model, torch.randn(2, 3, 5, 5), threads=1)  # conv expects 1 channel
    assert torch.get_num_threads() == before
    assert model.training and not model.conv._forward_hooks


def test_bad_arguments_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="repeats"):
        profile(Tiny(), torch.randn(1, 1, 5, 5), repeats=0)
    with pytest.raises(ConfigError, match="threads"):
        profile(Tiny(), torch.randn(1, 1, 5, 5), threads=0)


def test_compare_matches_replaced_layers() -> None:
    torch.manual_seed(0)
    dense = Tiny()
    compact = Tiny()
    compact.conv = nn.Sequential(nn.ZeroPad2d((-1, 0, -1, 0)), nn.Conv2d(1, 2, 2))  # 2x2 kernel on 4x4 -> 3x3
    x = torch.randn(2, 1, 5, 5)
    a, b = profile(dense, x, repeats=3, warmup=0), profile(compact, x, repeats=3, warmup=0)
    assert _by_name(b)["conv.1"].macs == 2 * 4 * 9
    table = compare(a, b)
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.strip()}
    assert rows["conv"][1:] == ["162", "72", f"{72 / 162:.3f}"]
    assert "conv.1" not in rows and "conv.0" not in rows
    assert rows["fc"][1:] == ["72", "72", "1.000"]
    assert rows["MACs"][1:3] == ["234", "144"]
    assert "speedup" in rows


def test_machine_info_fields() -> None:
    info = machine_info()
    assert {"cpu", "cores", "torch", "threads"} <= info.keys()
    assert info["torch"] == torch.__version__ and info["threads"] == torch.get_num_threads()


def test_the_old_inputs_keyword_warns_and_profiles_the_same() -> None:
    torch.manual_seed(0)
    model, x = Tiny(), torch.randn(3, 1, 5, 5)
    with pytest.warns(DeprecationWarning, match="example_inputs"):
        old = profile(model, inputs=x, latency=False)
    assert old == profile(model, example_inputs=x, latency=False) == profile(model, x, latency=False)
