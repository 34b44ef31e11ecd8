"""One ``.safetensors`` file, read one tensor at a time."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

from ..errors import InputError, first_line
from ..safetensors_format import parse_header, torch_dtype, unreadable
from .base import TensorStore

SAFETENSORS_SUFFIXES = (".safetensors",)


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
        self._entries: dict[str, tuple[torch.dtype | None, tuple[int, ...], int, int]] = {}
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
        # Checked as the safetensors library checks it (see safetensors_format): a file that
        # library would refuse is refused here, before any of its bytes become numbers.
        header = parse_header(lambda offset, size: os.pread(self._fd, size, offset), os.fstat(self._fd).st_size, path=self.path)
        self._data_start = header.data_start
        self._dtype_names = {name: entry.dtype for name, entry in header.tensors.items()}
        # dtype None: a valid tensor torch cannot hold (F4, F6); refused only if it is read.
        self._entries = {name: (torch_dtype(entry.dtype), entry.shape, entry.begin, entry.end) for name, entry in header.tensors.items()}

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype | None:
        return self._entries[key][0]

    def _read(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[key]
        if dtype is None:
            raise unreadable(self._dtype_names[key], path=self.path, tensor=key)
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

    def __getstate__(self) -> dict[str, object]:
        # A file descriptor does not travel (the ray engine sends stores to other processes):
        # the path does, and the receiving process opens the file and checks its header again.
        return {"path": self.path}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            self._fd = None
            os.close(fd)
