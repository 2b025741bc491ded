"""Ties: channel shuffles and chunks whose compact form needs aligned channels, and how compaction meets them.

The compact model runs the same code on fewer channels. A channel shuffle's ``view(B, g, C'/g, ...)``
interleaves its groups' channels correctly only if every group keeps the same positions, and
``chunk(n)`` cuts ``ceil(C'/n)`` channels per piece. The tracer records each such operation as a
*tie* (:attr:`~torchslim.structure.graph._DependencyGraph.ties`); :func:`keep_for_ties` grows each
family's kept members until every tie holds. Keeping a removable member as it is changes nothing, and
neither does renumbering a family's members consistently in all its stripes (a :class:`Renumbering`),
so a family that enters a shuffle fresh (a branch's output) is first renumbered onto the positions the
other groups keep.

All families' members sit end to end in one flat boolean *live* vector (a :class:`SlotLayout`), so a
tie's rule is vectorized over its entries: ``live[tie.slots]`` is what the tie's input keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import torch
from torch import Tensor

from torchslim.structure.graph import _DependencyGraph
from torchslim.structure.groups import Family
from torchslim.structure.layout import Channels

TieKind = Literal["groups", "blocks", "chunk", "split"]
Plan = list[tuple[Family, Tensor]]  # each family with the sorted member indices it keeps, a LongTensor (K,)

_EVERY_MEMBER = 2 ** 62  # entries per member outside a family: every entry falls on member 0, the always slot


@dataclass(frozen=True)
class SlotLayout:
    """Where each channel entry lives in the flat live vector of ``always + 1`` slots.

    Family ``f``'s member ``k`` is slot ``starts[f] + k``; the last slot, ``always``, stands for every
    entry of a space in no family (those are always kept). A space of ``C`` channels in a class of
    ``M`` members has ``C / M`` entries per member (a grouped conv's block of channels is one member).
    """

    starts: tuple[int, ...]  # (F + 1,): family f holds slots [starts[f], starts[f + 1]); starts[F] = always
    base: Tensor             # (S,) per channel space: the slot of its family's member 0; always outside one
    per: Tensor              # (S,) per channel space: entries per member, C / M

    @classmethod
    def of(cls, graph: _DependencyGraph, plan: Plan, roots: list[int]) -> SlotLayout:
        """The layout of ``plan``'s families; ``roots[f]``: family ``f``'s union-find class in ``graph``."""
        starts = tuple(torch.tensor([0] + [fam.size for fam, _ in plan]).cumsum(0).tolist())
        base = torch.full((len(graph.spaces),), starts[-1], dtype=torch.long)
        per = torch.full((len(graph.spaces),), _EVERY_MEMBER, dtype=torch.long)
        classes = graph.classes()
        for root, at in zip(roots, starts):
            for sid in classes[root]:
                base[sid], per[sid] = at, graph.spaces[sid].size // graph.count[root]
        return cls(starts, base, per)

    @property
    def always(self) -> int:
        """The slot of every entry outside a family."""
        return self.starts[-1]

    @property
    def families(self) -> int:
        return len(self.starts) - 1

    def owners(self) -> Tensor:
        """The family of each slot, ``(always + 1,)``; ``families`` for the always slot."""
        return torch.bucketize(torch.arange(self.always + 1), torch.tensor(self.starts[1:]), right=True)

    def live(self, plan: Plan) -> Tensor:
        """The live vector ``(always + 1,)`` of ``plan``'s kept members, plus the always slot."""
        live = torch.zeros(self.always + 1, dtype=torch.bool)
        live[-1] = True
        for (_, keep), at in zip(plan, self.starts):
            live[at + keep] = True
        return live

    def slots(self, chan: Channels, size: int) -> Tensor:
        """For each of the ``size`` entries of ``chan``'s dimension, its slot, a LongTensor ``(size,)``.

        Segment member ``k`` covers entries ``offset + (k - lo)·stride + [0, width)``; in a space of
        ``per`` entries per family member, it belongs to member ``k // per``.
        """
        slot = torch.full((size,), self.always, dtype=torch.long)
        for seg in chan.segs:
            k = torch.arange(seg.lo, seg.hi)
            rows = (seg.offset + (k - seg.lo) * seg.stride)[:, None] + torch.arange(seg.width)
            slot[rows.flatten()] = (self.base[seg.space] + k // self.per[seg.space]).repeat_interleave(seg.width)
        return slot


@dataclass(frozen=True)
class Tie:
    """One operation the compact model repeats on fewer channels, on the slots of its input's entries.

    * ``"groups"``: ``view(a, b)`` with ``a`` constant (a channel shuffle of ``g = a`` groups):
      every group keeps the same entries ``j``;
    * ``"blocks"``: ``view(a, b)`` with ``b`` constant: whole groups go;
    * ``"chunk"``: ``chunk(n)`` of ``C'`` entries: ``ceil(C'/n)`` in each piece, the rest (at least
      one) in the last;
    * ``"split"``: ``split(s)`` into equal pieces whose size compaction rewrites (GPT-2's fused q, k, v):
      every piece keeps as many.
    """

    kind: TieKind
    slots: Tensor             # (n,) the slot of each entry along the tied dimension
    sizes: tuple[int, ...]    # (a, b) for a view; the pieces' sizes for a chunk

    @classmethod
    def on(cls, layout: SlotLayout, kind: TieKind, chan: Channels, sizes: tuple[int, ...]) -> Tie:
        """The tie the tracer recorded as ``(kind, chan, sizes)``, placed on ``layout``."""
        n = sum(sizes) if kind in ("chunk", "split") else sizes[0] * sizes[1]
        return cls(kind, layout.slots(chan, n), sizes)

    def wanted(self, live: Tensor) -> Tensor:
        """The entries ``(n,)`` this tie needs kept, given the live vector: a superset of the live ones."""
        alive = live[self.slots]
        if self.kind in ("chunk", "split"):
            return _chunk_wanted(alive, self.sizes, equal=self.kind == "split")
        a, b = self.sizes
        if self.kind == "groups":
            return alive.view(a, b).any(0).repeat(a)
        return alive.view(a, b).any(1).repeat_interleave(b)

    def keep_(self, live: Tensor) -> bool:
        """Mark the members this tie needs in ``live``, in place; whether any was added."""
        want = self.wanted(live)
        added = bool((want & ~live[self.slots]).any())
        live[self.slots[want]] = True
        return added


def _chunk_wanted(alive: Tensor, sizes: tuple[int, ...], equal: bool = False) -> Tensor:
    """``chunk(n)``: every piece but the last keeps ``c`` (the largest count), the last at least ``c - n + 1``;
    ``equal``: the last keeps ``c`` too."""
    pieces = list(alive.split(list(sizes)))
    counts = [int(p.sum()) for p in pieces]
    c = max(max(counts), 1)
    want = []
    for i, p in enumerate(pieces):
        need = c if i < len(pieces) - 1 or equal else max(counts[-1], c - len(pieces) + 1, 1)
        p = p.clone()
        p[torch.nonzero(~p).flatten()[:max(0, need - int(p.sum()))]] = True
        want.append(p)
    return torch.cat(want)


@dataclass(frozen=True)
class Renumbering:
    """Member ``k`` of ``family`` becomes member ``perm[k]`` in every stripe: the function stays."""

    family: Family
    perm: Tensor  # (size,) a permutation of 0..size-1

    def apply_(self) -> None:
        """Move the rows of the family's parameters (``family.params``) in place."""
        fam = self.family
        with torch.no_grad():
            for s in fam.stripes:
                k = torch.arange(s.lo, fam.size if s.hi is None else s.hi)
                t = fam.params[s.param]
                src, dst = s.member_rows(k)[0].to(t.device), s.member_rows(self.perm[k])[0].to(t.device)
                t.index_copy_(s.dim, dst, t.index_select(s.dim, src))


@dataclass
class _Walk:
    """What the walk over the ties fills in: the live vector and the families met so far."""

    plan: Plan
    layout: SlotLayout
    live: Tensor    # (always + 1,) bool: slot kept
    owners: Tensor  # (always + 1,) the family of each slot
    seen: Tensor    # (F + 1,) bool: family met in an earlier tie (it can no longer be renumbered)


def keep_for_ties(graph: _DependencyGraph, plan: Plan, roots: list[int]) -> tuple[Plan, list[Renumbering]]:
    """Keep more members where a channel shuffle or a ``chunk`` needs them to stay exact.

    Walks the ties in graph order: a ``"groups"`` tie (a shuffle) whose groups include families seen
    in no earlier tie renumbers them onto the positions the other groups keep (see :func:`_align`);
    every other tie keeps what it needs. Then every tie is applied again until all hold.

    Args:
        graph: the model's channel graph; ``graph.ties`` as the tracer recorded them.
        plan: each family with the members it must keep (sorted LongTensor).
        roots: each family's union-find class, in ``plan``'s order.
    Returns:
        the plan (members in the new labels) and the renumberings to apply to the model before the cut.
    """
    if not graph.ties:
        return plan, []
    layout = SlotLayout.of(graph, plan, roots)
    walk = _Walk(plan, layout, layout.live(plan), layout.owners(), torch.zeros(len(plan) + 1, dtype=torch.bool))
    ties = [Tie.on(layout, kind, chan, sizes) for kind, chan, sizes in graph.ties]
    renumberings: list[Renumbering] = []
    for tie in ties:  # in graph order: a family not seen yet can still be renumbered
        aligned = _align(tie, walk) if tie.kind == "groups" else None
        if aligned is None:
            tie.keep_(walk.live)
        else:
            renumberings += aligned
        walk.seen[walk.owners[tie.slots]] = True
    changed = True
    while changed:
        changed = False
        for tie in ties:
            changed |= tie.keep_(walk.live)
    kept = [(fam, torch.nonzero(walk.live[at:at + fam.size]).flatten()) for (fam, _), at in zip(plan, layout.starts)]
    return kept, renumberings


def _fresh(group: Tensor, tie: Tie, walk: _Walk) -> bool:
    """Whether shuffle group ``group`` (its ``b`` slots) is exactly one family, unseen, in member order.

    Such a family appears nowhere else in the tie, so its members can be renumbered freely.
    """
    f = int(walk.owners[group[0]])
    if f == walk.layout.families or walk.seen[f]:
        return False
    b = len(group)
    return (walk.plan[f][0].size == b and torch.equal(group, walk.layout.starts[f] + torch.arange(b))
            and int((walk.owners[tie.slots] == f).sum()) == b)


def _align(tie: Tie, walk: _Walk) -> list[Renumbering] | None:
    """Renumber the shuffle groups that are one fresh family each, so they keep what the others keep.

    The groups that are not fresh (or, when all are, the first) fix the kept positions ``want``; each
    fresh family's kept members move onto them, and then every group keeps ``want``. Returns None
    (nothing done) where no group is fresh.
    """
    a, b = tie.sizes
    groups = tie.slots.view(a, b)
    fresh = [j for j in range(a) if _fresh(groups[j], tie, walk)]
    if not fresh or a < 2:
        return None
    fixed = [j for j in range(a) if j not in fresh] or [fresh.pop(0)]  # all fresh: the first is the reference
    want = walk.live[groups[fixed]].any(0)  # positions the other groups keep; grows in _renumbering
    out = []
    for j in fresh:
        fam = walk.plan[int(walk.owners[groups[j, 0]])][0]
        out.append(_renumbering(fam, walk.live[groups[j]].clone(), want))
        walk.live[groups[j]] = False  # its live members are now those at `want`
    walk.live[groups[:, want]] = True  # every group keeps the same positions
    return out


def _renumbering(fam: Family, mine: Tensor, want: Tensor) -> Renumbering:
    """Move ``fam``'s kept members ``mine`` (bool ``(size,)``) onto the kept positions ``want`` (same shape).

    A stripe's members ``[lo, hi)`` must stay in their range, so counts are matched range by range
    between the stripes' cuts: where ``fam`` keeps more, ``want`` grows *in place* (the other groups
    keep more positions); where it keeps fewer, ``mine`` takes its strongest removable members too.
    """
    strength = fam.row_sq().detach().cpu()
    perm = torch.arange(fam.size)
    for c0, c1 in _ranges(fam):
        w, m = want[c0:c1], mine[c0:c1]  # views: filled in place
        extra = int(m.sum()) - int(w.sum())
        if extra > 0:
            w[torch.nonzero(~w).flatten()[:extra]] = True
        elif extra < 0:
            m[strength[c0:c1].masked_fill(m, -1.0).topk(-extra).indices] = True
        perm[c0 + _kept_first(m)] = c0 + _kept_first(w)
    return Renumbering(fam, perm)


def _ranges(fam: Family) -> list[tuple[int, int]]:
    """Consecutive member ranges ``[c0, c1)`` that no stripe's ``[lo, hi)`` cuts through."""
    cuts = sorted({0, fam.size, *(st.lo for st in fam.stripes), *(st.hi for st in fam.stripes if st.hi is not None)})
    return list(pairwise(cuts))


def _kept_first(mask: Tensor) -> Tensor:
    """Indices of ``mask``'s True entries, then of its False ones: ``(len(mask),)``."""
    return torch.cat([torch.nonzero(mask).flatten(), torch.nonzero(~mask).flatten()])
