"""The small GPT: shapes, per-block sizes, the word-LM interface, greedy generation."""

from __future__ import annotations

import pytest
import torch

from torchslim.errors import ConfigError
from torchslim.models import create_model


def _tiny(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=50, width=16, n_layer=2, n_head=2, head_dim=4, d_ff=32, block_size=12, dropout=0.0)
    return create_model("gpt", **{**args, **kw}).eval()


def test_sequence_first_logits_and_step() -> None:
    model, tokens = _tiny(), torch.randint(0, 50, (10, 3))
    logits, state = model.step(tokens)
    assert logits.shape == (10, 3, 50) and state is None
    torch.testing.assert_close(logits, model(tokens))


def test_causal_a_token_sees_only_its_past() -> None:
    model, tokens = _tiny(), torch.randint(0, 50, (8, 1))
    changed = tokens.clone()
    changed[5] = (changed[5] + 1) % 50
    torch.testing.assert_close(model(tokens)[:5], model(changed)[:5])
    assert not torch.allclose(model(tokens)[5:], model(changed)[5:])


def test_per_block_heads_and_neurons() -> None:
    model = _tiny(n_head=[3, 1], d_ff=[8, 24])
    assert [b.attn.q.out_features for b in model.blocks] == [12, 4]
    assert [b.fc.out_features for b in model.blocks] == [8, 24]
    assert model(torch.randint(0, 50, (6, 2))).shape == (6, 2, 50)
    assert model.head.weight is model.wte.weight
    with pytest.raises(ConfigError, match="one per layer"):
        _tiny(n_head=[2, 2, 2])


def test_generate_is_greedy_and_cuts_the_context() -> None:
    model = _tiny()
    out = model.generate(torch.tensor([1, 2, 3]), 15)  # longer than block_size
    assert out.shape == (18,) and out[:3].tolist() == [1, 2, 3]
    assert out[3] == model(out[:3, None])[-1, 0].argmax()


def test_trains_in_the_word_lm_loop_without_a_state() -> None:
    from torchslim.train.lm import evaluate_lm, train_lm_epoch

    model, data = _tiny(), torch.randint(0, 50, (40, 4))
    before = evaluate_lm(model, data, bptt=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        train_lm_epoch(model, optimizer, data, bptt=10, lr=lambda i: 1e-2)
    assert evaluate_lm(model, data, bptt=10) < before


def test_heads_neurons_and_width_compact_exactly_into_a_smaller_gpt() -> None:
    from torchslim import compact, structures

    model, tokens = _tiny(n_head=3), torch.randint(0, 50, (8, 2))
    groups = structures(model, tokens, kinds=("head", "neuron", "embed"), strict=True)
    by_kind = {k: [g for g in groups if g.kind == k] for k in ("head", "neuron", "embed")}
    assert [len(by_kind[k]) for k in ("head", "neuron", "embed")] == [6, 64, 16]
    for g in (by_kind["head"][0], by_kind["neuron"][5], by_kind["embed"][3], by_kind["embed"][9]):
        g.zero_()
    small = compact(model, tokens, strict=True)
    assert small.wte.embedding_dim == 14 and small.head.weight is small.wte.weight
    assert [b.attn.q.out_features // 4 for b in small.blocks] == [2, 3]
    assert [b.fc.out_features for b in small.blocks] == [31, 32]
    fresh = torch.randint(0, 50, (8, 2))
    torch.testing.assert_close(small(fresh), model(fresh), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.generate(fresh[:3, 0], 4), model.generate(fresh[:3, 0], 4))
