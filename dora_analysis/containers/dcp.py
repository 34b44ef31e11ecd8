"""torch distributed checkpoints (``.metadata`` + ``*.distcp``), read in one process, one tensor at a time.

What ``torch.distributed.checkpoint.save`` writes, and so FSDP's ``SHARDED_STATE_DICT``,
torchtitan and torchtune's distributed checkpointer: a folder with a ``.metadata`` file (every
tensor's global shape, dtype and where its chunks lie) and one ``__<rank>_<n>.distcp`` file
per writer. Nested state dicts are stored flat, with dotted keys (``{"model": {...}}`` becomes
``model.<name>``); the analyzer's name matching finds that prefix as it finds ``bert.``.

Reading needs no process group: ``torch.distributed.checkpoint.load(..., no_dist=True)``
fills just the tensors asked for, assembling each from the chunks every rank wrote. The
``.metadata`` file is a pickle; it is read with an unpickler that only builds the checkpoint
module's own metadata classes, never arbitrary code (as ``.bin`` files are loaded with
``weights_only=True``).
"""

from __future__ import annotations

import functools
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, first_line
from .base import TensorStore

METADATA = ".metadata"
DCP_SUFFIX = ".distcp"

# Top-level state the trainers save beside the model: never weights to compare.
_NOT_MODEL = ("optimizer", "optim", "optimizers", "lr_scheduler", "lr_schedulers", "scheduler", "dataloader", "train_state")

# What a DCP `.metadata` pickle may build: its own metadata classes, torch sizes, dtypes and
# layouts, paths. Anything else (a function, a class from another module) is refused.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


def is_dcp_folder(path: Path) -> bool:
    """A folder with ``.metadata`` and at least one ``*.distcp`` file."""
    return path.is_dir() and (path / METADATA).is_file() and any(path.glob(f"*{DCP_SUFFIX}"))


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES:
            import importlib

            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type):
                return obj
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to build {module}.{name} from a checkpoint's .metadata")


def _read_metadata(folder: Path) -> Any:
    from torch.distributed.checkpoint.metadata import Metadata

    path = folder / METADATA
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"unreadable torch distributed checkpoint metadata ({first_line(exc)})",
            path=path,
            hint="only the metadata classes of torch.distributed.checkpoint are loaded, never code",
        ) from exc
    except (OSError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"unreadable torch distributed checkpoint metadata ({first_line(exc)})", path=path) from exc
    if not isinstance(metadata, Metadata):
        raise InputError("not torch distributed checkpoint metadata", path=path)
    return metadata


class DcpStore(TensorStore):
    """A torch distributed checkpoint folder, each tensor assembled from its chunks when asked.

    Keys are the flat names the checkpoint stores, optimizer and scheduler state left out;
    shapes and dtypes come from ``.metadata``, so nothing else is read on open.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self._metadata = _read_metadata(path)
        self._entries: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            key: (tuple(meta.size), meta.properties.dtype)
            for key, meta in self._metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata) and key.split(".", 1)[0] not in _NOT_MODEL
        }
        if not self._entries:
            raise InputError("torch distributed checkpoint holds no model tensors", path=path)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][0]

    def dtype(self, key: str) -> torch.dtype | None:
        return self._entries[key][1]

    def _read(self, key: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        shape, dtype = self._entries[key]
        out = {key: torch.empty(shape, dtype=dtype)}
        try:
            with warnings.catch_warnings():
                # "torch.distributed is disabled ... assuming the intent is to load in a single process": it is.
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(out, storage_reader=_reader_class()(self.path, self._metadata), no_dist=True)
        except Exception as exc:  # DCP wraps reader failures in its own exception types
            raise InputError(
                f"cannot read tensor from torch distributed checkpoint ({first_line(exc)})", path=self.path, tensor=key
            ) from exc
        return out[key]

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]


@functools.cache
def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        """torch's file-system reader, given the metadata :class:`DcpStore` read safely, once."""

        def __init__(self, path: Path, metadata: Any) -> None:
            super().__init__(path)
            self._checked_metadata = metadata

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            # As FileSystemReader.read_metadata does after its own pickle.load.
            metadata = self._checked_metadata
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader
