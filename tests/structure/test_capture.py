"""Graph capture: torch.fx first, torch.export where fx cannot trace (Hugging Face transformers, shape-dependent
forwards), with the aten ops taking the rules of their functional equivalents."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from nets import MLP, TinyLeNet, TinyResNet, randomize_bn
from torch import nn

from torchslim import ConfigError, UnsupportedOperation, compact, register_op, structures
from torchslim.errors import UnknownOpWarning
from torchslim.structure.capture import capture

transformers = pytest.importorskip("transformers")

VOCAB, IDS = 128, (1, 8)
_SMALL = {"vocab_size": VOCAB, "use_cache": False}  # use_cache=False: the forward returns tensors, no cache object
_LLAMA = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 96, "max_position_embeddings": 16, **_SMALL}
# name: (config class, model class, config, FFN producer of layer i, FFN width)
HF = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 16,
                                               "bos_token_id": 0, "eos_token_id": 0, **_SMALL},
             "transformer.h.{}.mlp.c_fc", 256),
    "bert": ("BertConfig", "BertForSequenceClassification",
             {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96,
              "max_position_embeddings": 16, "num_labels": 3, **_SMALL},
             "bert.encoder.layer.{}.intermediate.dense", 96),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA, "model.layers.{}.mlp.gate_proj+1", 96),  # + up_proj
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA, "model.layers.{}.mlp.gate_proj+1", 96),
}


def _hf(name: str) -> nn.Module:
    config_cls, model_cls, config = HF[name][:3]
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()


def _quiet_structures(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOpWarning)  # attention and norms may pin channels: not tested here
        return structures(model, x, **kw)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", list(HF))
def test_hf_transformer_is_captured_by_export_and_its_ffn_neurons_compact_exactly(name, one_thread):
    model, ids = _hf(name), torch.randint(0, VOCAB, IDS)
    with pytest.raises(UnsupportedOperation, match="torch.fx could not trace"):
        structures(model, ids, kinds=("neuron",), capture="fx")
    groups = _quiet_structures(model, ids, kinds=("neuron",))
    sizes = {g.family.label: g.family.size for g in groups}
    producer, width = HF[name][3:]
    assert all(sizes.get(producer.format(i)) == width for i in range(2)), sizes
    ffn = [g for g in groups if g.family.label in {producer.format(i) for i in range(2)}]
    gen = torch.Generator().manual_seed(0)
    for g in ffn:
        if torch.rand(1, generator=gen) < 0.3:
            g.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOpWarning)
        small = compact(model, ids)  # verifies on ids
    assert _n_params(small) < _n_params(model)
    fresh = torch.randint(0, VOCAB, (2, 8))
    torch.testing.assert_close(_logits(small, fresh), _logits(model, fresh), rtol=1e-5, atol=1e-5)


def test_capture_of_gpt2_is_fast_and_keeps_the_model(one_thread):
    model = _hf("gpt2").train()
    before = {n: p for n, p in model.named_parameters()}
    t0 = time.perf_counter()
    gm = capture(model, (torch.randint(0, VOCAB, IDS),))
    seconds = time.perf_counter() - t0
    assert seconds < 15, f"capture took {seconds:.1f} s"  # ~0.5 s alone; generous for a shared CPU
    assert model.training and all(m.training for m in model.modules())  # every flag back
    weights = {str(n.target): gm.get_parameter(str(n.target)) for n in gm.graph.nodes
               if n.op == "get_attr" and str(n.target) in before}
    assert weights and all(w is before[n] for n, w in weights.items())  # the model's own tensors, not copies
    assert all(p is before[n] for n, p in model.named_parameters())
    assert not any(n.op == "call_module" for n in gm.graph.nodes)  # export's guard call is gone


class _ShapeBranch(nn.Module):
    """A forward that branches on a shape: torch.fx cannot trace it, torch.export specializes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.mix, self.fc = nn.Conv1d(6, 5, 1), nn.Linear(5, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        if x.shape[-1] > 4:
            y = nn.functional.max_pool2d(y, 2)
        y = self.up(y).flatten(2)            # (B, 6, L)
        y = self.mix(y).permute(0, 2, 1)     # (B, L, 5)
        return self.fc(y).mean(1)


def test_shape_dependent_control_flow_is_captured_by_export():
    net, x = randomize_bn(_ShapeBranch()).eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(UnsupportedOperation, match="torch.fx could not trace.*capture='auto'"):
        structures(net, x, capture="fx")
    groups = structures(net, x, strict=True)
    assert {g.family.label: g.family.size for g in groups} == {"conv": 8, "up": 6, "mix": 5}
    for g in groups[::2]:
        g.zero_()
    small = compact(net, x, strict=True)
    assert (small.conv.out_channels, small.up.out_channels, small.mix.out_channels) == (4, 3, 2)
    fresh = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(small(fresh), net(fresh), rtol=1e-5, atol=1e-5)


def test_a_model_neither_can_capture_gets_both_reasons():
    class _ValueBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return y * 2 if y.sum() > 0 else y  # on the values: neither capture can follow it

    with pytest.raises(UnsupportedOperation, match=r"neither torch.fx nor torch.export.*torch.fx: .*torch.export: "):
        structures(_ValueBranch(), torch.randn(1, 3, 4, 4))
    with pytest.raises(ConfigError, match="capture must be one of"):
        structures(_ValueBranch(), torch.randn(1, 3, 4, 4), capture="jit")


@pytest.mark.parametrize("net, shape", [(TinyLeNet(), (2, 1, 28, 28)), (randomize_bn(TinyResNet()), (2, 1, 16, 16)),
                                        (MLP(), (2, 4, 4, 4))], ids=["lenet", "resnet", "mlp"])
def test_export_finds_the_groups_fx_finds_and_compacts_exactly(net, shape):
    net, x = net.eval(), torch.randn(shape)
    families = {(g.family.label, g.family.kind, g.family.size) for g in structures(net, x, capture="fx")}
    groups = structures(net, x, capture="export", strict=True)
    assert {(g.family.label, g.family.kind, g.family.size) for g in groups} == families
    for g in groups[::3]:
        g.zero_()
    small = compact(net, x, capture="export", strict=True)
    assert _n_params(small) < _n_params(net)
    fresh = torch.randn(shape)
    torch.testing.assert_close(small(fresh), net(fresh), rtol=1e-5, atol=1e-5)


class _SplitTokens(nn.Module):
    """Embedding → one projection cut by ``chunk(2)``, each half read by its own layer: aten's embedding, chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.up = nn.Embedding(VOCAB, 16), nn.Linear(16, 2 * 24)
        self.left, self.right, self.head = nn.Linear(24, 16), nn.Linear(24, 16), nn.Linear(16, VOCAB)

    def forward(self, ids):
        a, b = self.up(self.embed(ids)).chunk(2, dim=-1)
        return self.head(self.left(torch.relu(a)) + self.right(torch.relu(b)))


def test_aten_embedding_and_chunk_follow_the_module_rules():
    net, ids = _SplitTokens().eval(), torch.randint(0, VOCAB, IDS)
    by_fx = {(g.family.label, g.family.size) for g in structures(net, ids, capture="fx")}
    groups = structures(net, ids, capture="export", strict=True)
    assert {(g.family.label, g.family.size) for g in groups} == by_fx == {("embed", 16), ("up", 48), ("left+1", 16)}
    for g in groups[::2]:
        g.zero_()
    small = compact(net, ids, capture="export", strict=True)  # the chunk's tie: both halves keep one width
    assert small.left.in_features == small.right.in_features == small.up.out_features // 2 < 24
    fresh = torch.randint(0, VOCAB, (2, 8))
    torch.testing.assert_close(small(fresh), net(fresh), rtol=1e-5, atol=1e-5)


def test_registrations_on_aten_overloads_and_on_functional_equivalents_apply():
    net, x = randomize_bn(_ShapeBranch()).eval(), torch.randn(2, 3, 8, 8)
    with register_op(torch.ops.aten.relu.default, "opaque"):      # on the overload itself: it wins
        assert "conv" not in {g.family.label for g in structures(net, x, strict=True)}
    with register_op(torch.permute, "opaque"):                    # on the functional form: aten.permute too
        assert "mix" not in {g.family.label for g in structures(net, x, strict=True)}
    assert {g.family.label for g in structures(net, x, strict=True)} == {"conv", "up", "mix"}  # undone


def test_an_unknown_aten_op_is_named_as_register_op_takes_it():
    class _Rolled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(torch.roll(self.a(x), 1, 1))

    net, x = _Rolled(), torch.randn(1, 3, 4, 4)
    with pytest.raises(UnsupportedOperation, match=r"aten\.roll\.default at .*register_op\(torch\.ops\.aten\.roll"):
        structures(net, x, capture="export", strict=True)
    with pytest.warns(UnknownOpWarning, match=r"aten\.roll\.default at 'roll' in the model's own forward: 4 channels"):
        assert structures(net, x, capture="export") == []
    with register_op(torch.ops.aten.roll, "opaque"):              # the packet: every overload
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnknownOpWarning)
            assert structures(net, x, capture="export") == []


def test_a_kv_cache_is_left_out_of_the_capture_and_the_config_restored():
    config_cls, model_cls, config = HF["llama"][:3]
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**config, "use_cache": True})).eval()
    ids = torch.randint(0, VOCAB, IDS)
    groups = structures(model, ids, kinds=("head",), strict=True)  # the cache's torch.cat would pin every head
    assert len(groups) == 4 and model.config.use_cache is True  # 2 layers of 2 key/value heads
    groups[1].zero_()
    small = compact(model, ids, strict=True)
    assert small.config.use_cache is True
    torch.testing.assert_close(_logits(small, ids), _logits(model, ids))
