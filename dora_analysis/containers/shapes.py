"""A shapes-only model description (``*.shapes.json``): names, shapes and a dtype, no weights.

For planning (``dora-analyze --dry-run``) a model that is not on this machine, e.g. a 70B run
before it is copied: ``{"dtype": "bfloat16", "tensors": {name: [dim, ...]}}``, as a file or
as ``model.shapes.json`` in a step folder. Reading a tensor from it is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, first_line
from .base import TensorStore

SHAPES_SUFFIX = ".shapes.json"
FOLDER_FILE = "model.shapes.json"


def is_shapes_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(SHAPES_SUFFIX)


def is_shapes_folder(path: Path) -> bool:
    return path.is_dir() and (path / FOLDER_FILE).is_file()


class ShapesStore(TensorStore):
    """Names and shapes from a JSON description; :meth:`get` refuses (there are no weights)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        file = path / FOLDER_FILE if path.is_dir() else path
        try:
            data = json.loads(file.read_text())
            self._dtype = getattr(torch, str(data.get("dtype", "float32")))
            if not isinstance(self._dtype, torch.dtype):
                raise ValueError(f"unknown dtype {data.get('dtype')!r}")
            self._shapes = {str(k): tuple(int(d) for d in v) for k, v in data["tensors"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(
                f"not a shapes description ({first_line(exc)})",
                path=file,
                hint='expected {"dtype": "bfloat16", "tensors": {"name": [rows, cols], ...}}',
            ) from exc

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtype

    def _read(self, key: str) -> torch.Tensor:
        raise InputError("a shapes-only description holds no weights", path=self.path, tensor=key, hint="use it with --dry-run")

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]
