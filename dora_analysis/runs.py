"""Tuned states as sources of effective weights, and runs as ordered lists of them.

A :class:`Snapshot` is one tuned state (a fine-tuned checkpoint, an adapter) that yields, for
a base tensor, the effective tuned tensor in the base's storage layout. Full checkpoints hold
that tensor outright (:class:`FullSnapshot`); adapters compute it from the base tensor
(``dora_analysis.adapters``), so the analyzer hands every snapshot the base tensor it has
already read.

A :class:`Run` is a named, ordered list of ``(step, snapshot)``: a training run folder with
``checkpoint-N/`` subfolders, or a single checkpoint (one step).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints import TensorStore, open_checkpoint
from .errors import InputError
from .names import match_names

CHECKPOINT_DIR_RE = re.compile(r"^checkpoint-(\d+)$")


class Snapshot(ABC):
    """One tuned state whose effective weights can be read matrix by matrix.

    Attributes:
        path: Where it was read from (for messages).
        method: ``"ft"`` for full weights; adapters say ``"lora"``, ``"dora"``, ``"vera"``...
        complete: True if it holds every base matrix (a full checkpoint): a selected matrix
            it lacks is an error. False for adapters, which change only the modules they target.
    """

    path: Path
    method: str = "ft"
    complete: bool = True

    @abstractmethod
    def bind(self, base: TensorStore) -> set[str]:
        """Prepare to serve ``base``; return the base tensor names this snapshot provides."""

    def stored_transposed(self, name: str) -> bool | None:
        """Whether base tensor ``name`` is stored ``[in, out]``, if this snapshot knows.

        The analyzer asks only when the base has no ``config.json`` to tell it (an adapter's
        ``fan_in_fan_out`` knows a GPT-2 ``Conv1D``; a full checkpoint knows nothing).
        """
        return None

    @abstractmethod
    def weight(self, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        """The effective tuned tensor for base tensor ``name``, shaped and laid out like it.

        Args:
            name: A base tensor name returned by :meth:`bind`.
            base_weight: The base tensor as stored (adapters build on it; full checkpoints
                ignore it).
        """


class FullSnapshot(Snapshot):
    """A full fine-tuned checkpoint: every tensor stored outright."""

    method = "ft"
    complete = True

    def __init__(self, store: TensorStore) -> None:
        self.store = store
        self.path = store.path
        self._names: dict[str, str] = {}

    def bind(self, base: TensorStore) -> set[str]:
        self._names = match_names(base.keys(), self.store.keys())
        return set(self._names)

    def weight(self, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        return self.store.get(self._names[name])

    def __repr__(self) -> str:
        return f"FullSnapshot({str(self.path)!r})"


def open_snapshot(path: str | Path, *, dora_scale_axis: str | None = None) -> Snapshot:
    """Open one tuned state: an adapter (any supported format) or a full checkpoint.

    Args:
        path: An adapter folder or file, or a full checkpoint folder or file.
        dora_scale_axis: Passed to the adapter reader for kohya/LyCORIS ``dora_scale`` on
            square matrices, whose axis the shape cannot tell.
    """
    from . import adapters  # local: adapters builds on this module

    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path=path)
    options = {} if dora_scale_axis is None else {"dora_axis": dora_scale_axis}
    snap = adapters.open_adapter(path, **options)
    return snap if snap is not None else FullSnapshot(open_checkpoint(path))


@dataclass
class Run:
    """A named sequence of tuned snapshots, ordered by training step.

    Attributes:
        name: Label in the ``run`` column (the folder name unless given).
        path: The run folder or single checkpoint it came from.
        steps: ``(step, snapshot)`` pairs, ascending by step.
        method: ``ft`` / ``lora`` / ``dora`` / ...; taken from the snapshots unless given.
    """

    name: str
    path: Path
    steps: list[tuple[int, Snapshot]] = field(default_factory=list)
    method: str = "ft"


def read_step(folder: Path) -> int | None:
    """``global_step`` from a folder's ``trainer_state.json``, or None."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return None
    try:
        step = json.loads(state.read_text()).get("global_step")
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError("unreadable trainer_state.json", path=state) from exc
    return int(step) if isinstance(step, (int, float)) else None


def checkpoint_dirs(folder: Path) -> list[tuple[int, Path]]:
    """``checkpoint-N/`` subfolders of a run folder as ``(step, path)``, ascending.

    The step is ``global_step`` from the snapshot's ``trainer_state.json``, else N.
    """
    found = []
    for child in folder.iterdir() if folder.is_dir() else ():
        m = CHECKPOINT_DIR_RE.match(child.name)
        if m and child.is_dir():
            step = read_step(child)
            found.append((int(m.group(1)) if step is None else step, child))
    return sorted(found, key=lambda t: t[0])


def open_run(
    path: str | Path,
    *,
    name: str | None = None,
    method: str | None = None,
    dora_scale_axis: str | None = None,
) -> Run:
    """Open a run folder (``checkpoint-N/`` subfolders) or a single tuned checkpoint.

    Args:
        path: A run folder, a checkpoint folder, an adapter folder, or a weights file.
        name: The ``run`` label; default: the path's final component.
        method: Override the method label (default: from the snapshots; ``ft`` for full).
        dora_scale_axis: See :func:`open_snapshot`.

    Returns:
        A :class:`Run`. A single checkpoint is one step: its ``global_step`` from
        ``trainer_state.json``, else N if named ``checkpoint-N``, else 0.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path=path)
    dirs = checkpoint_dirs(path)
    if dirs:
        steps = [(step, open_snapshot(p, dora_scale_axis=dora_scale_axis)) for step, p in dirs]
    else:
        step = read_step(path) if path.is_dir() else None
        if step is None:
            m = CHECKPOINT_DIR_RE.match(path.name)
            step = int(m.group(1)) if m else 0
        steps = [(step, open_snapshot(path, dora_scale_axis=dora_scale_axis))]
    seen = {s for s, _ in steps}
    if len(seen) != len(steps):
        raise InputError("two checkpoints report the same step", path=path, hint="check trainer_state.json global_step")
    methods = {snap.method for _, snap in steps}
    if method is None:
        if len(methods) > 1:
            raise InputError(f"run mixes methods {sorted(methods)}", path=path)
        method = methods.pop()
    label = name or (path.name if path.name else str(path))
    return Run(name=label, path=path, steps=steps, method=method)
