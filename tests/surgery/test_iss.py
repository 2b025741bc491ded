"""ISS: LSTM/GRU hidden units as groups (Wen et al., ICLR 2018), and exact, smaller nn.LSTM/nn.GRU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim import UnsupportedOperation, compact, structures, verify
from torchslim.deploy.serialize import load_compact, save_compact

pytestmark = pytest.mark.usefixtures("one_thread")


class _LM(nn.Module):
    """Embedding → stacked RNN → dropout → decoder, PTB-style; ``tie`` shares the embedding table."""

    def __init__(self, rnn: type[nn.RNNBase] = nn.LSTM, bidirectional: bool = False, batch_first: bool = True,
                 tie: bool = False, bias: bool = True):
        super().__init__()
        hidden = 6
        self.emb = nn.Embedding(40, hidden if tie else 8)
        self.rnn = rnn(self.emb.embedding_dim, hidden, num_layers=2, batch_first=batch_first,
                       bidirectional=bidirectional, bias=bias)
        self.drop = nn.Dropout(0.2)
        self.dec = nn.Linear(hidden * (2 if bidirectional else 1), 40)
        if tie:
            self.dec.weight = self.emb.weight

    def forward(self, tokens):
        out, _ = self.rnn(self.emb(tokens))
        return self.dec(self.drop(out))


class _Classifier(nn.Module):
    """Sequential Fashion-MNIST style: rows as time steps; reads the last step and the final state."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(28, 10, batch_first=True)
        self.fc, self.fc_h = nn.Linear(10, 3), nn.Linear(10, 3)

    def forward(self, x):
        out, (h, _) = self.rnn(x)
        return self.fc(out[:, -1, :]) + self.fc_h(h[-1])


def _tokens(batch_first: bool = True):
    return torch.randint(0, 40, (3, 7) if batch_first else (7, 3), generator=torch.Generator().manual_seed(0))


def test_hidden_group_is_the_unit_across_gates_and_consumers():
    torch.manual_seed(0)
    model = _LM()
    groups = {g.name: g for g in structures(model, _tokens(), kinds=("hidden",), strict=True)}
    assert len(groups) == 12                                     # 2 layers x 6 units
    g = groups["rnn.l0:hidden[2]"].zero_()
    w_ih, w_hh = model.rnn.weight_ih_l0, model.rnn.weight_hh_l0
    assert all(w_ih[gate * 6 + 2].abs().sum() == 0 for gate in range(4))   # i, f, g, o rows
    assert w_hh[:, 2].abs().sum() == 0 and model.rnn.weight_ih_l1[:, 2].abs().sum() == 0
    assert w_ih[3].abs().sum() != 0
    # rows of 4 gates x (8 inputs + 6 recurrent + 2 biases), then its column of weight_hh_l0 and weight_ih_l1
    assert g.numel() == 4 * (8 + 6 + 2) + 4 * 6 + 4 * 6


@pytest.mark.parametrize("options", [
    {}, {"bidirectional": True}, {"rnn": nn.GRU, "batch_first": False}, {"bias": False}, {"tie": True},
])
def test_zero_units_are_cut_exactly(options, tmp_path):
    torch.manual_seed(0)
    model, x = _LM(**options).eval(), _tokens(options.get("batch_first", True))
    groups = structures(model, x, kinds=("hidden",), strict=True)
    per_module = len(groups) // (4 if options.get("bidirectional") else 2)
    for g in groups:
        if g.index in (1, 4):                                     # the same units in every layer
            g.zero_()
    small = compact(model, x)
    assert small.rnn.hidden_size == per_module - 2
    assert verify(model, small, x).ok
    if options.get("tie"):
        assert small.dec.weight is small.emb.weight
    save_compact(small, tmp_path / "lm.pt")
    torch.testing.assert_close(load_compact(tmp_path / "lm.pt", model=_LM(**options))(x), small(x))


def test_one_hidden_size_per_module_keeps_the_strongest_extra_units():
    torch.manual_seed(0)
    model, x = _LM().eval(), _tokens()
    groups = {g.name: g for g in structures(model, x, kinds=("hidden",))}
    for k in (0, 1, 2):
        groups[f"rnn.l0:hidden[{k}]"].zero_()
    groups["rnn.l1:hidden[5]"].zero_()
    small = compact(model, x)
    assert small.rnn.hidden_size == 5                            # layer 1 needs 5; layer 0 keeps 2 zero units
    assert verify(model, small, x).ok


def test_last_step_and_final_state_readers_are_followed():
    torch.manual_seed(0)
    model, x = _Classifier().eval(), torch.randn(2, 5, 28)
    groups = structures(model, x, kinds=("hidden",), strict=True)
    for g in groups[:4]:
        g.zero_()
    small = compact(model, x)
    assert small.rnn.hidden_size == 6 and small.fc.in_features == small.fc_h.in_features == 6
    assert verify(model, small, torch.randn(3, 5, 28)).ok


@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_projections_are_refused_clearly():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(4, 8, proj_size=3, batch_first=True), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.rnn(x)[0])

    with pytest.raises(UnsupportedOperation, match="proj_size"):
        structures(Net(), torch.randn(2, 5, 4), kinds=("hidden",), strict=True)
    assert structures(Net(), torch.randn(2, 5, 4), kinds=("hidden",)) == []


def test_sparsity_report_counts_live_units_per_layer():
    from torchslim import sparsity_report
    from torchslim.models import create_model

    torch.manual_seed(0)
    model, x = create_model("rowlstm", hidden_size=16).eval(), torch.randn(2, 1, 28, 28)
    groups = structures(model, x, kinds=("hidden",), strict=True)
    for g in groups[:4]:                                          # 4 units of layer 0
        g.zero_()
    rows = {s.name: s for s in sparsity_report(model, x, groups).layers}
    assert (rows["lstm.l0"].filters_alive, rows["lstm.l1"].channels_alive) == (12, 12)
    assert rows["lstm.l0"].macs_dense == 4 * 16 * (28 + 16) * 28       # gates · H · (in + H) · steps
    assert rows["lstm.l0"].macs_sparse == 4 * 12 * (28 + 12) * 28


class _Stated(nn.Module):
    """A 2-layer RNN called with an explicit initial state taken from ``source``."""

    def __init__(self, source: str, rnn: type[nn.RNNBase] = nn.LSTM, keyword: bool = False):
        super().__init__()
        self.source, self.keyword, self.lstm = source, keyword, rnn is nn.LSTM
        self.rnn, self.fc = rnn(4, 5, num_layers=2, batch_first=True), nn.Linear(5, 3)
        if source == "parameter":
            self.h0, self.c0 = nn.Parameter(torch.randn(2, 1, 5)), nn.Parameter(torch.randn(2, 1, 5))
        elif source == "buffer":
            self.register_buffer("h0", torch.randn(2, 1, 5))
            self.register_buffer("c0", torch.randn(2, 1, 5))
        elif source == "encoder":                     # seq2seq: another RNN's final state
            self.enc = rnn(4, 5, num_layers=2, batch_first=True)

    def forward(self, x, h0=None, c0=None):
        n = x.shape[0]
        if self.source in ("parameter", "buffer"):
            h0, c0 = self.h0.expand(2, n, 5).contiguous(), self.c0.expand(2, n, 5).contiguous()
        elif self.source == "zeros":                  # a zero tensor whose width is a literal here
            h0 = c0 = x.new_zeros(2, n, 5)
        if self.source == "encoder":
            state = self.enc(x.flip(1))[1]
        else:
            state = (h0, c0) if self.lstm else h0
        out, _ = self.rnn(x, hx=state) if self.keyword else self.rnn(x, state)
        return self.fc(out[:, -1])


def _stated_inputs(source: str, lstm: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 4, generator=gen)
    if source != "input":
        return (x,)
    return (x, torch.randn(2, 3, 5, generator=gen)) + ((torch.randn(2, 3, 5, generator=gen),) if lstm else ())


def _silence_and_unread(rnn: nn.RNNBase, fc: nn.Linear | None, gates: int) -> None:
    """Unit 1: zero gate rows (silent only from a zero state); unit 3: zero columns (nobody reads it)."""
    with torch.no_grad():
        for layer in range(rnn.num_layers):
            for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(rnn, f"{w}_l{layer}")[[g * 5 + 1 for g in range(gates)]] = 0
            getattr(rnn, f"weight_hh_l{layer}")[:, 3] = 0
            if layer + 1 < rnn.num_layers:
                getattr(rnn, f"weight_ih_l{layer + 1}")[:, 3] = 0
        if fc is not None:
            fc.weight[:, 3] = 0


@pytest.mark.parametrize("source", ["parameter", "buffer", "input", "encoder", "zeros"])
@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_an_explicit_initial_state_pins_the_hidden_size(source, rnn):
    torch.manual_seed(0)
    model, gates = _Stated(source, rnn).eval(), 4 if rnn is nn.LSTM else 3
    inputs = _stated_inputs(source, rnn is nn.LSTM)
    kinds = ("hidden", "hidden_row", "hidden_col", "neuron")
    assert [g.name for g in structures(model, inputs, kinds=kinds) if g.name.startswith(("rnn", "enc"))] == []
    with pytest.raises(UnsupportedOperation, match=r"'rnn' is called with an explicit initial state: "
                                                   r"it pins the hidden size.*zero state"):
        structures(model, inputs, kinds=("hidden",), strict=True)
    _silence_and_unread(model.rnn, model.fc, gates)
    if source == "encoder":                           # the state's source keeps its width too
        _silence_and_unread(model.enc, None, gates)
    small = compact(model, inputs)                    # used to raise "Expected hidden[0] size ..."
    assert small.rnn.hidden_size == 5 and small.fc.in_features == 5
    assert source != "encoder" or small.enc.hidden_size == 5
    assert verify(model, small, inputs).ok


def test_an_explicit_state_by_keyword_pins_the_hidden_size_too():
    model, inputs = _Stated("parameter", keyword=True).eval(), _stated_inputs("parameter", True)
    assert structures(model, inputs, kinds=("hidden",)) == []
    with pytest.raises(UnsupportedOperation, match="explicit initial state"):
        structures(model, inputs, kinds=("hidden",), strict=True)


class _ZeroStart(nn.Module):
    """``forward(x, state=None)``: traced without a state, the RNN starts from zeros."""

    def __init__(self, explicit_none: bool):
        super().__init__()
        self.explicit_none = explicit_none
        self.rnn, self.fc = nn.LSTM(4, 5, num_layers=2, batch_first=True), nn.Linear(5, 3)

    def forward(self, x, state=None):
        out, _ = self.rnn(x, None) if self.explicit_none else self.rnn(x, state)
        return self.fc(out[:, -1])


@pytest.mark.parametrize("explicit_none", [False, True])
def test_a_state_that_is_none_is_a_zero_start(explicit_none):
    torch.manual_seed(0)
    model, x = _ZeroStart(explicit_none).eval(), torch.randn(3, 6, 4)
    assert len(structures(model, x, kinds=("hidden",), strict=True)) == 10
    _silence_and_unread(model.rnn, model.fc, 4)
    small = compact(model, x)
    assert small.rnn.hidden_size == 3
    assert verify(model, small, x).ok and verify(model, small, torch.randn(2, 9, 4)).ok


def test_per_layer_row_lstm_compacts_each_layer_to_its_own_width():
    from torchslim.models import create_model

    model = create_model("rowlstm", hidden_size=10, per_layer=True).eval()
    x = torch.randn(3, 1, 28, 28)
    groups = {g.name: g for g in structures(model, x, kinds=("hidden",), strict=True)}
    for k in (1, 4, 6):
        groups[f"layers.0.l0:hidden[{k}]"].zero_()
    groups["layers.1.l0:hidden[2]"].zero_()
    small = compact(model, x)
    assert [layer.hidden_size for layer in small.layers] == [7, 9] and small.fc.in_features == 9
    assert verify(model, small, x).ok
