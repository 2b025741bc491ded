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
