"""Keep removed structures removed while fine-tuning: masked gradients, weights and momentum."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from torchslim.structure.groups import Group, families_of


class ZeroMask:
    """Freezes at zero every group that is all-zero when the mask is made (SSL's fine-tuning).

    Once the group Lasso is off, plain SGD would grow removed structures back. The mask zeroes their
    gradients (a hook on each parameter) and, after each optimizer step, their weights and the
    optimizer's per-parameter state (momentum, Adam moments), so nothing leaks back in.

    Example:
        >>> import torch, torchslim
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> groups = torchslim.structures(net, torch.randn(1, 4))
        >>> _ = groups[0].zero_()
        >>> mask = torchslim.ZeroMask(groups).attach()
        >>> mask.num_frozen
        1
    """

    def __init__(self, groups: Sequence[Group]) -> None:
        self.keep: dict[nn.Parameter, Tensor] = {}  # param -> 0/1 tensor of its shape
        self.num_frozen = 0
        for fam, members in families_of(list(groups)).items():
            dead = members[fam.row_sq()[members] == 0]
            self.num_frozen += len(dead)
            for s in fam.weight_stripes():
                p = fam.params[s.param]
                keep = self.keep.setdefault(p, torch.ones_like(p))
                v = keep.flatten(s.dim) if s.flat else keep  # a view: keep is contiguous
                rows, _ = s.member_rows(dead)
                v.index_fill_(s.dim, rows.to(p.device), 0.0)
        self.keep = {p: k for p, k in self.keep.items() if not bool(k.all())}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> "ZeroMask":
        """Register gradient hooks that zero the frozen entries' gradients."""
        for p, keep in self.keep.items():
            self._hooks.append(p.register_hook(lambda g, keep=keep: g * keep))
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @torch.no_grad()
    def apply_(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Re-zero frozen weights and, if given, the optimizer's state tensors for them."""
        for p, keep in self.keep.items():
            p.mul_(keep)
            if optimizer is not None:
                for value in optimizer.state.get(p, {}).values():
                    if isinstance(value, Tensor) and value.shape == p.shape:
                        value.mul_(keep)
