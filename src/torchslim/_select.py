"""One way to choose layers by name: ``include=`` / ``exclude=`` patterns, shared by every API that takes them.

A pattern matches a name when it is the name itself, a prefix ending at a ``.`` (``"layer2"`` matches
``"layer2.0.conv1"``, not ``"layer20"``), or a glob with ``*``, ``?`` or ``[`` (``"*.downsample.*"``,
matched by :func:`fnmatch.fnmatchcase`).
"""

from __future__ import annotations

import difflib
from fnmatch import fnmatchcase
from typing import Iterable, Sequence

from torchslim.errors import ConfigError

_GLOB = frozenset("*?[")


def matches(pattern: str, name: str) -> bool:
    """Whether ``pattern`` selects ``name``: exact, a prefix ending at ``.``, or a glob.

    Example:
        >>> [matches("layer2", n) for n in ("layer2", "layer2.0.conv1", "layer20")]
        [True, True, False]
        >>> matches("*.conv1", "layer1.0.conv1")
        True
    """
    if _GLOB & set(pattern):
        return fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern + ".")


def selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] = ()) -> bool:
    """``name`` is chosen: some ``include`` pattern matches it (``None``: every name), and no ``exclude`` does."""
    return (include is None or any(matches(p, name) for p in include)) and not any(matches(p, name) for p in exclude)


def check_patterns(patterns: Iterable[str] | None, names: Sequence[str], keyword: str) -> None:
    """Raise :class:`ConfigError` for a pattern that matches none of ``names``: a typo would silently do nothing.

    Raises:
        ConfigError: naming the pattern, close matches among ``names`` and the names one could use.
    """
    if isinstance(patterns, str):
        raise ConfigError(f"{keyword} must be a sequence of names, got the string {patterns!r}; write [{patterns!r}]")
    for pattern in patterns or ():
        if not any(matches(pattern, n) for n in names):
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            shown = ", ".join(list(names)[:12]) + (", ..." if len(names) > 12 else "")
            raise ConfigError(f"{keyword} pattern {pattern!r} matches no layer{hint or '.'} Layers: {shown}")
