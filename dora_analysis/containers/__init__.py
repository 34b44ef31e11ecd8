"""Checkpoint containers: finding and lazily reading full checkpoints, one tensor at a time.

Every container reader is one entry in :data:`CONTAINERS`, tried in order, first match wins.
A reader says whether it ``claims`` a path (a file or a folder) and ``open``\\ s it as a
:class:`TensorStore`: a read-only mapping from tensor name to tensor that reads nothing until
asked (``keys()`` and ``shape()`` come from headers and indexes, ``get()`` reads one tensor).
Built in:

* ``sharded-index``: sharded checkpoints, ``*.index.json`` (``{"weight_map": {name: shard}}``);
* ``safetensors``: a ``.safetensors`` file (header checked on open, each tensor mapped only
  while in use);
* ``torch-pickle``: ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt``, loaded with ``weights_only=True``
  (never running pickled code) and memory-mapped where the file format allows;
* ``weights-folder``: a folder holding one of these (see :func:`find_checkpoint_file`);
* ``torch-dcp``: a torch distributed checkpoint folder (:mod:`.dcp`);
* ``hf-cache-repo``: a ``models--ORG--NAME`` folder of the Hugging Face cache (:mod:`.hf_cache`;
  a hub id ``ORG/NAME[@REV]`` given as a path is resolved there too);
* ``deepspeed-zero``: DeepSpeed ``global_stepN/`` folders (:mod:`.deepspeed`), refused with the
  command that consolidates them unless ``deepspeed`` is installed.

A container that is a folder of its own (a torch distributed checkpoint, say) registers with
``first=True`` so it is tried before ``weights-folder``. Anything unreadable raises
:class:`~dora_analysis.errors.InputError` naming the file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..registry import Registry
from . import deepspeed, hf_cache, quantized
from .base import MemoryStore, TensorStore, headers_only
from .dcp import DcpStore, is_dcp_folder
from .safetensors import SAFETENSORS_SUFFIXES, SafetensorsStore
from .shapes import ShapesStore, is_shapes_file, is_shapes_folder
from .sharded import ShardedStore
from .torch_pickle import PICKLE_SUFFIXES, TorchStore

__all__ = [
    "CONTAINERS",
    "PICKLE_SUFFIXES",
    "SAFETENSORS_SUFFIXES",
    "ContainerReader",
    "DcpStore",
    "MemoryStore",
    "SafetensorsStore",
    "ShardedStore",
    "TensorStore",
    "TorchStore",
    "find_checkpoint_file",
    "headers_only",
    "open_checkpoint",
    "open_file",
]  # fmt: skip


@dataclass(frozen=True)
class ContainerReader:
    """One checkpoint container format.

    Attributes:
        name: Short name, for messages and :meth:`Registry.unregister`.
        claims: Whether a path (file or folder) is in this format; cheap (names, not data).
        open: Open a claimed path as a lazy :class:`TensorStore`.
        describes: What the format looks like on disk, listed when nothing claims a path.
    """

    name: str
    claims: Callable[[Path], bool]
    open: Callable[[Path], TensorStore]
    describes: str


CONTAINERS: Registry[ContainerReader] = Registry("container reader")

# Looked for in this order inside a checkpoint folder; the first that exists wins.
_FOLDER_CANDIDATES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# Files beside the weights that a training run writes and that are never the model.
_NOT_WEIGHTS = ("optimizer", "scheduler", "rng_state", "training_args")


def find_checkpoint_file(folder: Path) -> Path | None:
    """The weights file a checkpoint folder holds, or None.

    Order: ``model.safetensors.index.json``, ``model.safetensors``,
    ``pytorch_model.bin.index.json``, ``pytorch_model.bin``; else the only
    ``*.safetensors.index.json``, ``*.bin.index.json``, ``*.safetensors`` or pickle file.
    """
    for name in _FOLDER_CANDIDATES:
        refuse_special_file(folder / name)
        if (folder / name).is_file():
            return folder / name
    for pattern in ("*.safetensors.index.json", "*.bin.index.json", "*.safetensors", *(f"*{s}" for s in PICKLE_SUFFIXES)):
        found = sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(_NOT_WEIGHTS))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise InputError(
                f"several candidate weight files ({', '.join(p.name for p in found[:4])})",
                path=folder,
                hint="point at one file, or add an index.json that lists the shards",
            )
    return None


def _is_file_with(suffixes: tuple[str, ...]) -> Callable[[Path], bool]:
    return lambda path: path.is_file() and path.name.endswith(suffixes)


def _weights_folder(path: Path) -> bool:
    return path.is_dir() and find_checkpoint_file(path) is not None


def _open_weights_folder(folder: Path) -> TensorStore:
    found = find_checkpoint_file(folder)
    assert found is not None  # claimed
    return open_file(found)


CONTAINERS.register(
    ContainerReader("sharded-index", _is_file_with((".index.json",)), lambda p: ShardedStore(p, open_file), "a *.index.json of shards")
)
CONTAINERS.register(ContainerReader("safetensors", _is_file_with(SAFETENSORS_SUFFIXES), SafetensorsStore, ".safetensors"))
CONTAINERS.register(ContainerReader("torch-pickle", _is_file_with(PICKLE_SUFFIXES), TorchStore, "/".join(PICKLE_SUFFIXES)))
CONTAINERS.register(ContainerReader("weights-folder", _weights_folder, _open_weights_folder, "a folder holding one of these"))
# Folders of their own, tried before `weights-folder` (registered first, so listed in reverse).
CONTAINERS.register(
    ContainerReader(
        "deepspeed-zero", lambda p: deepspeed.claims(p, _weights_folder), deepspeed.open_zero, "a DeepSpeed global_stepN/ folder"
    ),
    first=True,
)
CONTAINERS.register(
    ContainerReader(
        "hf-cache-repo",
        hf_cache.is_cache_repo_folder,
        lambda p: open_checkpoint(hf_cache.snapshot_of_repo_folder(p)),
        "a Hugging Face cache models--ORG--NAME folder",
    ),
    first=True,
)
CONTAINERS.register(ContainerReader("shapes-only", is_shapes_folder, ShapesStore, "a folder with model.shapes.json"), first=True)
CONTAINERS.register(ContainerReader("shapes-file", is_shapes_file, ShapesStore, "a *.shapes.json (for --dry-run)"), first=True)
CONTAINERS.register(
    ContainerReader("torch-dcp", is_dcp_folder, DcpStore, "a torch distributed checkpoint (.metadata + *.distcp)"), first=True
)


def _reader_for(path: Path) -> ContainerReader | None:
    return next((reader for reader in CONTAINERS if reader.claims(path)), None)


def refuse_special_file(path: Path) -> None:
    """Only regular files are read: a FIFO, a device or a socket would block or never end.

    Raises:
        InputError: ``path`` exists and is neither a regular file nor a folder.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing: said by the caller, in its own words
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a device", stat.S_ISBLK: "a device", stat.S_ISSOCK: "a socket"}
        kind = next((name for test, name in kinds.items() if test(mode)), "not a file")
        raise InputError(f"not a regular file ({kind}); only regular files are read", path=path)


def open_file(path: Path) -> TensorStore:
    """Open one checkpoint file (safetensors, pickle, an index of shards, or a registered format)."""
    refuse_special_file(path)
    reader = _reader_for(path) if path.is_file() else None
    if reader is None:
        raise InputError("unknown checkpoint format", path=path, hint=f"expected {_formats()}")
    return reader.open(path)


def _formats() -> str:
    return ", ".join(reader.describes for reader in CONTAINERS)


def open_checkpoint(path: str | Path) -> TensorStore:
    """Open a full checkpoint: a weights file, or a folder that a registered container claims.

    Args:
        path: A ``.safetensors``/``.bin``/``.pt`` file, a ``*.index.json``, a folder, or a
            Hugging Face hub id ``ORG/NAME[@REVISION]`` found in the local cache.

    Returns:
        A lazy :class:`TensorStore`.

    Raises:
        InputError: The path is missing, holds no checkpoint, or cannot be read.
    """
    path = Path(path)
    refuse_special_file(path)
    if not path.exists():
        if hf_cache.parse_hub_id(str(path)) is not None:
            return open_checkpoint(hf_cache.resolve_hub_id(str(path)))  # ORG/NAME[@REV], from the cache only
        raise InputError("no such file or folder", path=path)
    reader = _reader_for(path)
    if reader is not None:
        return quantized.wrap(reader.open(path))  # quantized weights dequantized, or refused by name
    if path.is_dir():
        raise InputError(
            "no checkpoint in folder",
            path=path,
            hint="expected model.safetensors, pytorch_model.bin, a sharded index, or checkpoint-N/ subfolders",
        )
    raise InputError("unknown checkpoint format", path=path, hint=f"expected {_formats()}")
