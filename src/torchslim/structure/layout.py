"""How a tensor carries channels: segments of channel spaces laid out along one dimension.

A *space* is the channel dimension some layer produced (a Conv2d's output channels, an LSTM layer's
hidden units). A tensor's channel dimension is a run of *segments*, each a range of one space's
members; per-channel operations pass the layout on, ``cat`` joins layouts, ``split`` cuts them,
flatten widens each member into a run of features, a channel shuffle strides them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Segment:
    """Members ``[lo, hi)`` of ``space``: member ``k`` is entries ``offset + (k - lo)·stride + [0, width)``.

    ``stride`` is ``width`` for members side by side; a channel shuffle interleaves segments, each
    member ``stride`` entries after the previous one.
    """

    space: int
    lo: int
    hi: int
    width: int = 1
    offset: int = 0
    stride: int = 0  # 0: width

    def __post_init__(self) -> None:
        if not self.stride:
            object.__setattr__(self, "stride", self.width)

    @property
    def end(self) -> int:
        """One past the segment's last entry."""
        return self.offset + (self.hi - self.lo - 1) * self.stride + self.width

    def moved(self, by: int) -> Segment:
        return dataclasses.replace(self, offset=self.offset + by)


@dataclass(frozen=True)
class Channels:
    """How a tensor carries channels along ``dim``: its segments, by offset (they cover every entry)."""

    dim: int
    segs: tuple[Segment, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "segs", tuple(sorted(self.segs, key=lambda g: g.offset)))

    def widen(self, factor: int) -> Channels:
        """Each entry becomes ``factor`` entries (a flatten of trailing dims, a depthwise multiplier)."""
        return Channels(self.dim, tuple(Segment(g.space, g.lo, g.hi, g.width * factor, g.offset * factor,
                                                g.stride * factor) for g in self.segs))

    def moved_to(self, dim: int) -> Channels:
        """The same channels along another dimension (a permute, a dropped batch dim)."""
        return Channels(dim, self.segs)

    def slice(self, start: int, stop: int) -> Channels | None:
        """Entries ``[start, stop)`` of the channel dimension, or None where a member would be split.

        A strided segment keeps the members that start inside (a contiguous range of them), so a
        chunk of a shuffled tensor holds a strided part of each shuffled segment.
        """
        segs = []
        for seg in self.segs:
            n = seg.hi - seg.lo
            first = min(n, max(0, -(-(start - seg.offset) // seg.stride)))  # members [first, last) start inside
            last = min(n, max(0, -(-(stop - seg.offset) // seg.stride)))
            if first > 0 and seg.offset + (first - 1) * seg.stride + seg.width > start:
                return None
            if last > 0 and seg.offset + (last - 1) * seg.stride + seg.width > stop:
                return None
            if first < last:
                segs.append(Segment(seg.space, seg.lo + first, seg.lo + last, seg.width,
                                    seg.offset + first * seg.stride - start, seg.stride))
        return Channels(self.dim, tuple(segs))


@dataclass(frozen=True)
class Stack:
    """An RNN's final state ``(layers·directions, N, H)``: index ``i`` along dim 0 carries ``chans[i]``."""

    chans: tuple[Channels, ...]


def all_channels(pieces: Any) -> list[Channels]:
    """Every channel description inside nested pieces (lists, stacks, None)."""
    if pieces is None:
        return []
    if isinstance(pieces, Channels):
        return [pieces]
    if isinstance(pieces, Stack):
        return list(pieces.chans)
    return [c for p in pieces for c in all_channels(p)]
