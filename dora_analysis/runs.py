"""Runs: a training run folder as an ordered list of ``(step, snapshot)``.

A :class:`Run` is a named list of tuned states (:class:`~dora_analysis.snapshot.Snapshot`),
ordered by training step: a run folder whose step subfolders match a registered
:class:`StepPattern` (``checkpoint-N/`` for the Hugging Face Trainer), or a single checkpoint
(one step). Each tuned state is opened by :func:`open_snapshot`: the first adapter format that
claims it (:data:`dora_analysis.adapters.ADAPTER_FORMATS`), else a full checkpoint through the
container registry (:data:`dora_analysis.containers.CONTAINERS`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapters import open_adapter
from .containers import open_checkpoint
from .errors import InputError
from .registry import Registry
from .snapshot import FullSnapshot, Snapshot


@dataclass(frozen=True)
class StepPattern:
    """How one training framework names its step folders inside a run folder.

    Attributes:
        name: Short name (``hf-trainer``).
        regex: Matches a child folder's name; group 1 is the step number.
        step_file: A JSON file inside the step folder whose ``global_step`` is the true step
            (it wins over the number in the name), or None.
        files: The steps are files (Lightning's ``epoch=0-step=100.ckpt``), not folders.
    """

    name: str
    regex: re.Pattern[str]
    step_file: str | None = None
    files: bool = False


STEP_PATTERNS: Registry[StepPattern] = Registry("step-folder pattern")
STEP_PATTERNS.register(StepPattern("hf-trainer", re.compile(r"^checkpoint-(\d+)$"), "trainer_state.json"))
# torchtune: `epoch_N/` (the step column is then the epoch), holding the merged model as
# model-0000K-of-0000M.safetensors (+ index) and, for LoRA, the adapter beside it.
STEP_PATTERNS.register(StepPattern("torchtune", re.compile(r"^epoch_(\d+)$")))
# Accelerate `save_state` with automatic naming: `checkpoints/checkpoint_N/` (N counts saves).
STEP_PATTERNS.register(StepPattern("accelerate", re.compile(r"^checkpoint_(\d+)$")))
# PyTorch Lightning's ModelCheckpoint files: `epoch=0-step=100.ckpt` (`last.ckpt` has no step).
STEP_PATTERNS.register(StepPattern("lightning", re.compile(r"^(?:.*[-_])?step=(\d+)(?:[-_=].*)?\.ckpt$"), files=True))
# DeepSpeed `global_stepN/`: matched so the run is found; its container reader says how to
# consolidate the ZeRO shards (dora_analysis.containers.deepspeed).
STEP_PATTERNS.register(StepPattern("deepspeed", re.compile(r"^global_step(\d+)$")))


def open_snapshot(path: str | Path, *, reader_options: Mapping[str, Any] | None = None) -> Snapshot:
    """Open one tuned state: an adapter (any registered format) or a full checkpoint.

    Args:
        path: An adapter folder or file, or a full checkpoint folder or file.
        reader_options: Format-specific settings, passed to the adapter formats (e.g.
            ``{"dora_axis": "out"}`` for kohya / LyCORIS ``dora_scale`` on square matrices).
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path=path)
    snap = open_adapter(path, reader_options=reader_options)
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


def read_step(folder: Path, step_file: str | None = "trainer_state.json") -> int | None:
    """``global_step`` from a step folder's state file (``trainer_state.json``), or None."""
    if step_file is None:
        return None
    state = folder / step_file
    if not state.is_file():
        return None
    try:
        step = json.loads(state.read_text()).get("global_step")
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError("unreadable trainer_state.json", path=state) from exc
    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step != int(step) or step < 0:
        raise InputError(f"global_step is {step!r}: a step must be a whole number, 0 or more", path=state, hint="fix or remove the field")
    return int(step)


def match_step_folder(name: str) -> tuple[StepPattern, int] | None:
    """The first registered pattern a folder name matches, and the step number in the name."""
    for pattern in STEP_PATTERNS:
        m = pattern.regex.match(name)
        if m:
            return pattern, int(m.group(1))
    return None


def checkpoint_dirs(folder: Path) -> list[tuple[int, Path]]:
    """Step subfolders (or step files) of a run folder (``checkpoint-N/`` ...) as ``(step, path)``, ascending.

    The step is ``global_step`` from the pattern's state file when there is one, else N.
    """
    found = []
    for child in folder.iterdir() if folder.is_dir() else ():
        matched = match_step_folder(child.name)
        if matched and (child.is_dir() or (matched[0].files and child.is_file())):
            pattern, number = matched
            step = read_step(child, pattern.step_file)
            found.append((number if step is None else step, child))
    if not found and (folder / "checkpoints").is_dir():
        return checkpoint_dirs(folder / "checkpoints")  # Accelerate's project_dir/checkpoints/checkpoint_N
    return sorted(found, key=lambda t: t[0])


def open_run(
    path: str | Path,
    *,
    name: str | None = None,
    method: str | None = None,
    reader_options: Mapping[str, Any] | None = None,
) -> Run:
    """Open a run folder (``checkpoint-N/`` subfolders) or a single tuned checkpoint.

    Args:
        path: A run folder, a checkpoint folder, an adapter folder, or a weights file.
        name: The ``run`` label; default: the path's final component.
        method: Override the method label (default: from the snapshots; ``ft`` for full).
        reader_options: See :func:`open_snapshot`.

    Returns:
        A :class:`Run`. A single checkpoint is one step: its ``global_step`` from
        ``trainer_state.json``, else N if named like a step folder, else 0.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path=path)
    dirs = checkpoint_dirs(path)
    if dirs:
        steps = [(step, open_snapshot(p, reader_options=reader_options)) for step, p in dirs]
    else:
        matched = match_step_folder(path.name)
        step = read_step(path, matched[0].step_file if matched else "trainer_state.json") if path.is_dir() else None
        if step is None:
            step = matched[1] if matched else 0
        steps = [(step, open_snapshot(path, reader_options=reader_options))]
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
