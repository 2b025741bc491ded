"""Groups: parameter slices that are regularized as one and removed as one.

A *family* is a set of stripes that repeat with a period: member ``k`` of a family covers indices
``[k * width, (k + 1) * width)`` along ``dim`` of every stripe's parameter. One family describes all
channels of a layer (or all shape fibers of a kernel) with a handful of integers, so the regularizer
works on whole tensors at once and never builds one Python object per weight. A :class:`Group` is
member ``k`` of a family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

Kind = Literal["channel", "filter", "in_channel", "shape", "neuron", "depth", "hidden", "hidden_row", "hidden_col",
               "rank", "head", "embed"]
KINDS: tuple[str, ...] = ("channel", "filter", "in_channel", "shape", "neuron", "depth", "hidden", "hidden_row",
                          "hidden_col", "rank", "head", "embed")
# ISS's row-only and column-only alternatives: one side of each ``hidden`` member
SIDES: dict[str, str] = {"hidden_row": "out", "hidden_col": "in"}
Role = Literal["out", "in", "state", "score"]


@dataclass(frozen=True)
class Stripe:
    """A periodic slice of one parameter: member ``k`` is ``view[k*width:(k+1)*width]`` along ``dim``.

    A stripe may hold only members ``[lo, hi)`` of its family, member ``lo`` starting at row ``offset``:
    the input columns a consumer of ``cat([a, b])`` reads for ``b``'s channels start after ``a``'s, and a
    consumer of one ``chunk`` of a tensor reads only that chunk's channels. Member ``k`` is then rows
    ``offset + (k - lo)*stride + [0, width)``; the defaults (``lo=0, hi=None, offset=0``, ``stride``
    = ``width``) are all members side by side from row 0. A larger ``stride`` interleaves members with
    other stripes' rows: a consumer of a channel shuffle reads group ``j``'s channel ``i`` at ``i*g + j``.

    ``flat=True`` indexes ``param.flatten(dim)`` instead of ``param``: a shape fiber ``W[:, c, i, j]``
    of a conv weight ``(N, C, kh, kw)`` is index ``c*kh*kw + i*kw + j`` of ``W.flatten(1)``.
    ``role`` tells compaction which side of the channel the slice is on: ``"out"`` slices produce the
    channel (filter rows, bias, BatchNorm entries), ``"in"`` slices consume it (input columns), and
    ``"state"`` slices are buffers (BatchNorm running statistics) that are cut with the channel but
    are not weights: they count in no norm and are never zeroed. ``"score"`` slices (an attention head's
    query and key rows) are weights cut and regularized with the channel that neither produce nor read it:
    zero, they leave uniform attention over v, so they do not make a head silent.
    """

    param: str
    dim: int
    width: int = 1
    flat: bool = False
    role: Role = "out"
    lo: int = 0
    hi: int | None = None  # None: up to the family's size
    offset: int = 0
    stride: int = 0  # rows from one member to the next; 0: width (members side by side)

    def __post_init__(self) -> None:
        if not self.stride:
            object.__setattr__(self, "stride", self.width)

    def member_rows(self, members: Tensor) -> tuple[Tensor, Tensor]:
        """``(rows, held)``: the rows of the ``members`` this stripe holds, and which of ``members`` those are.

        ``members`` is a LongTensor ``(M,)``; ``held`` a bool ``(M,)``; ``rows`` ``(held.sum() * width,)``.
        """
        held = members >= self.lo
        if self.hi is not None:
            held &= members < self.hi
        start = self.offset + (members[held] - self.lo) * self.stride
        return (start[:, None] + torch.arange(self.width)).flatten(), held

    def rows(self, p: Tensor) -> int:
        """Indices along the stripe's dim: ``members * width``."""
        return (p.flatten(self.dim) if self.flat else p).shape[self.dim]

    def row_sq(self, p: Tensor) -> Tensor:
        """Sum of squares of each index along the stripe's dim, shape ``(members * width,)``."""
        v = p.flatten(self.dim) if self.flat else p
        other = [d for d in range(v.dim()) if d != self.dim]
        return v.pow(2).sum(dim=other) if other else v.pow(2)  # sum(dim=[]) would sum everything


@dataclass(frozen=True, eq=False)
class Family:
    """``size`` groups of one kind that share a stripe pattern (e.g. all output channels of conv1).

    ``zero_preserving`` is False when a channel whose producers are zero may still carry a non-zero
    value (through a sigmoid, say); such a channel is removable only when its consumers are zero.
    ``uniform`` names the RNN module whose layers this family's members belong to: one module holds
    one hidden size, so compaction keeps as many members in each of its families. ``read_by_norm``: a
    LayerNorm/RMSNorm's statistics read every member, so a member whose consumers are zero is still read
    and only a silent one (producers zero) is removable.
    """

    kind: str
    label: str
    size: int
    stripes: tuple[Stripe, ...]
    params: Mapping[str, Tensor] = field(repr=False)
    zero_preserving: bool = True
    uniform: str | None = None  # an nn.LSTM/GRU: every family of it must keep the same number of members
    read_by_norm: bool = False  # a norm's statistics read it: removable only where silent

    def row_sq(self, role: Role | None = None) -> Tensor:
        """Squared L2 norm of every member, shape ``(size,)``; ``role`` restricts to one side."""
        total = None
        for s in self.stripes:
            if s.role == "state" or (role is not None and s.role != role):
                continue
            hi = self.size if s.hi is None else s.hi
            rows = s.row_sq(self.params[s.param])
            if s.stride == s.width:
                sq = rows[s.offset:s.offset + (hi - s.lo) * s.width].view(hi - s.lo, s.width).sum(1)
            else:  # interleaved members: gather rows offset + i*stride + [0, width)
                ix = s.offset + torch.arange(hi - s.lo, device=rows.device)[:, None] * s.stride \
                    + torch.arange(s.width, device=rows.device)
                sq = rows[ix].sum(1)
            if total is None:
                total = torch.zeros(self.size, dtype=sq.dtype, device=sq.device)
            total[s.lo:hi] += sq
        if total is None:
            return torch.zeros(self.size)
        return total

    def weight_stripes(self) -> tuple[Stripe, ...]:
        return tuple(s for s in self.stripes if s.role != "state")

    def numel_per_member(self) -> int:
        """Weights of one member, counting a partial stripe (one chunk's consumer) as if it held all."""
        return sum(self.params[s.param].numel() // s.rows(self.params[s.param]) * s.width
                   for s in self.weight_stripes())

    def zero_members_(self, members: Tensor) -> None:
        """Set members ``members`` (a LongTensor of member indices) to zero in place."""
        for s in self.weight_stripes():
            rows, _ = s.member_rows(members)
            with torch.no_grad():
                p = self.params[s.param]
                v = p.flatten(s.dim) if s.flat else p
                v.index_fill_(s.dim, rows.to(p.device), 0.0)
                if s.flat:  # flatten() may have copied (non-contiguous p); write back
                    p.copy_(v.view_as(p))


@dataclass(frozen=True, eq=False)
class Group:
    """Member ``index`` of a :class:`Family`: one filter, channel, shape fiber, neuron...

    Attributes:
        kind: ``"channel"``, ``"filter"``, ``"in_channel"``, ``"shape"``, ``"neuron"`` ...
        name: readable, e.g. ``"conv2:channel[7]"``.
    """

    family: Family
    index: int

    @property
    def kind(self) -> str:
        return self.family.kind

    @property
    def name(self) -> str:
        return f"{self.family.label}:{self.kind}[{self.index}]"

    @property
    def slices(self) -> list[tuple[str, int, Tensor]]:
        """``(param name, dim, indices)`` of each slice (``flat`` stripes index ``p.flatten(dim)``)."""
        member = torch.tensor([self.index])
        return [(s.param, s.dim, rows) for s in self.family.weight_stripes()
                if len(rows := s.member_rows(member)[0])]

    def numel(self) -> int:
        """Number of weights in the group, ``|g|``."""
        return self.family.numel_per_member()

    @torch.no_grad()
    def norm(self) -> Tensor:
        """``||w_g||_2``, a 0-d tensor."""
        return self.family.row_sq()[self.index].sqrt()

    def is_zero(self) -> bool:
        return bool(self.norm() == 0)

    def zero_(self) -> "Group":
        """Set every slice of the group to zero, in place."""
        self.family.zero_members_(torch.tensor([self.index]))
        return self

    def __repr__(self) -> str:
        return f"Group({self.name}, numel={self.numel()})"


def side_families(families: Sequence[Family], kinds: Sequence[str]) -> list[Family]:
    """The row-only (``hidden_row``) and column-only (``hidden_col``) halves of each ``hidden`` family.

    The ISS paper's alternative to whole units (Wen et al., ICLR 2018, ``row_col_grouplasso``): member
    ``k`` of ``hidden_row`` is what produces unit ``k`` (its stripes of role ``"out"``: rows ``g·H + k``
    of ``weight_ih``, ``weight_hh`` and both biases for every gate ``g``); member ``k`` of ``hidden_col``
    is what reads it (role ``"in"``: column ``k`` of its own ``weight_hh`` and of every consumer, the
    next layer's ``weight_ih`` or the decoder). Either side at zero makes the unit removable, as
    compaction's rule for the whole unit already says: zero consumers leave it unread, and zero gate
    rows leave its gates constant and its state at 0 from a zero start (an RNN given an explicit initial
    state has no hidden groups at all).
    """
    out = []
    for fam in families:
        if fam.kind != "hidden":
            continue
        for kind, role in SIDES.items():
            stripes = tuple(s for s in fam.stripes if s.role == role)
            if kind in kinds and stripes:
                out.append(Family(kind, fam.label, fam.size, stripes, fam.params,
                                  zero_preserving=fam.zero_preserving, uniform=fam.uniform))
    return out


def families_of(groups: list[Group]) -> dict[Family, Tensor]:
    """Bucket groups by family: ``{family: LongTensor of member indices}``, order preserved."""
    out: dict[Family, list[int]] = {}
    for g in groups:
        out.setdefault(g.family, []).append(g.index)
    return {f: torch.tensor(ix, dtype=torch.long) for f, ix in out.items()}


@torch.no_grad()
def zero_counts(groups: Sequence[Group]) -> dict[str, tuple[int, int]]:
    """``{kind: (all-zero groups, groups)}``."""
    counts: dict[str, tuple[int, int]] = {}
    for fam, members in families_of(list(groups)).items():
        zero, total = counts.get(fam.kind, (0, 0))
        counts[fam.kind] = (zero + int((fam.row_sq()[members] == 0).sum()), total + len(members))
    return counts
