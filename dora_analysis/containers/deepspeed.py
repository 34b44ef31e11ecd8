"""DeepSpeed ZeRO checkpoints (``global_stepN/``): recognised, and consolidated only by DeepSpeed.

``engine.save_checkpoint(save_dir)`` writes ``save_dir/global_stepN/`` holding
``mp_rank_00_model_states.pt`` and one ``*_optim_states.pt`` per rank: under ZeRO the fp32
weights live partitioned inside the optimizer shards, in DeepSpeed's own layout. Beside them
it writes ``latest`` (the tag) and ``zero_to_fp32.py``, the script that consolidates them into
an ordinary checkpoint. This reader does not re-implement that script: with ``deepspeed``
importable it asks DeepSpeed (``get_fp32_state_dict_from_zero_checkpoint``, which builds the
whole fp32 state dict in memory); otherwise it refuses with the command to run. Opened for
headers only (``--dry-run``) it refuses with the same command: only that whole consolidation
gives the shapes.

DeepSpeed's consolidation unpickles the shards with ``torch.load(..., weights_only=False)``,
which runs whatever code a file names. Here every one of its loads is made with
``weights_only=True``, with only the DeepSpeed classes its optimizer files hold allowed by name
(:data:`DEEPSPEED_PICKLED_CLASSES`); a file that names anything else is refused.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pickle
import re
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..errors import InputError, first_line
from .base import MemoryStore, TensorStore, config_beside, opening_headers_only

_TAG = re.compile(r"^global_step\d+$")

# What DeepSpeed's ZeRO optimizer files pickle besides tensors and builtins, as listed by
# torch.serialization.get_unsafe_globals_in_checkpoint on files DeepSpeed 0.19 writes for ZeRO
# stages 1-3 in fp32, bf16 and fp16: plain records (a loss scaler, an enum, a dataclass).
DEEPSPEED_PICKLED_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_PATCH = threading.Lock()


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
    command, out = _consolidation(parent, tag)
    if opening_headers_only():
        raise InputError(
            "DeepSpeed ZeRO checkpoint: its weights are partitioned across optimizer shards, and only consolidating"
            " them all (the whole model in fp32, in memory) gives their shapes; a plan from headers cannot read it",
            path=path,
            hint=f"consolidate it first: {command}, then plan on {out}",
        )
    try:
        with _quiet():  # DeepSpeed logs its accelerator on import
            from deepspeed.utils import zero_to_fp32  # type: ignore[import-not-found]
    except ImportError:
        raise InputError(
            f"DeepSpeed ZeRO checkpoint: its weights are partitioned across optimizer shards; consolidate them first: {command}",
            path=path,
            hint=f"then analyse {out}, or pip install deepspeed to have them read here",
        ) from None
    loader = _WeightsOnlyTorch(_allowed_classes())
    try:
        state = _consolidate(zero_to_fp32, loader, parent, tag)
    except pickle.UnpicklingError as exc:
        found = _UNSUPPORTED_GLOBAL.search(str(exc))
        named = f" ({found.group(1)})" if found else ""
        raise InputError(
            f"a ZeRO shard pickles an object that is not a tensor{named}: not loaded, since unpickling it could run code",
            path=loader.loading if isinstance(loader.loading, (str, Path)) else path,
            hint=f"if you trust the file, consolidate it with {command} and analyse {out}",
        ) from None
    except Exception as exc:  # DeepSpeed raises plain exceptions of many kinds
        raise InputError(f"DeepSpeed could not consolidate this ZeRO checkpoint ({first_line(exc)})", path=path) from exc
    folder = parent / tag
    # detach: DeepSpeed hands back its fp32 partitions as tensors that require grad.
    tensors = {k: v.detach() for k, v in state.items() if isinstance(v, torch.Tensor)}
    return MemoryStore(tensors, folder, config_beside(folder), to_files=f"consolidate it to files with {command} and analyse {out}")


def _consolidation(parent: Path, tag: str) -> tuple[str, Path]:
    """The command that consolidates ``parent/tag`` into safetensors files, and where they go."""
    script = parent / "zero_to_fp32.py"
    out = parent / f"{tag}_fp32"
    command = f"python {script} {parent} {out} -t {tag} --safe_serialization"
    if not script.is_file():
        command += " (the script DeepSpeed writes beside global_stepN/; also deepspeed.utils.zero_to_fp32)"
    return command, out


def _consolidate(zero_to_fp32: ModuleType, loader: _WeightsOnlyTorch, parent: Path, tag: str) -> dict[str, object]:
    """DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``, every load in it weights-only.

    The module's own ``torch`` is swapped for :class:`_WeightsOnlyTorch` for the call (under a
    lock: the module is shared by the process), so nothing else in the process is touched.
    """
    with _PATCH, _quiet():
        real = zero_to_fp32.torch
        zero_to_fp32.torch = loader
        try:
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(parent), tag=tag)  # type: ignore[no-any-return]
        finally:
            zero_to_fp32.torch = real


def _quiet() -> contextlib.ExitStack:
    """DeepSpeed's prints and progress bars kept off the command's output."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def _allowed_classes() -> list[type]:
    """The classes of :data:`DEEPSPEED_PICKLED_CLASSES` this DeepSpeed has (others do not occur in its files)."""
    found = []
    for dotted in DEEPSPEED_PICKLED_CLASSES:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return found


class _WeightsOnlyTorch:
    """``torch`` as DeepSpeed's consolidation sees it: ``load`` always ``weights_only=True``."""

    def __init__(self, allowed: list[type]) -> None:
        self._allowed = allowed
        self.loading: object = None  # the file being loaded, to name in an error

    def load(self, *args: Any, **kwargs: Any) -> Any:
        self.loading = args[0] if args else kwargs.get("f")
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(self._allowed):
            return torch.load(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)
