"""The public model list of ``zoo_timm_hf.py``: timm models of every family and Hugging Face transformers.

Every model is built from its configuration with random weights (no download): the smallest variant of
each timm family with ``num_classes=10`` at a small input (64×64 where the model allows it, else its
minimum), and GPT-2, BERT, LLaMA and Qwen2 from small configs (2 layers, hidden 64, 4 heads, 2 key/value
heads where the architecture has grouped-query attention, vocabulary 1000) on ``input_ids`` of shape
``(2, 16)``. A Hugging Face model is wrapped so that ``forward(input_ids)`` returns a tensor (its logits).

timm and transformers are imported only when a model is built: the list itself needs neither.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["HF_MODELS", "MODELS", "TIMM_MODELS", "Zoo", "build"]


@dataclass(frozen=True)
class Zoo:
    """One model of the list: where it comes from, its family, how to build it and its input."""

    name: str
    family: str  # "cnn", "vit", "hybrid", "mlp" or "transformer" (Hugging Face)
    source: str = "timm"  # "timm" or "hf"
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments of timm.create_model
    size: int = 64  # input height and width (timm)


def _cnn(name: str, size: int = 64, **kwargs: Any) -> Zoo:
    return Zoo(name, "cnn", size=size, kwargs=kwargs)


def _vit(name: str, size: int = 64, family: str = "vit", **kwargs: Any) -> Zoo:
    """A transformer whose position embedding or windows fix the input: built for ``size`` (``img_size``)."""
    return Zoo(name, family, size=size, kwargs={"img_size": size, **kwargs})


TIMM_MODELS: list[Zoo] = [
    # classic and mobile CNNs
    _cnn("resnet18"), _cnn("resnet50"), _cnn("resnet18d"), _cnn("seresnet18"), _cnn("resnext26ts"),
    _cnn("skresnet18"), _cnn("resnest14d"), _cnn("resnetv2_50"), _cnn("densenet121"),
    _cnn("inception_v3", 75), _cnn("inception_v4", 75), _cnn("legacy_xception", 71), _cnn("vgg11_bn"),
    _cnn("regnetx_002"), _cnn("regnety_002"), _cnn("regnetz_b16"), _cnn("repvgg_a0"), _cnn("cspresnet50"),
    _cnn("cspdarknet53"), _cnn("cs3darknet_s"), _cnn("darknet17"), _cnn("dpn48b"), _cnn("res2net50_14w_8s"),
    _cnn("res2next50"), _cnn("nf_resnet26"), _cnn("nfnet_l0"), _cnn("dla34"), _cnn("hrnet_w18_small"),
    _cnn("ese_vovnet19b_dw"), _cnn("selecsls42b"), _cnn("gernet_s"), _cnn("gcresnet33ts"), _cnn("eca_resnet33ts"),
    _cnn("efficientnet_b0"), _cnn("efficientnet_lite0"), _cnn("tf_efficientnetv2_b0"), _cnn("mixnet_s"),
    _cnn("mobilenetv2_050"), _cnn("mobilenetv3_small_050"), _cnn("mobilenetv4_conv_small"), _cnn("mnasnet_small"),
    _cnn("fbnetc_100"), _cnn("hardcorenas_a"), _cnn("lcnet_050"), _cnn("tinynet_e"), _cnn("rexnet_100"),
    _cnn("ghostnet_050"), _cnn("ghostnetv2_100"), _cnn("repghostnet_050"), _cnn("mobileone_s0"),
    _cnn("hgnetv2_b0"), _cnn("starnet_s050"),
    # CNNs whose channels are normalized over the channel axis (LayerNorm / GroupNorm coupling)
    _cnn("convnext_atto"), _cnn("convnextv2_atto"), _cnn("inception_next_tiny"), _cnn("poolformer_s12"),
    _cnn("mambaout_femto"),
    # vision transformers
    _vit("vit_tiny_patch16_224"), _vit("deit_tiny_patch16_224"), _vit("deit_tiny_distilled_patch16_224"),
    _vit("cait_xxs24_224"), _vit("xcit_nano_12_p16_224"), _vit("eva02_tiny_patch14_224", 56),
    _vit("pit_ti_224", 64), _vit("swin_tiny_patch4_window7_224", 224), Zoo("pvt_v2_b0", "vit"),
    _vit("twins_pcpvt_small", 64), _vit("crossvit_tiny_240", 240), _vit("mvitv2_tiny", 224, family="vit"),
    # hybrids (convolution and attention); LeViT at 128 px: at 64 its last stage runs on one token
    Zoo("mobilevit_xxs", "hybrid"), Zoo("mobilevitv2_050", "hybrid"), _vit("levit_128s", 128, family="hybrid"),
    _vit("coat_lite_tiny", 64, family="hybrid"), _vit("coatnet_nano_rw_224", 64, family="hybrid"),
    _vit("maxvit_nano_rw_256", 64, family="hybrid"), Zoo("efficientvit_b0", "hybrid"),
    _vit("efficientvit_m0", 64, family="hybrid"), _vit("convit_tiny", 64, family="hybrid"),
    Zoo("tiny_vit_5m_224", "hybrid"), Zoo("fastvit_t8", "hybrid"), Zoo("repvit_m0_9", "hybrid"),
    Zoo("edgenext_xx_small", "hybrid"), Zoo("efficientformer_l1", "hybrid", size=224),
    # MLP mixers
    _vit("mixer_s32_224", 64, family="mlp"), _vit("resmlp_12_224", 64, family="mlp"),
    _vit("gmlp_ti16_224", 64, family="mlp"), _vit("gmixer_12_224", 64, family="mlp"),
    Zoo("sequencer2d_s", "mlp"),
]

# small configs: 2 layers, hidden 64, 4 heads (2 key/value heads with grouped-query attention), vocabulary 1000
HF_MODELS: list[Zoo] = [
    Zoo("gpt2", "transformer", "hf", {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 64,
                                      "vocab_size": 1000, "bos_token_id": 0, "eos_token_id": 0}),
    Zoo("bert", "transformer", "hf", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                      "intermediate_size": 256, "vocab_size": 1000, "max_position_embeddings": 64,
                                      "num_labels": 10}),
    Zoo("llama", "transformer", "hf", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                       "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 1000,
                                       "max_position_embeddings": 64}),
    Zoo("qwen2", "transformer", "hf", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                       "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 1000,
                                       "max_position_embeddings": 64}),
]

MODELS: list[Zoo] = TIMM_MODELS + HF_MODELS


class Logits(nn.Module):
    """A Hugging Face model whose ``forward(input_ids)`` returns the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def _hf(spec: Zoo) -> nn.Module:
    import transformers as tf

    classes = {"gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel), "bert": (tf.BertConfig, tf.BertForSequenceClassification),
               "llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}
    config_cls, model_cls = classes[spec.name]
    return Logits(model_cls(config_cls(**spec.kwargs)))


def build(spec: Zoo, seed: int = 0) -> tuple[nn.Module, torch.Tensor, Callable[[], torch.Tensor]]:
    """``(model in eval mode, example input, a function drawing a fresh input of that shape)``, seeded.

    timm models get random BatchNorm statistics, so that a zeroed channel's BatchNorm still adds a
    non-zero bias (as in a trained network).
    """
    torch.manual_seed(seed)
    if spec.source == "hf":
        model = _hf(spec)
        vocab = spec.kwargs["vocab_size"]
        fresh = lambda: torch.randint(0, vocab, (2, 16))
    else:
        import timm

        model = timm.create_model(spec.name, pretrained=False, num_classes=10, **spec.kwargs)
        _randomize_norm_stats(model)
        fresh = lambda: torch.randn(2, 3, spec.size, spec.size)
    return model.eval(), fresh(), fresh


@torch.no_grad()
def _randomize_norm_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            if m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
