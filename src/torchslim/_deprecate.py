"""Old keyword names that keep working for one release, with a DeprecationWarning."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])


def renamed_kwargs(**old_to_new: str) -> Callable[[_F], _F]:
    """Accept ``old=value`` as ``new=value`` and warn; passing both is a TypeError.

    Example:
        >>> @renamed_kwargs(inputs="example_inputs")
        ... def f(example_inputs=None):
        ...     return example_inputs
        >>> import warnings
        >>> with warnings.catch_warnings(record=True):
        ...     f(inputs=3)
        3
    """

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {old!r} and its new name {new!r}; pass only {new!r}")
                    warnings.warn(f"{fn.__name__}({old}=...) is deprecated and will be removed in the next release; "
                                  f"use {new}=...", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
