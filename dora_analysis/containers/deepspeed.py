"""DeepSpeed ZeRO checkpoints (``global_stepN/``): recognised, and consolidated only by DeepSpeed.

``engine.save_checkpoint(save_dir)`` writes ``save_dir/global_stepN/`` holding
``mp_rank_00_model_states.pt`` and one ``*_optim_states.pt`` per rank: under ZeRO the fp32
weights live partitioned inside the optimizer shards, in DeepSpeed's own layout. Beside them
it writes ``latest`` (the tag) and ``zero_to_fp32.py``, the script that consolidates them into
an ordinary checkpoint. This reader does not re-implement that script: with ``deepspeed``
importable it asks DeepSpeed (``get_fp32_state_dict_from_zero_checkpoint``, which builds the
whole fp32 state dict in memory); otherwise it refuses with the command to run.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import InputError
from .base import MemoryStore, TensorStore, config_beside

_TAG = re.compile(r"^global_step\d+$")


def is_zero_tag_folder(path: Path) -> bool:
    """A ``global_stepN/`` folder with DeepSpeed's ``*model_states.pt`` / ``*optim_states.pt``."""
    return (
        path.is_dir() and _TAG.match(path.name) is not None and (any(path.glob("*model_states.pt")) or any(path.glob("*optim_states.pt")))
    )


def claims(path: Path, has_weights: Callable[[Path], bool]) -> bool:
    """A ``global_stepN/`` folder, or a save folder holding one and no ordinary weights file."""
    if not path.is_dir():
        return False
    if is_zero_tag_folder(path):
        return True
    return any(is_zero_tag_folder(c) for c in path.glob("global_step*")) and not has_weights(path)


def _tag_and_parent(path: Path) -> tuple[str, Path]:
    if is_zero_tag_folder(path):
        return path.name, path.parent
    latest = path / "latest"
    if latest.is_file():
        return latest.read_text().strip(), path
    tags = sorted((c.name for c in path.glob("global_step*") if is_zero_tag_folder(c)), key=lambda t: int(t[len("global_step") :]))
    return tags[-1], path


def open_zero(path: Path) -> TensorStore:
    """Consolidate through DeepSpeed if it is installed; else say how to.

    Raises:
        InputError: ``deepspeed`` is not importable (the message gives the ``zero_to_fp32.py``
            command), or DeepSpeed cannot read the checkpoint.
    """
    tag, parent = _tag_and_parent(path)
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # type: ignore[import-not-found]
    except ImportError:
        script = parent / "zero_to_fp32.py"
        out = parent / f"{tag}_fp32"
        command = f"python {script} {parent} {out} -t {tag} --safe_serialization"
        where = "" if script.is_file() else " (the script DeepSpeed writes beside global_stepN/; also deepspeed.utils.zero_to_fp32)"
        raise InputError(
            f"DeepSpeed ZeRO checkpoint: its weights are partitioned across optimizer shards; consolidate them first: {command}{where}",
            path=path,
            hint=f"then analyse {out}, or pip install deepspeed to have them read here",
        ) from None
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(parent), tag=tag)
    except Exception as exc:  # DeepSpeed raises plain exceptions of many kinds
        raise InputError(f"DeepSpeed could not consolidate this ZeRO checkpoint ({exc})", path=path) from exc
    folder = parent / tag
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return MemoryStore(tensors, folder, config_beside(folder))
