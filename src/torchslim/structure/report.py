"""Sparsity per layer and kind: what SSL has zeroed and what compaction will save."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from torchslim._inputs import Inputs, as_tuple
from torchslim.structure.groups import Group, zero_counts


@dataclass(frozen=True)
class LayerSparsity:
    """One Conv2d/Linear: live rows (filters/neurons), input channels and shape fibers (lowered columns).

    ``macs_sparse`` counts only live rows × live columns of the lowered weight ``W: (N, C·kh·kw)``,
    the multiply-adds a compacted (``shapes="lowered"``) layer performs per sample.
    """

    name: str
    type: str
    filters_alive: int
    filters_total: int
    channels_alive: int
    channels_total: int
    shape_alive: int
    shape_total: int
    macs_dense: int
    macs_sparse: int


@dataclass(frozen=True)
class SparsityReport:
    layers: tuple[LayerSparsity, ...]
    groups: dict[str, tuple[int, int]]  # kind -> (zero groups, all groups)

    @property
    def macs_dense(self) -> int:
        return sum(layer.macs_dense for layer in self.layers)

    @property
    def macs_sparse(self) -> int:
        return sum(layer.macs_sparse for layer in self.layers)

    def format(self) -> str:
        head = f"{'layer':<22}{'type':<8}{'filters':>11}{'channels':>11}{'shape':>13}{'MACs kept':>11}"
        lines = [head, "-" * len(head)]
        for s in self.layers:
            kept = s.macs_sparse / s.macs_dense if s.macs_dense else 1.0
            lines.append(
                f"{s.name:<22}{s.type:<8}{f'{s.filters_alive}/{s.filters_total}':>11}"
                f"{f'{s.channels_alive}/{s.channels_total}':>11}{f'{s.shape_alive}/{s.shape_total}':>13}"
                f"{kept:>10.1%}"
            )
        total = self.macs_sparse / self.macs_dense if self.macs_dense else 1.0
        lines.append(f"{'total':<63}{total:>10.1%}  ({self.macs_sparse:,} of {self.macs_dense:,} MACs/sample)")
        for kind, (zero, n) in self.groups.items():
            lines.append(f"{kind} groups: {zero}/{n} zero ({zero / n:.1%})")
        return "\n".join(lines)


def _spatial(model: nn.Module, inputs: tuple[Tensor, ...]) -> dict[str, int]:
    """Output positions per sample of each Conv2d/Linear (H'·W', or tokens for a Linear)."""
    sizes: dict[str, int] = {}

    def hook(name: str):
        def record(mod: nn.Module, args, out: Tensor | tuple) -> None:
            out = out[0] if isinstance(out, tuple) else out  # an RNN's (output, state): time steps
            units = out.shape[1] if isinstance(mod, nn.Conv2d) else out.shape[-1]
            sizes[name] = out.numel() // (inputs[0].shape[0] * units)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, nn.LSTM, nn.GRU))]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sizes


@torch.no_grad()
def _layer(name: str, mod: nn.Module, positions: int) -> LayerSparsity:
    w = mod.weight.detach()
    lowered = w.flatten(1) != 0  # (N, C·kh·kw)
    rows, cols = lowered.any(1), lowered.any(0)
    channels = (w != 0).transpose(0, 1).flatten(1).any(1)  # (C,)
    live = int(rows.sum()) * int(cols.sum())
    return LayerSparsity(
        name=name, type=type(mod).__name__,
        filters_alive=int(rows.sum()), filters_total=w.shape[0],
        channels_alive=int(channels.sum()), channels_total=w.shape[1],
        shape_alive=int(cols.sum()), shape_total=lowered.shape[1],
        macs_dense=lowered.numel() * positions, macs_sparse=live * positions,
    )


@torch.no_grad()
def _rnn_layers(name: str, mod: nn.LSTM | nn.GRU, steps: int) -> list[LayerSparsity]:
    """One row per layer and direction: live hidden units (any gate row non-zero) and input columns."""
    gates = 4 if isinstance(mod, nn.LSTM) else 3
    rows = []
    for layer in range(mod.num_layers):
        for sfx in ("", "_reverse") if mod.bidirectional else ("",):
            w_ih, w_hh = getattr(mod, f"weight_ih_l{layer}{sfx}"), getattr(mod, f"weight_hh_l{layer}{sfx}")
            hidden = w_hh.shape[1]
            units = ((w_ih != 0).any(1) | (w_hh != 0).any(1)).view(gates, hidden).any(0)
            inputs, recurrent = (w_ih != 0).any(0), (w_hh != 0).any(0)
            dense = gates * hidden * (w_ih.shape[1] + hidden) * steps
            live = gates * int(units.sum()) * (int(inputs.sum()) + int(recurrent.sum())) * steps
            rows.append(LayerSparsity(
                name=f"{name}.l{layer}{sfx}", type=type(mod).__name__,
                filters_alive=int(units.sum()), filters_total=hidden,
                channels_alive=int(inputs.sum()), channels_total=w_ih.shape[1],
                shape_alive=int(inputs.sum()), shape_total=w_ih.shape[1], macs_dense=dense, macs_sparse=live))
    return rows


def sparsity_report(
    model: nn.Module, example_inputs: Inputs, groups: Sequence[Group] = ()
) -> SparsityReport:
    """Per-layer live filters, channels, shape fibers and multiply-adds of ``model`` (per sample).

    Args:
        model: a (sparse) model; every Conv2d and Linear is reported, and every LSTM/GRU layer
            (hidden units with a non-zero gate row as "filters", live input columns as "channels").
        example_inputs: a tensor or a sequence of tensors the model accepts, for output sizes.
        groups: optional groups to count zero groups per kind.
    """
    inputs = as_tuple(example_inputs)
    positions = _spatial(model, inputs)
    layers = []
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and getattr(m, "groups", 1) == 1:
            layers.append(_layer(n, m, positions.get(n, 0)))
        elif isinstance(m, (nn.LSTM, nn.GRU)) and not getattr(m, "proj_size", 0):
            layers += _rnn_layers(n, m, positions.get(n, 0))
    layers = tuple(layers)
    return SparsityReport(layers, zero_counts(groups))
