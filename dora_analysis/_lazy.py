"""Lazy package exports: public names imported on first use, not when the package loads.

Used by the package ``__init__`` files so that light entry points (``--help`` of every
command) start without loading torch and pandas.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``name`` from ``package.<exports[name]>`` on first use.

    The value is then cached in the package's namespace, so later lookups are plain attribute
    reads.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
