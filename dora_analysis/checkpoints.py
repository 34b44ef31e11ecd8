"""Finding and lazily reading full checkpoints, one tensor at a time.

A :class:`TensorStore` is a read-only mapping from tensor name to tensor that reads nothing
until asked: ``keys()`` and ``shape()`` come from headers and indexes, ``get()`` reads one
tensor. Supported:

* a ``.safetensors`` file (header checked on open, each tensor mapped only while in use);
* sharded safetensors with ``*.safetensors.index.json`` (``{"weight_map": {name: shard}}``);
* ``pytorch_model.bin`` / ``.pt`` / ``.pth`` / ``.ckpt``, and sharded ``.bin`` with
  ``pytorch_model.bin.index.json``, loaded with ``weights_only=True`` (never running pickled
  code) and memory-mapped where the file format allows;
* a folder holding any of these (see :func:`find_checkpoint_file` for the order).

Anything unreadable raises :class:`~dora_analysis.errors.InputError` naming the file.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import re
import struct
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from .errors import InputError, first_line

SAFETENSORS_SUFFIXES = (".safetensors",)
# The safetensors spec caps the header at 100 MB; anything larger is garbage, not a header.
_MAX_HEADER_BYTES = 100_000_000
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Looked for in this order inside a checkpoint folder; the first that exists wins.
_FOLDER_CANDIDATES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


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
        folder = self.path if self.path.is_dir() else self.path.parent
        cfg = folder / "config.json"
        if not cfg.is_file():
            return {}
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors)"


class SafetensorsStore(TensorStore):
    """One ``.safetensors`` file, each tensor memory-mapped on its own.

    The format is an 8-byte little-endian header length, a JSON header
    (``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``) and the raw bytes. The
    header is parsed and checked against the file size on open, so a truncated file fails
    there, naming itself. Each tensor then gets its own small mapping rather than one map of
    the whole file: a whole-file map keeps every page it touched resident (and counted in
    RSS) for as long as it is open, which for a whole-model walk is the whole model.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        self._fd: int | None = None
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise InputError(f"cannot open ({exc.strerror})", path=path) from exc
        try:
            self._parse_header()
        except Exception:
            os.close(self._fd)
            self._fd = None
            raise

    def _parse_header(self) -> None:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise self._corrupt("file is shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > _MAX_HEADER_BYTES:
            raise self._corrupt(f"header length {n} does not fit in a {size}-byte file")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._corrupt(f"header is not valid JSON ({first_line(exc)})") from exc
        self._data_start = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise self._corrupt(f"bad header entry ({first_line(exc)})", tensor=name) from exc
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise self._corrupt(f"data offsets hold {end - begin} bytes, shape needs {nbytes}", tensor=name)
            if self._data_start + end > size:
                raise self._corrupt("tensor data runs past the end of the file (truncated?)", tensor=name)
            self._entries[name] = (dtype, shape, begin, end)

    def _corrupt(self, why: str, tensor: str | None = None) -> InputError:
        return InputError(
            f"not a readable safetensors file: {why}",
            path=self.path,
            tensor=tensor,
            hint="the file may be truncated or corrupt; re-download or re-save it",
        )

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def _read(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[key]
        start = self._data_start + begin
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        # Map just this tensor's pages: no copy, and they leave the process's RSS as soon as
        # the tensor is dropped (the mapping lives exactly as long as the tensor's buffer).
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        skip = start - aligned
        if skip % dtype.itemsize == 0:
            try:
                # ACCESS_COPY: a private mapping, writable as torch wants, never written back.
                region = mmap.mmap(self._fd, skip + end - begin, offset=aligned, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot map tensor ({first_line(exc)})", path=self.path, tensor=key) from exc
            flat = torch.frombuffer(region, dtype=torch.uint8, offset=skip, count=end - begin)
            return flat.view(dtype).reshape(shape)
        return self._pread(key, start, end - begin).view(dtype).reshape(shape)

    def _pread(self, key: str, start: int, nbytes: int) -> torch.Tensor:
        """Read bytes into a fresh buffer: for tensors whose offset is not aligned to their dtype."""
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < nbytes:  # pread may return short reads on large requests
            n = os.preadv(self._fd, [view[done:]], start + done)
            if n <= 0:
                raise InputError("file ended while reading tensor (truncated?)", path=self.path, tensor=key)
            done += n
        return buf

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            self._fd = None
            os.close(fd)


class TorchStore(TensorStore):
    """A pickled state dict (``.bin``/``.pt``/...), loaded with ``weights_only=True``.

    Zip-format files (torch >= 1.6) are memory-mapped, so tensors are paged in only when
    touched; legacy files are read whole, which is unavoidable for that format.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._tensors = _flatten_state(_torch_load(path), path)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def _read(self, key: str) -> torch.Tensor:
        return self._tensors[key]


class ShardedStore(TensorStore):
    """A checkpoint split over shards, described by a ``*.index.json`` weight map.

    Shards are opened on first use; each shard's header is read once.
    """

    def __init__(self, index_path: Path) -> None:
        super().__init__(index_path)
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
            if not (index_path.parent / shard).is_file():
                raise InputError("shard listed in the index is missing", path=index_path.parent / shard)

    def _shard(self, key: str) -> TensorStore:
        """The opened shard that holds ``key``; the index's claim is checked against it."""
        name = self._weight_map[key]
        if name not in self._shards:
            self._shards[name] = open_file(self.path.parent / name)
        shard = self._shards[name]
        if key not in shard:
            raise InputError("tensor listed in the index is missing from its shard", path=shard.path, tensor=key)
        return shard

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shard(key).shape(key)

    def _read(self, key: str) -> torch.Tensor:
        return self._shard(key).get(key)


def open_file(path: Path) -> TensorStore:
    """Open one checkpoint file (safetensors, pickle, or an index of shards)."""
    name = path.name
    if name.endswith(".index.json"):
        return ShardedStore(path)
    if name.endswith(SAFETENSORS_SUFFIXES):
        return SafetensorsStore(path)
    if name.endswith(PICKLE_SUFFIXES):
        return TorchStore(path)
    raise InputError(
        "unknown checkpoint format",
        path=path,
        hint="expected .safetensors, .bin/.pt/.pth/.ckpt, a *.index.json, or a folder holding one",
    )


def find_checkpoint_file(folder: Path) -> Path | None:
    """The weights file a checkpoint folder holds, or None.

    Order: ``model.safetensors.index.json``, ``model.safetensors``,
    ``pytorch_model.bin.index.json``, ``pytorch_model.bin``; else the only
    ``*.safetensors.index.json``, ``*.bin.index.json``, ``*.safetensors`` or pickle file.
    """
    for name in _FOLDER_CANDIDATES:
        if (folder / name).is_file():
            return folder / name
    for pattern in ("*.safetensors.index.json", "*.bin.index.json", "*.safetensors", *(f"*{s}" for s in PICKLE_SUFFIXES)):
        found = sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(("optimizer", "scheduler", "rng_state", "training_args")))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise InputError(
                f"several candidate weight files ({', '.join(p.name for p in found[:4])})",
                path=folder,
                hint="point at one file, or add an index.json that lists the shards",
            )
    return None


def open_checkpoint(path: str | Path) -> TensorStore:
    """Open a full checkpoint: a weights file or a folder holding one.

    Args:
        path: A ``.safetensors``/``.bin``/``.pt`` file, a ``*.index.json``, or a folder.

    Returns:
        A lazy :class:`TensorStore`.

    Raises:
        InputError: The path is missing, holds no checkpoint, or cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path=path)
    if path.is_dir():
        found = find_checkpoint_file(path)
        if found is None:
            raise InputError(
                "no checkpoint in folder",
                path=path,
                hint="expected model.safetensors, pytorch_model.bin, a sharded index, or checkpoint-N/ subfolders",
            )
        return open_file(found)
    return open_file(path)


def _torch_load(path: Path) -> Any:
    """``torch.load`` that never executes pickled code and maps the file where it can."""
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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
