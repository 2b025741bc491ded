"""The channel-dependency graph: spaces united by union-find, with the stripes that read and write them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from torchslim.structure.groups import Stripe
from torchslim.structure.layout import Channels


@dataclass
class _Space:
    size: int
    stripes: list[Stripe] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    producer_kind: set[str] = field(default_factory=set)  # group kinds: "channel" / "neuron" / "hidden"
    fixed: str | None = None  # why its channels cannot be removed
    zero_preserving: bool = True
    rnn: str | None = None  # the nn.LSTM/GRU whose hidden units these are: all its layers keep one size
    read_by_norm: bool = False  # a LayerNorm/RMSNorm's statistics read every channel: only silent ones may go


@dataclass(frozen=True)
class NormSite:
    """A norm whose compact form compaction must fix when its channels are cut (:mod:`torchslim.surgery.norms`).

    ``kind``: ``"layer"`` (the module becomes a :class:`torchslim.layers.PaddedLayerNorm` over ``dim`` of its
    input, its statistics still over the ``C`` channels it had), ``"rms"`` (γ·sqrt(C/C'), ε·C/C' in the module's
    ``eps_attr``, or a standard ``nn.RMSNorm`` where ``eps_attr`` is None and the module is one ``rms_norm``
    call) or ``"group"`` (``num_groups`` shrinks with the whole groups cut). ``weight``: γ's qualified name; its
    shape before and after the cut gives ``C`` and ``C'``.
    """

    module: str
    kind: str
    weight: str
    bias: str | None = None
    eps: float | None = None
    dim: int = -1
    eps_attr: str | None = None


@dataclass(frozen=True)
class StdConvSite:
    """A weight-standardized conv (``groups == 1``) whose module is that conv alone: when compaction cuts its
    input columns (zero ones only, see :mod:`torchslim.structure.conv_rules`), the module becomes a
    :class:`torchslim.layers.PaddedStdConv` that still standardizes over the original fan-in.

    ``gain``: the per-filter γ's qualified name (or None), multiplied by the constant ``scale``.
    """

    module: str
    weight: str
    bias: str | None
    gain: str | None
    scale: float
    eps: float
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1


class _DependencyGraph:
    """Union-find over channel spaces, filled in by walking the traced graph."""

    def __init__(self, strict: bool) -> None:
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.count: list[int] = []  # per root: members M of the class; a space of size C has C/M per member
        self.strict = strict
        # ops whose compact form needs aligned channels: (kind, input channels, sizes); see torchslim.surgery.ties
        self.ties: list[tuple[str, Channels, tuple[int, ...]]] = []
        # operations no rule covers that pinned channels: "what at 'node' (module 'path')" -> channels pinned
        self.pinned: dict[str, int] = {}
        # norms over channels, by module path: what compaction must fix when it cuts them (norm_rules)
        self.norms: dict[str, NormSite | StdConvSite] = {}

    def new(self, size: int, fixed: str | None = None) -> int:
        self.spaces.append(_Space(size, fixed=fixed))
        self.parent.append(len(self.parent))
        self.count.append(size)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int, groups: int | None = None) -> int:
        """Unite the classes of ``a`` and ``b``; ``groups``: only whole blocks of ``C/groups`` go together."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
        self.count[ra] = math.gcd(self.count[ra], self.count[rb], groups or 0)
        return ra

    def fix(self, i: int, why: str) -> None:
        s = self.spaces[i]
        if s.fixed is None:
            s.fixed = why

    def classes(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.spaces)):
            out.setdefault(self.find(i), []).append(i)
        return out

    def share_tensors(self, canon: dict[str, str]) -> None:
        """Tied weights (a decoder sharing the embedding's table): one tensor, one name, one family.

        ``canon`` maps every parameter or buffer name to the first name of its tensor. Stripes are
        renamed to it; two classes whose stripes cover the same rows of one tensor are united when the
        rows line up member for member, and fixed otherwise.
        """
        claims: dict[tuple[str, int], list[tuple[int, Stripe]]] = {}
        for sid, space in enumerate(self.spaces):
            space.stripes = [dataclasses.replace(st, param=canon.get(st.param, st.param)) for st in space.stripes]
            for st in space.stripes:
                claims.setdefault((st.param, st.dim), []).append((sid, st))
        for (param, _), owners in claims.items():
            for i, (a, sa) in enumerate(owners):
                for b, sb in owners[i + 1:]:
                    self._share(param, a, sa, b, sb)

    def _share(self, param: str, a: int, sa: Stripe, b: int, sb: Stripe) -> None:
        size_a, size_b = self.spaces[a].size, self.spaces[b].size
        (a0, a1), (b0, b1) = _span(sa, size_a), _span(sb, size_b)
        if self.find(a) == self.find(b) or a1 <= b0 or b1 <= a0 or _interleaved(sa, size_a, sb, size_b):
            return
        if (a0, a1, sa.width, sa.stride, sa.lo) == (b0, b1, sb.width, sb.stride, sb.lo) and size_a == size_b:
            self.union(a, b)
        else:
            why = f"'{param}' is shared by layers whose channels do not line up"
            self.fix(a, why)
            self.fix(b, why)


def _span(st: Stripe, size: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` a stripe of a space of ``size`` members covers."""
    n = (size if st.hi is None else st.hi) - st.lo
    return st.offset, st.offset + (n - 1) * st.stride + st.width if n > 0 else st.offset


def _interleaved(a: Stripe, size_a: int, b: Stripe, size_b: int) -> bool:
    """Whether two strided stripes whose spans overlap hold disjoint rows (two shuffled segments)."""
    if a.stride == a.width and b.stride == b.width:
        return False
    rows = [st.member_rows(torch.arange(st.lo, size if st.hi is None else st.hi))[0]
            for st, size in ((a, size_a), (b, size_b))]
    return not bool(torch.isin(rows[0], rows[1]).any())
