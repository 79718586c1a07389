"""Deprecated names: one warning, one spelling, gone after one release.

An old public name stays for one release as an alias that warns with
`DeprecationWarning`, naming its replacement; CHANGELOG.md lists each under
"Deprecated". A public face lists its deprecated module attributes with
`face_getattr`, which it re-exports as its `__getattr__`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any


def warn(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warns that `old` is deprecated in favour of `new`.

    Example:
      >>> import warnings
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     warn("bnjax.old", "bnjax.new")
      >>> str(caught[0].message)
      'bnjax.old is deprecated and goes in the next release; use bnjax.new.'
    """
    warnings.warn(
        f"{old} is deprecated and goes in the next release; use {new}.",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def face_getattr(face: str, aliases: Mapping[str, tuple[str, Any]]) -> Callable[[str], Any]:
    """A module `__getattr__` serving deprecated names: `{old: (replacement, value)}`.

    Example:
      >>> getattr_ = face_getattr("bnjax.example", {"OLD": ("bnjax.NEW", 1)})
      >>> import warnings
      >>> with warnings.catch_warnings():
      ...     warnings.simplefilter("ignore")
      ...     getattr_("OLD")
      1
    """

    def __getattr__(name: str) -> Any:
        if name in aliases:
            new, value = aliases[name]
            warn(f"{face}.{name}", new)
            return value
        raise AttributeError(f"module {face!r} has no attribute {name!r}")

    return __getattr__
