"""An ordered registry, "first match wins": how formats, step patterns and metrics plug in.

Adding a format or a metric is one new file plus one :meth:`Registry.register` call; the code
that walks a registry never names an entry. The same shape as PEFT's ordered list of layer
dispatchers and transformers' ``model_type`` tables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries in a fixed order of precedence.

    Args:
        what: What the entries are, for messages ("container reader", "metric").
        name_of: How to read an entry's name.
    """

    def __init__(self, what: str, name_of: Callable[[T], str] = lambda e: e.name) -> None:  # type: ignore[attr-defined]
        self.what = what
        self._name_of = name_of
        self._entries: list[T] = []

    def register(self, entry: T, *, first: bool = False) -> T:
        """Add ``entry``: last (the default), or ``first`` so it is tried before every other.

        Raises:
            ValueError: An entry of the same name is registered already.
        """
        name = self._name_of(entry)
        if name in self.names():
            raise ValueError(f"a {self.what} named {name!r} is registered already")
        if first:
            self._entries.insert(0, entry)
        else:
            self._entries.append(entry)
        return entry

    def unregister(self, name: str) -> T:
        """Remove and return the entry called ``name``."""
        entry = self[name]
        self._entries.remove(entry)
        return entry

    @contextmanager
    def registered(self, entry: T, *, first: bool = False) -> Iterator[T]:
        """Register ``entry`` for the duration of a ``with`` block (tests, notebooks)."""
        self.register(entry, first=first)
        try:
            yield entry
        finally:
            self.unregister(self._name_of(entry))

    def names(self) -> list[str]:
        return [self._name_of(e) for e in self._entries]

    def __getitem__(self, name: str) -> T:
        for entry in self._entries:
            if self._name_of(entry) == name:
                return entry
        raise KeyError(f"no {self.what} named {name!r} (known: {', '.join(self.names())})")

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[T]:
        # A copy: an entry may register another while the registry is walked.
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
