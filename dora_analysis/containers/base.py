"""The lazy tensor store every checkpoint container reader returns."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError


class TensorStore(ABC):
    """Read-only, lazy name -> tensor mapping backed by one checkpoint on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @abstractmethod
    def keys(self) -> list[str]:
        """All tensor names, in file order."""

    @abstractmethod
    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` without reading its data."""

    def dtype(self, key: str) -> torch.dtype | None:
        """The stored dtype of ``key`` from headers, if the format says without reading data."""
        return None

    @abstractmethod
    def _read(self, key: str) -> torch.Tensor:
        """Read one tensor (in its stored dtype)."""

    def get(self, key: str) -> torch.Tensor:
        """Read tensor ``key`` in its stored dtype.

        Raises:
            InputError: The name is absent or the bytes cannot be read.
        """
        if key not in self:
            raise InputError("no such tensor in checkpoint", path=self.path, tensor=key)
        return self._read(key)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._key_set)

    @cached_property
    def _key_set(self) -> frozenset[str]:
        return frozenset(self.keys())

    @cached_property
    def config(self) -> dict[str, Any]:
        """The ``config.json`` beside the checkpoint (Hugging Face model config), or ``{}``."""
        return config_beside(self.path)

    def held_bytes(self) -> int:
        """Bytes of tensor data this store keeps in memory for as long as it is open (or, opened
        inside :func:`headers_only`, would keep once opened for reading); 0 for a reader that
        reads one tensor at a time."""
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors)"


# Set while checkpoints are opened for their names and shapes alone (``--dry-run``): a reader
# that would have to load its tensors to open its checkpoint takes the shapes another way
# (a torch pickle onto the ``meta`` device) or refuses (a DeepSpeed ZeRO step).
_HEADERS_ONLY: ContextVar[bool] = ContextVar("headers_only", default=False)


@contextmanager
def headers_only() -> Iterator[None]:
    """Within this block, opening a checkpoint may read headers only (see :func:`opening_headers_only`)."""
    token = _HEADERS_ONLY.set(True)
    try:
        yield
    finally:
        _HEADERS_ONLY.reset(token)


def opening_headers_only() -> bool:
    """True inside :func:`headers_only`: a reader must not load tensor data to open a checkpoint."""
    return _HEADERS_ONLY.get()


def config_beside(path: Path) -> dict[str, Any]:
    """The ``config.json`` in ``path`` (a folder) or beside it (a file), or ``{}``."""
    folder = path if path.is_dir() else path.parent
    cfg = folder / "config.json"
    if not cfg.is_file():
        return {}
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class MemoryStore(TensorStore):
    """A :class:`TensorStore` over tensors already in memory (a live model's, a copy, a consolidation).

    Unlike the stores over files, it cannot travel as a path: an engine whose workers open the
    checkpoints themselves (``ray``) refuses it, with ``to_files`` as the way out.

    Args:
        tensors: Name -> tensor; read as they are, never copied or changed.
        path: What messages name as the source (e.g. the run folder).
        config: The model's config (``model_type`` decides the storage layout of some matrices).
        to_files: How to have these tensors as checkpoint files instead, for messages (e.g.
            the command that consolidates a DeepSpeed ZeRO step).
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        path: Path,
        config: Mapping[str, Any] | None = None,
        *,
        to_files: str | None = None,
    ) -> None:
        super().__init__(Path(path))
        self._tensors = dict(tensors)
        self.config = dict(config or {})  # shadows the base class's config.json lookup
        self.to_files = to_files

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def _read(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def held_bytes(self) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self._tensors.values()}
        return sum(storages.values())
