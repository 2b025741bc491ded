"""Compacted Hugging Face models saved as Hugging Face checkpoints, with a config of the new widths."""

from __future__ import annotations

import pytest
import torch

from torchslim.deploy.hf import pretrained_config, save_pretrained
from torchslim.errors import ConfigError

tf = pytest.importorskip("transformers")


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=48, vocab_size=50, use_cache=False)
    return tf.LlamaForCausalLM(config).eval()


def _cut_mlp(model: torch.nn.Module, keep: list[int], layers: range) -> None:
    """What compaction does to MLP neurons: the same rows of gate and up, columns of down."""
    for i in layers:
        mlp = model.model.layers[i].mlp
        for lin, dim in ((mlp.gate_proj, 0), (mlp.up_proj, 0), (mlp.down_proj, 1)):
            lin.weight = torch.nn.Parameter(lin.weight.detach().index_select(dim, torch.tensor(keep)))
            lin.out_features, lin.in_features = lin.weight.shape


def test_an_uncut_model_keeps_its_config() -> None:
    model = _llama()
    config = pretrained_config(model)
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (32, 48, 4)


def test_uniform_cut_saves_and_loads_as_the_same_function(tmp_path) -> None:
    model = _llama()
    _cut_mlp(model, list(range(0, 48, 2)), range(2))
    save_pretrained(model, tmp_path)
    assert model.config.intermediate_size == 48  # the model's own config is left alone
    loaded = tf.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.intermediate_size == 24
    ids = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_layers_of_different_widths_are_refused_with_the_way_out(tmp_path) -> None:
    model = _llama()
    _cut_mlp(model, list(range(24)), range(1))  # layer 0 only
    with pytest.raises(ConfigError, match="layers.1.mlp.gate_proj.weight.*save_compact"):
        save_pretrained(model, tmp_path)


def test_a_model_without_a_hf_model_inside_is_refused() -> None:
    with pytest.raises(ConfigError, match="no Hugging Face model"):
        pretrained_config(torch.nn.Linear(2, 2))


class _Logits(torch.nn.Module):
    """``forward(ids) -> logits``: what tracing and compaction see of a causal LM."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, use_cache=False, bos_token_id=0,
                           eos_token_id=0)
    return tf.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("build", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_heads_neurons_and_width_cut_round_trip_through_save_compact(build, tmp_path) -> None:
    from torchslim import compact, load_compact, save_compact, structures

    model, ids = _Logits(build()), torch.randint(0, 50, (2, 7))
    groups = structures(model, ids, kinds=("neuron", "head", "embed"))
    assert {g.kind for g in groups} == {"neuron", "head", "embed"}
    for g in groups[::3]:
        g.zero_()
    small = compact(model, ids)
    save_compact(small, tmp_path / "small.pt")
    loaded = load_compact(tmp_path / "small.pt", model=_Logits(build()))  # head counts, epsilons, norm widths
    fresh = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(loaded(fresh), small(fresh))
    torch.testing.assert_close(loaded(fresh), model(fresh), atol=1e-5, rtol=1e-4)


def test_llama_with_whole_kv_heads_and_neurons_cut_saves_as_a_pretrained_model(tmp_path) -> None:
    from torchslim import compact, structures

    model, ids = _Logits(_llama()), torch.randint(0, 50, (2, 7))
    groups = structures(model, ids, kinds=("neuron", "head"))
    for g in groups:  # the same members in every layer: one config describes them
        if (g.kind == "head" and g.index == 1) or (g.kind == "neuron" and g.index % 4 == 0):
            g.zero_()
    small = compact(model, ids)
    save_pretrained(small, tmp_path)
    loaded = tf.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    c = loaded.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (2, 1, 36)
    torch.testing.assert_close(loaded(ids).logits, small(ids))
