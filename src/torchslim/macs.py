"""Multiply-accumulates (MACs) of a model on example inputs.

MACs are counted by forward hooks on leaf modules during one forward pass, per sample (the batch's
total divided by the batch size). Counted layers and their MACs per call, with ``B`` the batch:

- ``Conv1d/2d/3d``: ``(C_in/groups * kh * kw) * out.numel()``, i.e. ``N * C/g * kh * kw * H' * W' * B``.
- ``ConvTranspose``: ``(C_out/groups * kh * kw) * in.numel()``.
- ``Linear``: ``in_features * out.numel()``.
- ``LoweredConv2d``: ``K * out.numel()``, i.e. ``N * K * L * B`` with ``L = H' * W'``.
- ``LSTM/GRU/RNN``: ``gates * hidden * (input + hidden) * T * B`` per layer and direction.

Everything else (BatchNorm, activations, pooling, padding) counts zero: those are memory-bound and
BatchNorm folds into the preceding conv at deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from torchslim._inputs import Inputs, as_tuple, eval_mode
from torchslim.layers import LoweredConv2d


@dataclass(frozen=True)
class LayerProfile:
    """One leaf module as it ran: its MACs per sample summed over all its calls."""

    name: str                       # qualified name, e.g. "layer1.0.conv1.1"
    type: str                       # class name, e.g. "Conv2d"
    params: int
    macs: int                       # per sample
    out_shape: tuple[int, ...]      # of its last call, batch included


_RNN_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


def _first_tensor(out: Any) -> Tensor | None:
    """The first tensor in a module's output (an LSTM returns ``(out, (h, c))``)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, nn.utils.rnn.PackedSequence):
        return out.data
    if isinstance(out, (tuple, list)):
        for item in out:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _rnn_macs(rnn: nn.RNNBase, x: Tensor | nn.utils.rnn.PackedSequence) -> int:
    """Total MACs of an RNN over its input: ``gates * H * (in + H_rec) * steps`` per layer and direction."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        steps = x.data.shape[0]  # sum of sequence lengths over the batch
    elif x.dim() == 2:
        steps = x.shape[0]  # unbatched (T, in)
    else:
        steps = x.shape[0] * x.shape[1]  # T * B in either layout
    gates = _RNN_GATES.get(type(rnn), 1)
    dirs = 2 if rnn.bidirectional else 1
    h_rec = rnn.proj_size if getattr(rnn, "proj_size", 0) else rnn.hidden_size
    per_step = 0
    for layer in range(rnn.num_layers):
        inp = rnn.input_size if layer == 0 else h_rec * dirs
        per_step += gates * rnn.hidden_size * (inp + h_rec)
        if h_rec != rnn.hidden_size:
            per_step += rnn.hidden_size * h_rec  # LSTM projection weight_hr: (proj_size, hidden_size)
    return per_step * dirs * steps


def _layer_macs(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> int:
    """Total MACs of one call of ``module`` over the whole batch (0 for uncounted layers)."""
    if isinstance(module, LoweredConv2d):
        return module.weight.shape[1] * out.numel()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return module.weight[0].numel() * args[0].numel()
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.weight[0].numel() * out.numel()
    if isinstance(module, nn.Linear):
        return module.in_features * out.numel()
    if isinstance(module, nn.RNNBase) and args:
        return _rnn_macs(module, args[0])
    return 0


class MacCounter:
    """Forward hooks on every leaf module that accumulate MACs, in call order."""

    def __init__(self, model: nn.Module) -> None:
        self.macs: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.modules: dict[str, nn.Module] = {}
        self._handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in model.named_modules()
            if not any(True for _ in module.children()) or isinstance(module, LoweredConv2d)
        ]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            first = _first_tensor(out)
            macs = _layer_macs(module, args, first) if first is not None else 0
            self.macs[name] = self.macs.get(name, 0) + macs
            self.shapes[name] = tuple(first.shape) if first is not None else ()
            self.modules[name] = module

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def layers(self, batch_size: int) -> tuple[LayerProfile, ...]:
        return tuple(
            LayerProfile(
                name=name,
                type=type(self.modules[name]).__name__,
                params=sum(p.numel() for p in self.modules[name].parameters()),
                macs=total // batch_size,
                out_shape=self.shapes[name],
            )
            for name, total in self.macs.items()
        )


def count_macs(model: nn.Module, inputs: Inputs, batch_dim: int = 0) -> int:
    """MACs per sample of one forward pass of ``model`` on ``inputs`` (eval mode, no autograd).

    The model's training flags are restored afterwards; ``batch_dim`` of the first input is the batch.
    """
    inputs = as_tuple(inputs)
    counter = MacCounter(model)
    try:
        with eval_mode(model), torch.inference_mode():
            model(*inputs)
    finally:
        counter.remove()
    return sum(layer.macs for layer in counter.layers(int(inputs[0].shape[batch_dim])))
