"""A registry of the models the paper's experiments use, built only from ``torch.nn`` layers.

Each entry point states only what differs; :func:`create_model` records how a model was built in
``model.arch`` (``{"name": ..., "kwargs": {...}}``, JSON-able) so a checkpoint can rebuild it::

    model = create_model("resnet20", num_classes=10)
    twin = create_model(model.arch["name"], **model.arch["kwargs"])
"""

from __future__ import annotations

from torch import nn

from torchslim.models.lenet import LeNet
from torchslim.models.mlp import MLP
from torchslim.models.registry import create_model, list_models, register_model
from torchslim.models.resnet import BasicBlock, CifarResNet

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "LeNet",
    "MLP",
    "create_model",
    "list_models",
    "register_model",
]

@register_model("lenet")
def lenet(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> LeNet:
    """Caffe's LeNet (20-50-500), no ReLU after the convolutions."""
    return LeNet(num_classes, in_channels, input_size)


@register_model("mlp")
def mlp(
    num_classes: int = 10, in_channels: int = 1, input_size: int = 28, hidden: tuple[int, int] = (500, 300)
) -> MLP:
    """784-500-300-10 with ReLUs."""
    return MLP(num_classes, in_channels, input_size, tuple(hidden))


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 1) -> CifarResNet:
    """ResNet-20: three stages of three BasicBlocks (16/32/64 channels)."""
    return CifarResNet(20, num_classes, in_channels)


@register_model("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 1) -> CifarResNet:
    """ResNet-32: three stages of five BasicBlocks (16/32/64 channels)."""
    return CifarResNet(32, num_classes, in_channels)


from torchslim.models import fc as _fc  # noqa: E402,F401  registers "fcnet"


@register_model("rowlstm")
def rowlstm(num_classes: int = 10, input_size: int = 28, hidden_size: int = 128, num_layers: int = 2,
            dropout: float = 0.0, per_layer: bool = False) -> nn.Module:
    """An LSTM over image rows (sequential Fashion-MNIST), for ISS (``per_layer``: one nn.LSTM per layer)."""
    from torchslim.models.rnn import RowLSTM

    return RowLSTM(num_classes, input_size, hidden_size, num_layers, dropout, per_layer)


@register_model("wordlm")
def wordlm(vocab_size: int = 10_002, hidden_size: int | list[int] = 200, num_layers: int = 2, dropout: float = 0.2,
           tie_weights: bool = True, per_layer: bool = False) -> nn.Module:
    """A PTB-style word LSTM language model, for ISS (``per_layer``: one nn.LSTM per layer)."""
    from torchslim.models.wordlm import WordLM

    return WordLM(vocab_size, hidden_size, num_layers, dropout, tie_weights, per_layer)


@register_model("gpt")
def gpt(vocab_size: int = 10_002, width: int = 256, n_layer: int = 6, n_head: int | list[int] = 8, head_dim: int = 32,
        d_ff: int | list[int] = 1024, block_size: int = 64, dropout: float = 0.1) -> nn.Module:
    """A small GPT-2-style decoder (pre-norm, learned positions, tied head), for SSL on heads, neurons and width."""
    from torchslim.models.gpt import GPT

    return GPT(vocab_size, width, n_layer, n_head, head_dim, d_ff, block_size, dropout)


@register_model("vit")
def vit(num_classes: int = 10, in_channels: int = 1, input_size: int = 28, patch: int = 4, width: int = 128,
        n_layer: int = 4, n_head: int | list[int] = 4, head_dim: int = 32, d_ff: int | list[int] = 256,
        dropout: float = 0.0) -> nn.Module:
    """A small ViT (patch 4, class token), for SSL on heads, neurons and width on Fashion-MNIST."""
    from torchslim.models.vit import ViT

    return ViT(num_classes, in_channels, input_size, patch, width, n_layer, n_head, head_dim, d_ff, dropout)
