"""Tuned states as sources of effective weights.

A :class:`Snapshot` is one tuned state (a fine-tuned checkpoint, an adapter) that yields, for
a base tensor, the effective tuned tensor in the base's storage layout. Full checkpoints hold
that tensor outright (:class:`FullSnapshot`); adapters compute it from the base tensor
(:mod:`dora_analysis.adapters`), so the analyzer hands every snapshot the base tensor it has
already read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from .containers import TensorStore
from .names import match_names


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

    def update_for(self, name: str) -> object | None:
        """The stored update behind base tensor ``name``, if W' = W0 + that update exactly.

        Adapters return their :class:`~dora_analysis.adapters.merge.Update` (low-rank factors
        or a dense difference, in the layer frame), so analyses can work from B and A rather
        than from the dense W'; a full checkpoint stores no update and returns None.
        """
        return None

    def held_bytes(self) -> int:
        """Bytes its reader keeps in memory while it is open (:meth:`TensorStore.held_bytes`)."""
        return 0

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

    def held_bytes(self) -> int:
        return self.store.held_bytes()

    def __repr__(self) -> str:
        return f"FullSnapshot({str(self.path)!r})"
