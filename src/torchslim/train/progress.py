"""Progress of an epoch: a tqdm bar on a terminal, a plain line every ~30 s elsewhere (CI logs, ``| tee``).

:func:`progress_bar` wraps the epoch's batches. ``progress=None`` draws the bar when stderr is a terminal
and otherwise prints lines such as ``ssl 2/3: step 120/469, loss 0.432, elapsed 30s, ETA 1m27s``, so a
long phase is never silent for minutes; ``True`` always draws the bar, ``False`` shows nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

__all__ = ["HEARTBEAT_SECONDS", "duration", "progress_bar"]

HEARTBEAT_SECONDS = 30.0  # work between two progress lines when stderr is not a terminal

T = TypeVar("T")


class _Lines:
    """An iterable over ``items`` that writes a progress line to stderr every :data:`HEARTBEAT_SECONDS`;
    ``set_postfix`` as tqdm's (the values are shown in the next line)."""

    def __init__(self, items: Iterable[T], *, total: int, desc: str) -> None:
        self._items, self._total, self._desc = items, total, desc
        self._postfix: dict[str, object] = {}

    def set_postfix(self, **values: object) -> None:
        self._postfix = values

    def __iter__(self) -> Iterator[T]:
        start = last = time.perf_counter()
        for step, item in enumerate(self._items, 1):
            yield item
            now = time.perf_counter()
            if now - last >= HEARTBEAT_SECONDS and step < self._total:
                last = now
                print(self._line(step, now - start), file=sys.stderr, flush=True)

    def _line(self, step: int, elapsed: float) -> str:
        values = "".join(f", {k} {v}" for k, v in self._postfix.items())
        eta = elapsed / step * (self._total - step)
        return (f"{self._desc}: step {step}/{self._total}{values}, elapsed {duration(elapsed)}, "
                f"ETA {duration(eta)}")


class _Silent:
    def __init__(self, items: Iterable[T]) -> None:
        self._items = items

    def set_postfix(self, **values: object) -> None:
        pass

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)


def progress_bar(items: Iterable[T], *, total: int, desc: str, unit: str, progress: bool | None):
    """``items`` with progress shown on stderr (see the module doc); the result has tqdm's ``set_postfix``.

    Args:
        items: the epoch's batches.
        total: how many there are (sizes the bar and the ETA).
        desc: what the bar is, e.g. ``"ssl 2/3"`` (phase, epoch of epochs).
        unit: one item, e.g. ``"batch"``.
        progress: ``None`` a bar on a terminal and lines elsewhere, ``True`` a bar, ``False`` nothing.
    """
    if progress is False:
        return _Silent(items)
    if progress is None and not _is_terminal():
        return _Lines(items, total=total, desc=desc)
    return tqdm(items, total=total, desc=desc, leave=False, unit=unit)


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``1h02m00s``."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"
