"""The run folder on disk: checkpoints in the formats the analyzer reads, atomic writes, resume.

Layout of a run folder::

    RUN/
      run_config.json            what run this is (TrainConfig.identity); guards --out and --resume
      metrics.csv                step, loss, learning_rate, accuracy (+ eval_* at checkpoints)
      checkpoint-N/              one per saved step, written as .checkpoint-N.tmp/ then renamed
        model.safetensors        ft: every tensor under the base checkpoint's names, + head.*
        config.json              ft: copied from the base model
        adapter_model.safetensors   lora/dora: PEFT keys (base_model.model.<module>.lora_A.weight...)
        adapter_config.json         lora/dora: PEFT LoraConfig fields
        trainer_state.json       global_step, loss history (log_history), method, seed
        optimizer.pt scheduler.pt rng_state.pth   resume state: in the newest checkpoint only

A checkpoint folder appears under its final name only once complete (rename is atomic), so a
run killed at any moment leaves every ``checkpoint-N/`` readable. The resume state
(optimizer moments, schedule, RNG) is ~2x the trainable weights, so it is kept only in the
newest checkpoint: an FT run's 16 snapshots do not carry 16 copies of Adam's moments.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import random
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import InputError, first_line
from ..peft_format import ADAPTER_CONFIG, ADAPTER_SAFETENSORS, LORA_A, LORA_B, MAGNITUDE, peft_key
from ..runs import checkpoint_dirs
from .layers import DoRALinear
from .model import HEAD, EncoderClassifier, adapter_layers

RUN_CONFIG = "run_config.json"
METRICS = "metrics.csv"
TRAINER_STATE = "trainer_state.json"
FULL_WEIGHTS = "model.safetensors"
# Hugging Face Trainer's names: the analyzer's checkpoint finder already skips them.
OPTIMIZER, SCHEDULER, RNG_STATE = "optimizer.pt", "scheduler.pt", "rng_state.pth"
RESUME_FILES = (OPTIMIZER, SCHEDULER, RNG_STATE)
METRIC_COLUMNS = ("step", "loss", "learning_rate", "accuracy", "eval_loss", "eval_accuracy")


# --- atomic writes -------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    """Flush a file's or folder's data to disk (a rename is only as durable as what it renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, path)


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``final`` (by rename) when the block succeeds.

    On an exception the temporary folder is removed; on a kill it stays as ``.NAME.tmp``,
    which no reader looks at and the next resume deletes.
    """
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for file in tmp.iterdir():
            _fsync(file)
        if final.exists():  # a leftover of an earlier attempt at this step
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- the run folder ------------------------------------------------------------------------------


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as it reads back from JSON (tuples become lists...), for comparisons."""
    return json.loads(json.dumps(data))


def check_run_folder(folder: Path, identity: dict[str, Any], *, resume: bool) -> Path | None:
    """Check that ``folder`` may hold the run ``identity``; return the checkpoint to resume from.

    Reads only: :func:`claim_run_folder` writes, once the model and data have loaded, so a
    typo in ``--model`` does not leave a folder that then claims to hold a run.

    Args:
        folder: The run folder (need not exist).
        identity: :meth:`TrainConfig.identity` of the run to start or continue.
        resume: Continue the run already in ``folder``.

    Returns:
        The newest checkpoint holding resume state, or None to start from step 0.

    Raises:
        InputError: The folder holds something else, a different run, or this same run
            without ``resume``.
    """
    marker = folder / RUN_CONFIG
    if folder.exists() and not folder.is_dir():
        raise InputError("output path exists and is not a folder", path=folder)
    if not marker.is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise InputError(
                "output folder is not empty and holds no dora-train run",
                path=folder,
                hint="choose a new or empty --out folder",
            )
        return None
    try:
        stored = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError("unreadable run_config.json", path=marker) from exc
    current = _jsonable(identity)
    if stored != current:
        differ = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        raise InputError(
            f"output folder holds a different run (differs in: {', '.join(differ)})",
            path=folder,
            hint="choose another --out, or delete the folder to start over",
        )
    if not resume:
        raise InputError(
            "output folder already holds this run",
            path=folder,
            hint="pass --resume to continue it, or choose another --out",
        )
    return latest_resumable(folder)


def claim_run_folder(folder: Path, identity: dict[str, Any]) -> None:
    """Create ``folder``, record the run's identity, and remove saves that a kill interrupted."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / RUN_CONFIG
    if not marker.is_file():
        write_text_atomic(marker, json.dumps(identity, indent=2) + "\n")
    for stale in folder.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_resumable(folder: Path) -> Path | None:
    """The newest complete ``checkpoint-N/`` that holds resume state, or None."""
    for _, path in reversed(checkpoint_dirs(folder)):
        if all((path / name).is_file() for name in RESUME_FILES):
            return path
    return None


class MetricsLog:
    """``metrics.csv``: appended each step; rewritten from the checkpoint's history on resume.

    Rows after the resumed checkpoint (from the interrupted attempt) are dropped by the
    rewrite, so the file always ends with the steps this run actually took.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def reset(self, history: list[dict[str, Any]]) -> None:
        """Replace the file with a header and ``history`` (atomically)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        write_text_atomic(self.path, buf.getvalue())

    def append(self, record: dict[str, Any]) -> None:
        """Add one step's row."""
        with self.path.open("a", encoding="utf-8", newline="") as fh:
            csv.DictWriter(fh, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n").writerow(record)


# --- checkpoint contents -------------------------------------------------------------------------


def adapter_tensors(model: EncoderClassifier) -> dict[str, torch.nn.Parameter]:
    """The trained tensors of an adapter run under PEFT's state-dict keys.

    ``base_model.model.<module>.lora_A.weight`` ``[r, in]``, ``.lora_B.weight`` ``[out, r]``,
    DoRA's ``.lora_magnitude_vector`` ``[out]`` (no ``.weight``), and the head as PEFT saves
    ``modules_to_save``: ``base_model.model.head.weight`` / ``.bias``.
    """
    out: dict[str, torch.nn.Parameter] = {}
    for path, layer in adapter_layers(model).items():
        out[peft_key(path, LORA_A)] = layer.lora_A.weight
        out[peft_key(path, LORA_B)] = layer.lora_B.weight
        if isinstance(layer, DoRALinear):
            out[peft_key(path, MAGNITUDE)] = layer.magnitude
    for name, param in getattr(model, HEAD).named_parameters():
        out[peft_key(HEAD, name)] = param
    return out


def adapter_config(
    model: EncoderClassifier,
    *,
    method: str,
    rank: int,
    alpha: float,
    rslora: bool,
    dropout: float,
    base_path: Path,
) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields for the model's adapters (``adapter_config.json``).

    ``target_modules`` lists the adapted modules' full paths, which PEFT matches exactly, so
    the file means the same whatever name or regex selected them.
    """
    layers = adapter_layers(model)
    layouts = {layer.fan_in_fan_out for layer in layers.values()}
    if len(layouts) > 1:
        raise InputError(
            "the targets mix nn.Linear and Conv1D layers",
            hint="PEFT's adapter_config has one fan_in_fan_out flag; target one kind per run",
        )
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": str(base_path),
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "use_dora": method == "dora",
        "target_modules": sorted(layers),
        "modules_to_save": [HEAD],
        "fan_in_fan_out": layouts == {True},
        "bias": "none",
        "lora_bias": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    # A fresh contiguous copy: safetensors refuses tensors that share storage (tied weights).
    return tensor.detach().to("cpu", copy=True).contiguous()


class CheckpointWriter:
    """Writes and reads one run's ``checkpoint-N/`` folders.

    Args:
        folder: The run folder.
        method: ``ft``, ``lora`` or ``dora``.
        base_path: The base model folder (its ``config.json`` is copied into FT checkpoints; its
            absolute path is ``base_model_name_or_path`` of adapters).
        full_names: FT only: model state name -> name in the base checkpoint file, so FT
            tensors are saved under exactly the base's names (names absent keep their own).
        peft_config: Adapters only: :func:`adapter_config`'s dict.
    """

    def __init__(
        self,
        folder: Path,
        *,
        method: str,
        base_path: Path,
        full_names: dict[str, str] | None = None,
        peft_config: dict[str, Any] | None = None,
    ) -> None:
        self.folder = folder
        self.method = method
        self.base_path = base_path
        self.full_names = full_names or {}
        self.peft_config = peft_config

    def save(
        self,
        step: int,
        model: EncoderClassifier,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        state: dict[str, Any],
    ) -> Path:
        """Write ``checkpoint-{step}/`` atomically; then drop the previous checkpoint's resume state.

        Args:
            step: The global step (number of optimizer updates done).
            model, optimizer, scheduler: Their state after ``step`` updates.
            state: Extra ``trainer_state.json`` fields (``log_history``...).

        Returns:
            The checkpoint folder.
        """
        final = self.folder / f"checkpoint-{step}"
        previous = latest_resumable(self.folder)
        with atomic_folder(final) as tmp:
            self._save_weights(tmp, model)
            trainer_state = {"global_step": step, **state}
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1) + "\n", encoding="utf-8")
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
            torch.save(scheduler.state_dict(), tmp / SCHEDULER)
            torch.save(_rng_state(), tmp / RNG_STATE)
        if previous is not None and previous != final:
            for name in RESUME_FILES:
                (previous / name).unlink(missing_ok=True)
        return final

    def _save_weights(self, folder: Path, model: EncoderClassifier) -> None:
        if self.method == "ft":
            tensors = {self.full_names.get(k, k): _cpu_copy(v) for k, v in model.state_dict().items()}
            save_file(tensors, str(folder / FULL_WEIGHTS), metadata={"format": "pt"})
            shutil.copyfile(self.base_path / "config.json", folder / "config.json")
        else:
            tensors = {k: _cpu_copy(v) for k, v in adapter_tensors(model).items()}
            save_file(tensors, str(folder / ADAPTER_SAFETENSORS), metadata={"format": "pt"})
            (folder / ADAPTER_CONFIG).write_text(json.dumps(self.peft_config, indent=2) + "\n", encoding="utf-8")

    def load(
        self,
        checkpoint: Path,
        model: EncoderClassifier,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> dict[str, Any]:
        """Restore weights, optimizer, schedule and RNG from ``checkpoint``; return its trainer state."""
        self._load_weights(checkpoint, model)
        device = next(model.parameters()).device
        _restore(checkpoint / OPTIMIZER, optimizer.load_state_dict, map_location=device)
        _restore(checkpoint / SCHEDULER, scheduler.load_state_dict)
        _restore(checkpoint / RNG_STATE, _set_rng_state)
        state_file = checkpoint / TRAINER_STATE
        try:
            return json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"unreadable trainer state ({first_line(exc)})", path=state_file, hint=_RESUME_HINT) from None

    @torch.no_grad()
    def _load_weights(self, checkpoint: Path, model: EncoderClassifier) -> None:
        if self.method == "ft":
            targets = {self.full_names.get(k, k): v for k, v in model.state_dict().items()}
            path = checkpoint / FULL_WEIGHTS
        else:
            targets = dict(adapter_tensors(model))
            path = checkpoint / ADAPTER_SAFETENSORS
        try:
            with safe_open(str(path), framework="pt") as fh:
                missing = [k for k in targets if k not in fh.keys()]
                if missing:
                    raise InputError("checkpoint lacks a tensor this run trains", path=path, tensor=missing[0])
                for key, tensor in targets.items():
                    tensor.copy_(fh.get_tensor(key))
        except (SafetensorError, OSError) as exc:
            raise InputError("unreadable checkpoint weights", path=path) from exc


_RESUME_HINT = "remove this checkpoint folder to resume from the one before it, or start again without --resume"


def _restore(path: Path, apply: Any, **load: Any) -> None:
    """Load one piece of resume state (optimizer, schedule, RNG) and hand it to ``apply``.

    Raises:
        InputError: The file is missing, truncated or corrupt, or does not fit this run.
    """
    try:
        state = torch.load(path, weights_only=True, **load)
    except FileNotFoundError:
        raise InputError("resume state missing", path=path, hint=_RESUME_HINT) from None
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise InputError(f"truncated or corrupt resume state ({first_line(exc)})", path=path, hint=_RESUME_HINT) from None
    try:
        apply(state)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise InputError(f"resume state does not fit this run ({first_line(exc)})", path=path, hint=_RESUME_HINT) from None


def _rng_state() -> dict[str, Any]:
    """Every RNG training draws from: dropout uses torch's global generators."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
