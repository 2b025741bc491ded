"""Word LM: truncated BPTT trains, perplexity is measured, and ISS compacts the tied model exactly."""

from __future__ import annotations

import pytest
import torch

from torchslim import compact, structures, verify
from torchslim.data import batchify
from torchslim.errors import ConfigError
from torchslim.models import create_model
from torchslim.train.lm import evaluate_lm, train_lm_epoch
from torchslim.train.loop import Regularizers

pytestmark = pytest.mark.usefixtures("one_thread")


def _corpus(n: int = 3000) -> torch.Tensor:
    """A learnable toy language: a fixed cycle of 7 words with one random word in 10."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.arange(n) % 7
    noise = torch.rand(n, generator=gen) < 0.1
    return torch.where(noise, torch.randint(0, 12, (n,), generator=gen), ids)


def test_bptt_training_lowers_perplexity_below_the_unigram_rate():
    torch.manual_seed(0)
    model = create_model("wordlm", vocab_size=12, hidden_size=16, dropout=0.0)
    data = batchify(_corpus(), 8)                                   # (375, 8)
    before = evaluate_lm(model, data, bptt=10)
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    for _ in range(4):
        loss, acc = train_lm_epoch(model, opt, data, bptt=10, lr=lambda i: 10.0,
                                   regularizers=Regularizers(grad_clip=0.5))
    after = evaluate_lm(model, data, bptt=10)
    assert before > 10 and after < 3 and loss < 1.5 and acc > 0.8                  # 12 words; the cycle is predictable


def test_iss_compacts_a_tied_word_lm_exactly():
    torch.manual_seed(0)
    model = create_model("wordlm", vocab_size=30, hidden_size=12).eval()
    x = torch.randint(0, 30, (9, 4), generator=torch.Generator().manual_seed(1))
    groups = {g.name: g for g in structures(model, x, kinds=("hidden",), strict=True)}
    assert {g.split(":")[0] for g in groups} == {"lstm.l0", "encoder+1"}   # the last layer is tied to the table
    for k in (2, 5, 7):
        groups[f"lstm.l0:hidden[{k}]"].zero_()
        groups[f"encoder+1:hidden[{k}]"].zero_()
    small = compact(model, x)
    assert small.lstm.hidden_size == 9 and small.encoder.embedding_dim == 9
    assert small.decoder.weight is small.encoder.weight
    assert verify(model, small, x).ok
    data = batchify(torch.randint(0, 30, (200,), generator=torch.Generator().manual_seed(2)), 4)
    assert evaluate_lm(small, data, bptt=7) == pytest.approx(evaluate_lm(model, data, bptt=7), rel=1e-5)


def test_bad_data_shape_is_a_config_error():
    model = create_model("wordlm", vocab_size=5, hidden_size=4)
    with pytest.raises(ConfigError, match=r"\(T, B\)"):
        train_lm_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.arange(10), lr=lambda i: 0.1)


def test_arch_rebuilds_the_same_lm():
    model = create_model("wordlm", vocab_size=50, hidden_size=8)
    twin = create_model(model.arch["name"], **model.arch["kwargs"])
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    traced = torch.fx.symbolic_trace(model.eval())
    x = torch.randint(0, 50, (5, 2))
    torch.testing.assert_close(traced(x), model(x))


def test_per_layer_lm_compacts_each_layer_to_its_own_width():
    torch.manual_seed(0)
    model = create_model("wordlm", vocab_size=30, hidden_size=12, per_layer=True).eval()
    x = torch.randint(0, 30, (9, 4), generator=torch.Generator().manual_seed(1))
    groups = {g.name: g for g in structures(model, x, kinds=("hidden",), strict=True)}
    assert {g.split(":")[0] for g in groups} == {"layers.0.l0", "encoder+1"}
    for k in (2, 5, 7):
        groups[f"layers.0.l0:hidden[{k}]"].zero_()
    groups["encoder+1:hidden[4]"].zero_()
    small = compact(model, x)
    assert [layer.hidden_size for layer in small.layers] == [9, 11] and small.encoder.embedding_dim == 11
    assert small.decoder.weight is small.encoder.weight
    assert verify(model, small, x).ok
    data = batchify(torch.randint(0, 30, (200,), generator=torch.Generator().manual_seed(2)), 4)
    assert evaluate_lm(small, data, bptt=7) == pytest.approx(evaluate_lm(model, data, bptt=7), rel=1e-5)
    opt = torch.optim.SGD(small.parameters(), lr=0.5)
    loss, _ = train_lm_epoch(small, opt, data, bptt=7, lr=lambda i: 0.5)   # carries a list of states
    assert loss > 0


def test_per_layer_widths_build_the_shape_iss_leaves():
    model = create_model("wordlm", vocab_size=30, hidden_size=[7, 5], per_layer=True)
    assert [(m.input_size, m.hidden_size) for m in model.layers] == [(5, 7), (7, 5)]
    assert model(torch.randint(0, 30, (6, 2))).shape == (6, 2, 30)
    with pytest.raises(ConfigError, match="per_layer"):
        create_model("wordlm", vocab_size=30, hidden_size=[7, 5])
