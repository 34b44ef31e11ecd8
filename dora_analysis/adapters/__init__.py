"""Adapter checkpoints (LoRA, DoRA, VeRA, LyCORIS ...) as sources of effective weights.

An adapter does not hold the tuned weights; it holds what turns the base's W0 into W'. Each
format is one entry in :data:`ADAPTER_FORMATS`, tried in order, first match wins: its ``open``
returns a :class:`~dora_analysis.snapshot.Snapshot` whose ``weight(name, W0)`` is W', merged
exactly as the format's own library merges it, built one matrix per call (see
``docs/formats.md`` for the table of formats), or None when the path is not in its format:

* ``peft``: PEFT LoRA / DoRA folders (:mod:`.peft`), PEFT VeRA (:mod:`.vera`), and the
  official DoRA code's layout (:mod:`.official`);
* ``kohya``: kohya-ss / LyCORIS ``.safetensors`` files (:mod:`.kohya`).

The update math they share (W0 + s·B·A, DoRA's renormalisation, a dense W0 + ΔW) is in
:mod:`.merge`, the matching of targets to base tensors in :mod:`.snapshot`. Options that only
one format understands travel in one ``reader_options`` mapping (``{"dora_axis": "in"}``);
each format declares the keys it reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..containers import TensorStore, find_checkpoint_file, hf_cache, open_file
from ..decompose import AXES, Axis
from ..errors import InputError
from ..registry import Registry
from ..snapshot import Snapshot
from .kohya import KohyaLora, is_kohya
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

# adapter_config.json `peft_type` -> reader.
_PEFT_READERS: dict[str, type[PeftAdapter]] = {"LORA": PeftLora, "DORA": OfficialDora, "VERA": PeftVera}

ReaderOptions = Mapping[str, Any]


@dataclass(frozen=True)
class AdapterFormat:
    """One adapter format.

    Attributes:
        name: Short name, for messages and :meth:`Registry.unregister`.
        open: ``(path, reader_options) -> Snapshot | None``: the adapter at ``path`` (a file
            or folder), or None if ``path`` is not in this format. Raises
            :class:`~dora_analysis.errors.InputError` when it is, but cannot be used.
        options: The ``reader_options`` keys this format reads.
    """

    name: str
    open: Callable[[Path, ReaderOptions], Snapshot | None]
    options: frozenset[str] = frozenset()


ADAPTER_FORMATS: Registry[AdapterFormat] = Registry("adapter format")

__all__ = ["ADAPTER_FORMATS", "AdapterFormat", "ReaderOptions", "base_path_of", "known_reader_options", "open_adapter"]


def known_reader_options() -> frozenset[str]:
    """Every ``reader_options`` key some registered adapter format reads."""
    return frozenset().union(*(f.options for f in ADAPTER_FORMATS))


def open_adapter(path: str | os.PathLike[str], *, reader_options: ReaderOptions | None = None) -> Snapshot | None:
    """Open ``path`` as an adapter, if it is one: the first registered format that claims it.

    Args:
        path: An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` /
            ``.bin``), an adapter weights file, a kohya / LyCORIS ``.safetensors`` file, or a
            folder holding one such file.
        reader_options: Format-specific settings, e.g. ``{"dora_axis": "out"}`` for kohya /
            LyCORIS ``dora_scale`` tensors whose shape cannot tell their axis (a flattened
            scale of a square weight): ``"out"`` (LyCORIS >= 3.2.0) or ``"in"`` (older).

    Returns:
        A :class:`~dora_analysis.snapshot.Snapshot` with ``complete=False``, or None if
        ``path`` is not an adapter (a full checkpoint, for instance).

    Raises:
        InputError: It is an adapter but cannot be used: missing or unreadable
            ``adapter_config.json``, a type that does not change weights (prompt / prefix
            tuning), an unsupported type or option, inconsistent tensors; or an option no
            format reads.

    Example:
        >>> base = open_checkpoint("base/")
        >>> snap = open_adapter("runs/dora/checkpoint-240")
        >>> snap.method
        'dora'
        >>> name = sorted(snap.bind(base))[0]  # e.g. 'model.layers.0.self_attn.q_proj.weight'
        >>> w_tuned = snap.weight(name, base.get(name))  # W', float32, laid out like the base
    """
    options = dict(reader_options or {})
    unknown = sorted(set(options) - known_reader_options())
    if unknown:
        raise InputError(f"unknown reader option {unknown[0]!r}", hint=f"known: {', '.join(sorted(known_reader_options()))}")
    path = Path(path)
    if not path.exists():
        return None
    for fmt in ADAPTER_FORMATS:
        snap = fmt.open(path, options)
        if snap is not None:
            return snap
    return None


def base_path_of(path: str | os.PathLike[str]) -> Path | None:
    """The base model an adapter names (``base_model_name_or_path``), if it exists on disk.

    Args:
        path: An adapter folder or a file inside one.

    Returns:
        The path as written in ``adapter_config.json`` (tried as given, then relative to the
        adapter folder); for a Hub id (``meta-llama/Llama-2-7b-hf``) that is no local path,
        its snapshot in the local Hugging Face cache; or None: no config, or no name.

    Raises:
        InputError: The name is a Hub id that is not in the cache (says where it looked).
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
    local = next((c for c in candidates if c.exists()), None)
    if local is None and hf_cache.parse_hub_id(name.strip()) is not None:
        return hf_cache.resolve_hub_id(name.strip())  # offline: the cache only, never a download
    return local


def _single_safetensors(path: Path) -> tuple[Path, TensorStore] | None:
    """``path`` as one ``.safetensors`` file (itself, or the only weights file of its folder)."""
    if path.is_dir():
        try:
            found = find_checkpoint_file(path)
        except InputError:
            return None  # several weight files: not an adapter layout; the full-checkpoint reader says why
        if found is None:
            return None
        path = found
    if not path.name.endswith(".safetensors"):
        return None
    return path, open_file(path)  # header only: cheap even for a large full checkpoint


def _open_peft_format(path: Path, options: ReaderOptions) -> Snapshot | None:
    """A PEFT-style folder or weights file, or a ``.safetensors`` file with PEFT's keys."""
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and ((folder / ADAPTER_CONFIG).is_file() or any((folder / n).is_file() for n in ADAPTER_WEIGHTS)):
        return _open_peft(path, folder, None)
    if path.is_file() and path.name in ADAPTER_WEIGHTS:
        return _open_peft(path, folder, path)
    found = _single_safetensors(path)
    if found is not None and not is_kohya(found[1].keys()) and looks_like_peft(found[1].keys()):
        return _open_peft(path, found[0].parent, found[0], found[1])
    return None


def _open_kohya_format(path: Path, options: ReaderOptions) -> Snapshot | None:
    """A kohya / LyCORIS ``.safetensors`` file, or a folder holding one."""
    found = _single_safetensors(path)
    if found is None or not is_kohya(found[1].keys()):
        return None
    axis: Axis | None = options.get("dora_axis")
    if axis is not None and axis not in AXES:
        raise InputError(f"dora_axis must be 'out' or 'in', got {axis!r}")
    return KohyaLora(path, found[1], dora_axis=axis)


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


ADAPTER_FORMATS.register(AdapterFormat("peft", _open_peft_format))
ADAPTER_FORMATS.register(AdapterFormat("kohya", _open_kohya_format, frozenset({"dora_axis"})))
