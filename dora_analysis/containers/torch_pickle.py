"""Pickled state dicts (``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt``), loaded without running code."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, first_line
from .base import TensorStore

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


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
