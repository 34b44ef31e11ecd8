"""A checkpoint split over shards, described by a ``*.index.json`` weight map."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import InputError, first_line
from .base import TensorStore


class ShardedStore(TensorStore):
    """A checkpoint split over shards, described by a ``*.index.json`` weight map.

    Shards are opened on first use; each shard's header is read once.

    Args:
        index_path: The ``*.index.json``.
        open_shard: Opens one shard file (the container registry's ``open_file``, so a shard
            may be any file format it knows).
    """

    def __init__(self, index_path: Path, open_shard: Callable[[Path], TensorStore]) -> None:
        super().__init__(index_path)
        self._open_shard = open_shard
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"not a valid checkpoint index ({first_line(exc)})",
                path=index_path,
                hint='expected JSON with {"weight_map": {tensor_name: shard_file}}',
            ) from exc
        self._weight_map: dict[str, str] = {str(k): str(v) for k, v in weight_map.items()}
        self._shards: dict[str, TensorStore] = {}
        for shard in set(self._weight_map.values()):
            if shard.endswith(".index.json") or (index_path.parent / shard).resolve() == index_path.resolve():
                raise InputError(
                    f"the index lists an index as a shard ({shard}), which would read itself forever",
                    path=index_path,
                    hint="each weight_map value must name a weights file (.safetensors, .bin)",
                )
            mode = _mode(index_path.parent / shard)
            if mode is not None and not stat.S_ISREG(mode):
                raise InputError("not a regular file; only regular files are read", path=index_path.parent / shard)
            if not (index_path.parent / shard).is_file():
                raise InputError("shard listed in the index is missing", path=index_path.parent / shard)

    def _shard(self, key: str) -> TensorStore:
        """The opened shard that holds ``key``; the index's claim is checked against it."""
        name = self._weight_map[key]
        if name not in self._shards:
            self._shards[name] = self._open_shard(self.path.parent / name)
        shard = self._shards[name]
        if key not in shard:
            raise InputError("tensor listed in the index is missing from its shard", path=shard.path, tensor=key)
        return shard

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shard(key).shape(key)

    def dtype(self, key: str) -> torch.dtype | None:
        return self._shard(key).dtype(key)

    def _read(self, key: str) -> torch.Tensor:
        return self._shard(key).get(key)

    def held_bytes(self) -> int:
        return sum(shard.held_bytes() for shard in self._shards.values())  # the shards opened so far


def _mode(path: Path) -> int | None:
    """The file type and permission bits of ``path`` (following links), or None if it cannot be seen."""
    try:
        return os.stat(path).st_mode
    except (OSError, ValueError):
        return None
