"""The ISS paper's alternatives: row-only / column-only hidden-unit groups and element-wise L1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim import ConfigError, GroupLasso, compact, structures, verify
from torchslim.regularize.lasso import L1
from torchslim.train.recipes import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

H = 5


class _LM(nn.Module):
    """Embedding → 2-layer RNN (optionally bidirectional) → decoder."""

    def __init__(self, rnn: type[nn.RNNBase] = nn.LSTM, bidirectional: bool = False, tie: bool = False):
        super().__init__()
        self.emb = nn.Embedding(30, H if tie and not bidirectional else 7)
        self.rnn = rnn(self.emb.embedding_dim, H, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.dec = nn.Linear(H * (2 if bidirectional else 1), 30)
        if tie:
            self.dec.weight = self.emb.weight

    def forward(self, tokens):
        return self.dec(self.rnn(self.emb(tokens))[0])


class _Primed(nn.Module):
    """An LSTM started from a learned, non-zero state: a unit with zero gate rows still outputs o·tanh(c)."""

    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(4, H, batch_first=True), nn.Linear(H, 3)
        self.h0, self.c0 = nn.Parameter(torch.randn(1, 1, H)), nn.Parameter(torch.randn(1, 1, H))

    def forward(self, x):
        n = x.shape[0]
        out, _ = self.rnn(x, (self.h0.expand(1, n, H).contiguous(), self.c0.expand(1, n, H).contiguous()))
        return self.fc(out[:, -1])


class _Squashed(nn.Module):
    """A sigmoid between the LSTM and its reader: a unit that outputs 0 is read as 0.5."""

    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(4, H, batch_first=True), nn.Linear(H, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(torch.sigmoid(out[:, -1]))


def _tokens():
    return torch.randint(0, 30, (3, 6), generator=torch.Generator().manual_seed(0))


def _slices(group) -> set[tuple[str, int, int]]:
    return {(name, dim, int(i)) for name, dim, rows in group.slices for i in rows}


def _by_name(model, kinds):
    return {g.name: g for g in structures(model, _tokens(), kinds=kinds, strict=True)}


@pytest.mark.parametrize("bidirectional", [False, True])
def test_rows_produce_the_unit_and_columns_read_it(bidirectional):
    model = _LM(bidirectional=bidirectional)
    groups = _by_name(model, ("hidden", "hidden_row", "hidden_col"))
    dirs = ["", "_reverse"] if bidirectional else [""]
    assert len(groups) == 3 * 2 * len(dirs) * H
    k = 2
    for layer in (0, 1):
        for d, sfx in enumerate(dirs):
            label = f"rnn.l{layer}{sfx}"
            row, col, unit = (groups[f"{label}:{kind}[{k}]"] for kind in ("hidden_row", "hidden_col", "hidden"))
            produce = {(f"rnn.{w}_l{layer}{sfx}", 0, g * H + k)
                       for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") for g in range(4)}
            assert _slices(row) == produce
            read = {(f"rnn.weight_hh_l{layer}{sfx}", 1, k)}
            if layer == 0:   # both directions of the next layer read it, at this direction's offset
                read |= {(f"rnn.weight_ih_l1{s2}", 1, d * H + k) for s2 in dirs}
            else:            # the decoder reads the last layer
                read |= {("dec.weight", 1, d * H + k)}
            assert _slices(col) == read
            assert _slices(row) | _slices(col) == _slices(unit)   # ISS = rows ∪ columns
            assert row.numel() + col.numel() == unit.numel()


def test_side_groups_zero_only_their_side():
    model = _LM()
    groups = _by_name(model, ("hidden_row", "hidden_col"))
    groups["rnn.l0:hidden_row[1]"].zero_()
    assert all(model.rnn.weight_ih_l0[g * H + 1].abs().sum() == 0 for g in range(4))
    assert model.rnn.weight_hh_l0[:, 1].abs().sum() != 0 and model.rnn.weight_ih_l1[:, 1].abs().sum() != 0
    assert groups["rnn.l0:hidden_row[1]"].is_zero() and not groups["rnn.l0:hidden_col[1]"].is_zero()
    groups["rnn.l1:hidden_col[3]"].zero_()
    assert model.dec.weight[:, 3].abs().sum() == 0 and model.rnn.weight_hh_l1[:, 3].abs().sum() == 0
    assert model.rnn.weight_ih_l1[3].abs().sum() != 0


@pytest.mark.parametrize("kind", ["hidden_row", "hidden_col"])
@pytest.mark.parametrize("options", [{}, {"bidirectional": True}, {"rnn": nn.GRU}, {"tie": True}])
def test_one_zero_side_makes_the_unit_removable(kind, options):
    model, x = _LM(**options).eval(), _tokens()
    groups = structures(model, x, kinds=(kind,), strict=True)
    for g in groups:
        if g.index in (0, 3):                     # the same units in every layer and direction
            g.zero_()
    small = compact(model, x)
    assert small.rnn.hidden_size == H - 2
    assert verify(model, small, x).ok
    assert verify(model, small, torch.randint(0, 30, (4, 9))).ok


def test_row_zeros_keep_a_unit_whose_zero_output_is_not_read_as_zero():
    from torchslim.surgery.compact import _live_members  # the rule compact() applies to each hidden family

    model, x = _Squashed().eval(), torch.randn(2, 6, 4)
    unit = structures(model, x, kinds=("hidden",))[0].family
    rows = {g.index: g for g in structures(model, x, kinds=("hidden_row",))}
    cols = {g.index: g for g in structures(model, x, kinds=("hidden_col",))}
    assert not rows[1].family.zero_preserving and not unit.zero_preserving
    rows[1].zero_()                               # h stays 0, but fc reads sigmoid(0) = 0.5
    assert 1 in _live_members(unit).tolist()
    cols[1].zero_()                               # nobody reads it: removable
    assert 1 not in _live_members(unit).tolist() and len(_live_members(unit)) == H - 1
    small = compact(model, x)
    assert small.rnn.hidden_size == H - 1 and verify(model, small, x).ok


def test_a_non_zero_initial_state_keeps_every_unit():
    model, x = _Primed().eval(), torch.randn(2, 6, 4)
    assert structures(model, x, kinds=("hidden", "hidden_row", "hidden_col")) == []  # the state pins H
    with torch.no_grad():                         # unit 1 silent from a zero start, unit 3 unread
        model.rnn.weight_ih_l0[1::H] = model.rnn.weight_hh_l0[1::H] = 0
        model.rnn.bias_ih_l0[1::H] = model.rnn.bias_hh_l0[1::H] = 0
        model.rnn.weight_hh_l0[:, 3] = model.fc.weight[:, 3] = 0
    small = compact(model, x)                     # c0 ≠ 0: unit 1 still speaks; h0 is not cut: 3 stays
    assert small.rnn.hidden_size == H and verify(model, small, x).ok


def test_group_lasso_on_rows_reaches_whole_zero_rows_only():
    model = _LM()
    groups = structures(model, _tokens(), kinds=("hidden", "hidden_row", "hidden_col"))
    GroupLasso(groups, {"hidden_row": 1e3}, multipliers={"rnn.l1": 0.0}).prox_(1.0)   # layer 0's rows only
    zero = {}
    for g in groups:
        zero.setdefault(f"{g.family.label}:{g.kind}", []).append(g.is_zero())
    assert all(zero["rnn.l0:hidden_row"]) and not any(zero["rnn.l1:hidden_row"])
    assert not any(zero["rnn.l0:hidden_col"]) and not any(zero["rnn.l0:hidden"])   # weight_ih_l1 still reads them
    lasso = GroupLasso(groups, 1e-3, multipliers={"rnn.l1:hidden_col": 2.0})
    assert {b.family.kind for b in lasso.blocks} == {"hidden", "hidden_row", "hidden_col"}


# -- element-wise L1 ---------------------------------------------------------------------------

def test_l1_prox_is_the_elementwise_soft_threshold_with_exact_zeros():
    model = _LM()
    l1 = L1(structures(model, _tokens(), kinds=("hidden",)), 0.5)
    names = [name for name, _, _ in l1.params]
    assert set(names) == {f"rnn.{n}" for n, _ in model.rnn.named_parameters()} | {"dec.weight"}
    before = {name: p.detach().clone() for name, p, _ in l1.params}
    untouched = model.dec.bias.detach().clone(), model.emb.weight.detach().clone()
    lr = 0.2                                       # threshold lr·λ = 0.1
    l1.prox_(lr)
    zeros = 0
    for name, p, _ in l1.params:
        w = before[name]
        expected = torch.sign(w) * (w.abs() - 0.1).clamp_min(0)
        assert torch.equal(p.detach(), expected)
        assert torch.equal(p.detach() == 0, w.abs() <= 0.1)   # exact zeros, element by element
        zeros += int((p == 0).sum())
    assert zeros > 0
    assert torch.equal(model.dec.bias, untouched[0]) and torch.equal(model.emb.weight, untouched[1])
    total = sum(p.numel() for _, p, _ in l1.params)
    assert l1.zero_fraction() == {"weight": zeros / total}


def test_l1_penalty_is_lambda_times_the_sum_of_absolute_values():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    l1 = L1(model, 1e-2, multipliers={"2": 3.0, "2.bias": 0.0})
    expected = 1e-2 * (model[0].weight.abs().sum() + model[0].bias.abs().sum()) + 3e-2 * model[2].weight.abs().sum()
    torch.testing.assert_close(l1.penalty(), expected)
    l1.penalty().backward()                        # subgradient λ·sign(w)
    torch.testing.assert_close(model[2].weight.grad, 3e-2 * model[2].weight.sign())
    assert [name for name, _, _ in l1.params] == ["0.weight", "0.bias", "2.weight"]


def test_l1_subgradient_mode_thresholds_and_tied_weights_count_once():
    model = _LM(tie=True)
    l1 = L1(dict(model.named_parameters(remove_duplicate=False)), 1e-3, mode="subgradient", threshold=0.05)
    assert l1.uses_penalty and [name for name, _, _ in l1.params].count("dec.weight") == 0   # tied: emb.weight
    small = model.emb.weight.detach().abs() < 0.05
    l1.step_(0.1)
    assert small.any() and torch.equal(model.emb.weight == 0, small)
    assert model.dec.weight is model.emb.weight


@pytest.mark.parametrize("bad, match", [
    (dict(strength=-1.0), ">= 0"),
    (dict(strength=float("nan")), ">= 0"),
    (dict(strength="1e-3"), ">= 0"),
    (dict(mode="adam"), "mode"),
    (dict(multipliers={"rnn.l9": 2.0}), "selects no parameter"),
])
def test_l1_bad_config_raises(bad, match):
    kwargs = {"strength": 1e-3, **bad}
    with pytest.raises(ConfigError, match=match):
        L1(_LM(), **kwargs)


def test_l1_bad_inputs_raise():
    with pytest.raises(ConfigError, match="no parameters"):
        L1({}, 1e-3)
    with pytest.raises(ConfigError, match="nn.Module"):
        L1([torch.zeros(3)], 1e-3)


def test_recipes_take_the_new_kinds_and_refuse_typos():
    recipe = load_recipe("rowlstm_iss", overrides=["ssl.kinds=[hidden_row]", "ssl.strength=1e-3"])
    assert recipe.ssl.kinds == ["hidden_row"]
    with pytest.raises(ConfigError):
        load_recipe("rowlstm_iss", overrides=["ssl.kinds=[hidden_rows]", "ssl.strength=1e-3"])
    with pytest.raises(ConfigError, match="unknown kinds"):
        GroupLasso([], {"hidden_rows": 1e-3})
