"""Adapter checkpoints (LoRA, DoRA, ...) as sources of effective weights.

Placeholder until the adapters issue lands: no adapter format is recognised yet.
"""

from __future__ import annotations

from pathlib import Path

from ..runs import Snapshot


def open_adapter(path: Path) -> Snapshot | None:
    """Return a Snapshot if ``path`` is an adapter in a supported format, else None."""
    return None


def base_path_of(path: Path) -> Path | None:
    """The local base model an adapter names (``base_model_name_or_path``), if any."""
    return None
