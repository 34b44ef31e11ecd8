"""Pickled state dicts (``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt``), loaded without running code."""

from __future__ import annotations

import mmap
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, first_line
from .base import TensorStore, opening_headers_only

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class TorchStore(TensorStore):
    """A pickled state dict (``.bin``/``.pt``/...), loaded with ``weights_only=True``.

    Zip-format files (torch >= 1.6) are unpickled onto the ``meta`` device first: names,
    shapes, strides and each storage's byte offset in the file (``_checkpoint_offset``, which
    torch records for meta loads), and no data. Each tensor then gets its own small mapping of
    its storage's bytes, as :class:`~.safetensors.SafetensorsStore` does, so its pages leave
    the process's RSS when the tensor is dropped; one mapping of the whole file would keep
    every page touched resident until the store closes, which over a whole-model walk is the
    whole model. Legacy (non-zip) files, and zip files whose storages cannot be mapped as they
    are (big-endian, or from a torch that records no offsets), are read whole and held while
    the store is open (:meth:`held_bytes`); inside :func:`~.base.headers_only` they are
    unpickled onto the ``meta`` device instead, for their names and shapes.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._tensors: dict[str, torch.Tensor] = {}
        self._layout: dict[str, _Layout] = {}
        self._whole = False
        if zipfile.is_zipfile(path) and _little_endian(path):
            meta = _flatten_state(_torch_load(path, meta=True), path)
            layout = {k: _Layout.of(t) for k, t in meta.items()}
            if all(v is not None for v in layout.values()):
                self._layout = layout  # type: ignore[assignment]
                return
        self._whole = True
        self._tensors = _flatten_state(_torch_load(path, meta=opening_headers_only()), path)

    def keys(self) -> list[str]:
        return list(self._layout or self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._layout[key].shape if self._layout else tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype | None:
        return self._layout[key].dtype if self._layout else self._tensors[key].dtype

    def held_bytes(self) -> int:
        # The storages are the file, but for its pickle and (zip) records: its size bounds them.
        return self.path.stat().st_size if self._whole else 0

    def _read(self, key: str) -> torch.Tensor:
        if not self._layout:
            tensor = self._tensors[key]
            if tensor.is_meta:
                raise RuntimeError(f"{self.path}: opened for headers only, read {key}")  # a caller's bug, not bad input
            return tensor
        entry = self._layout[key]
        if entry.nbytes == 0:
            return torch.empty_strided(entry.shape, entry.stride, dtype=entry.dtype)
        start = entry.offset
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        skip = start - aligned
        if skip % entry.dtype.itemsize:
            raise InputError("tensor data is not aligned to its dtype in the file", path=self.path, tensor=key)
        try:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: a private mapping, writable as torch wants, never written back.
                region = mmap.mmap(f.fileno(), skip + entry.nbytes, offset=aligned, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot map tensor ({first_line(exc)}; truncated?)", path=self.path, tensor=key) from exc
        flat = torch.frombuffer(region, dtype=torch.uint8, offset=skip, count=entry.nbytes).view(entry.dtype)
        return torch.as_strided(flat, entry.shape, entry.stride, entry.storage_offset)

    def __getstate__(self) -> dict[str, Any]:
        # The ray engine sends stores to other processes: the path travels, not the tensors.
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]


@dataclass(frozen=True)
class _Layout:
    """Where one tensor's bytes are in a zip-format torch file, and how to view them."""

    offset: int  # of its storage, from the start of the file
    nbytes: int  # of its storage
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # in elements

    @classmethod
    def of(cls, meta: torch.Tensor) -> _Layout | None:
        storage = meta.untyped_storage()
        offset = getattr(storage, "_checkpoint_offset", None)
        if offset is None:
            return None  # a torch that does not record offsets: fall back to a whole-file map
        return cls(int(offset), storage.nbytes(), meta.dtype, tuple(meta.shape), tuple(meta.stride()), meta.storage_offset())


def _little_endian(path: Path) -> bool:
    """The file's storages are little-endian (the ``byteorder`` record; absent means little)."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/byteorder")), None)
            return name is None or z.read(name).strip() == b"little"
    except (OSError, zipfile.BadZipFile):
        return True  # torch.load says what is wrong


def _torch_load(path: Path, *, meta: bool = False) -> Any:
    """``torch.load`` that never executes pickled code and maps the file where it can.

    With ``meta``, tensors come back on the ``meta`` device: layout only, no data kept (a zip
    file's data is not read at all; torch's loader still passes over a legacy file's bytes).
    """
    mapped = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="meta" if meta else "cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as exc:
        # weights_only refuses two different things: globals (code, custom classes), which we
        # must never run, and bytes that are not a torch pickle at all.
        blocked = re.search(r"(unsupported GLOBAL [\w.]+|Unsupported global: [^\s]+)", str(exc), re.IGNORECASE)
        if blocked:
            raise InputError(
                f"refusing to load: the pickle calls code or custom classes ({blocked.group(1)})",
                path=path,
                hint="only weights_only=True loads are allowed; convert it to safetensors in a trusted environment",
            ) from exc
        raise InputError("not a readable PyTorch checkpoint (not a torch-saved state dict)", path=path) from exc
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(
            f"not a readable PyTorch checkpoint ({first_line(exc)})",
            path=path,
            hint="the file may be truncated or corrupt",
        ) from exc


def _flatten_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded state dict, unwrapping ``{"state_dict": ...}``-style containers."""
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model_state_dict", "model", "module"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise InputError("file holds no state dict of tensors", path=path)
