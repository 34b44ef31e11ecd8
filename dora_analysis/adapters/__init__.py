"""Adapter checkpoints (LoRA, DoRA, VeRA ...) as sources of effective weights.

An adapter does not hold the tuned weights; it holds what turns the base's W0 into W'. Each
reader here parses one format and yields a :class:`~dora_analysis.runs.Snapshot` whose
``weight(name, W0)`` is W', merged exactly as the format's own library merges it, built one
matrix per call (see ``docs/formats.md`` for the table of formats):

* PEFT LoRA / DoRA folders (:mod:`.peft`), PEFT VeRA (:mod:`.vera`);
* the official DoRA code's layout (:mod:`.official`);
* kohya-ss / LyCORIS ``.safetensors`` files (:mod:`.kohya`).

The math they share (W0 + s·B·A, DoRA's renormalisation) is in :mod:`.merge`, the matching
of targets to base tensors in :mod:`.snapshot`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoints import TensorStore, find_checkpoint_file, open_file
from ..errors import InputError
from ..runs import Snapshot
from .kohya import KohyaLora, is_kohya
from .merge import FeatureAxis
from .official import OFFICIAL_MAGNITUDE, OfficialDora
from .peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    WEIGHT_FREE_TYPES,
    PeftAdapter,
    PeftLora,
    find_weights,
    looks_like_peft,
    read_config,
)
from .vera import PeftVera

# Which features a kohya / LyCORIS `dora_scale` runs along: "out" (LyCORIS >= 3.2.0) or "in".
DoraAxis = FeatureAxis

# adapter_config.json `peft_type` -> reader.
_PEFT_READERS: dict[str, type[PeftAdapter]] = {"LORA": PeftLora, "DORA": OfficialDora, "VERA": PeftVera}

__all__ = ["open_adapter", "base_path_of", "DoraAxis"]


def open_adapter(path: str | os.PathLike[str], *, dora_axis: DoraAxis | None = None) -> Snapshot | None:
    """Open ``path`` as an adapter, if it is one.

    Args:
        path: An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` /
            ``.bin``), an adapter weights file, a kohya / LyCORIS ``.safetensors`` file, or a
            folder holding one such file.
        dora_axis: For kohya / LyCORIS ``dora_scale`` tensors whose shape cannot tell their
            axis (a flattened scale of a square weight): ``"out"`` (LyCORIS >= 3.2.0) or
            ``"in"`` (older).

    Returns:
        A :class:`~dora_analysis.runs.Snapshot` with ``complete=False``, or None if ``path``
        is not an adapter (a full checkpoint, for instance).

    Raises:
        InputError: It is an adapter but cannot be used: missing or unreadable
            ``adapter_config.json``, a type that does not change weights (prompt / prefix
            tuning), an unsupported type or option, inconsistent tensors.

    Example:
        >>> base = open_checkpoint("base/")
        >>> snap = open_adapter("runs/dora/checkpoint-240")
        >>> snap.method
        'dora'
        >>> name = sorted(snap.bind(base))[0]  # e.g. 'model.layers.0.self_attn.q_proj.weight'
        >>> w_tuned = snap.weight(name, base.get(name))  # W', float32, laid out like the base
    """
    if dora_axis not in (None, "out", "in"):
        raise InputError(f"dora_axis must be 'out' or 'in', got {dora_axis!r}")
    path = Path(path)
    if path.is_dir():
        return _open_folder(path, dora_axis)
    if path.is_file():
        return _open_file(path, path, dora_axis)
    return None


def base_path_of(path: str | os.PathLike[str]) -> Path | None:
    """The base model an adapter names (``base_model_name_or_path``), if it exists on disk.

    Args:
        path: An adapter folder or a file inside one.

    Returns:
        The path as written in ``adapter_config.json`` (tried as given, then relative to the
        adapter folder), or None: no config, no name, or a name that is not a local path
        (a Hub id such as ``meta-llama/Llama-2-7b-hf``).
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / ADAPTER_CONFIG).is_file():
        return None
    name = read_config(folder).get("base_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        return None
    given = Path(name).expanduser()
    candidates = [given] if given.is_absolute() else [given, folder / given]
    return next((c for c in candidates if c.exists()), None)


def _open_folder(folder: Path, dora_axis: DoraAxis | None) -> Snapshot | None:
    """A PEFT-style adapter folder, or a folder holding a single kohya / LyCORIS file."""
    if (folder / ADAPTER_CONFIG).is_file() or any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        return _open_peft(folder, folder, None)
    try:
        found = find_checkpoint_file(folder)
    except InputError:
        return None  # several weight files: not an adapter layout; the full-checkpoint reader says why
    if found is not None and found.name.endswith(".safetensors"):
        return _open_file(found, folder, dora_axis)
    return None


def _open_file(file: Path, path: Path, dora_axis: DoraAxis | None) -> Snapshot | None:
    """An adapter weights file (PEFT or kohya), or None for any other weights file."""
    if file.name in ADAPTER_WEIGHTS:
        return _open_peft(path, file.parent, file)
    if not file.name.endswith(".safetensors"):
        return None
    store = open_file(file)  # header only: cheap even for a large full checkpoint
    keys = store.keys()
    if is_kohya(keys):
        return KohyaLora(path, store, dora_axis=dora_axis)
    if looks_like_peft(keys):
        return _open_peft(path, file.parent, file, store)
    return None


def _open_peft(path: Path, folder: Path, weights: Path | None, store: TensorStore | None = None) -> Snapshot:
    """A PEFT-format adapter: check its type, then hand it to the reader for that type."""
    config = read_config(folder)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type in WEIGHT_FREE_TYPES:
        raise InputError(
            f"{peft_type} adapters learn virtual tokens or prefixes and leave the model's weights unchanged, "
            "so the magnitude / direction changes dM and dD do not apply",
            path=folder / ADAPTER_CONFIG,
            hint="analyse weight-changing adapters (LoRA, DoRA, VeRA) or full fine-tunes",
        )
    reader = _PEFT_READERS.get(peft_type)
    if reader is None:
        raise InputError(
            f"PEFT adapter type {peft_type or '(no peft_type)'} is not supported",
            path=folder / ADAPTER_CONFIG,
            hint=f"supported: {', '.join(_PEFT_READERS)}; or merge it with PEFT's merge_and_unload() "
            "and analyse the merged model as a full checkpoint",
        )
    store = store if store is not None else open_file(weights if weights is not None else find_weights(folder))
    if reader is PeftLora and any(k.endswith(OFFICIAL_MAGNITUDE) for k in store.keys()):
        reader = OfficialDora  # the official DoRA fork saves its magnitudes under this name
    return reader(path, config, store)
