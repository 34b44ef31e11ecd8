"""The plan of an analysis: one task per selected base matrix, with every snapshot that changes it.

Building the plan reads headers only (names, shapes, adapter configs); the tasks then read
tensors. A task holds everything needed to measure one base matrix against all its tuned
versions, so each base matrix is read once however many runs and steps there are, and a task
can run anywhere the files can be read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import names as nm
from .containers import TensorStore
from .errors import InputError
from .runs import Run
from .snapshot import FullSnapshot, Snapshot

# How GPT-2-style matrices are stored, by the name the command line uses (--layout).
LAYOUTS = {"linear": False, "conv1d": True}


@dataclass(frozen=True)
class Job:
    """One tuned version of a task's matrix: a run's snapshot at one step."""

    run: str
    method: str
    step: int
    snapshot: Snapshot


@dataclass(frozen=True)
class Task:
    """One base matrix and every job that provides a tuned version of it.

    Attributes:
        name: The base tensor's name.
        module: Its module path, without wrapper prefixes (the table's ``module``).
        fan_in_fan_out: The weight is stored ``[in, out]``.
        jobs: In run, then step order.
    """

    name: str
    module: str
    fan_in_fan_out: bool
    jobs: tuple[Job, ...]


def build_plan(base: TensorStore, runs: list[Run], selected: list[str], *, layout: str | None = None) -> list[Task]:
    """For each selected base matrix, the snapshots that provide it, in run and step order.

    Args:
        base: The base model.
        runs: The tuned runs.
        selected: The base tensors to analyse.
        layout: ``"linear"`` or ``"conv1d"``: how GPT-2-style matrices are stored, when the
            user says so (wins over the base's config.json and any guess).

    Raises:
        InputError: A full checkpoint lacks a selected matrix, or no snapshot changes any; a
            checkpoint names one tensor twice (``module.X`` and ``X``); the layout of a
            GPT-2-style matrix cannot be known.
    """
    if layout is not None and layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}", hint=f"use one of {', '.join(LAYOUTS)}")
    jobs_by_name: dict[str, list[Job]] = {n: [] for n in selected}
    for run in runs:
        for step, snap in run.steps:
            try:
                provided = snap.bind(base)
            except nm.NameCollision as exc:
                raise InputError(str(exc), path=base.path if exc.side == "base" else snap.path, hint=exc.hint) from None
            if snap.complete and isinstance(snap, FullSnapshot):
                snap, provided = _tied_heads(base, snap, selected, provided)
            if snap.complete:
                missing = [n for n in selected if n not in provided]
                if missing:
                    raise InputError(
                        f"matrix missing from the tuned checkpoint ({len(missing)} of {len(selected)} selected)",
                        path=snap.path,
                        tensor=missing[0],
                        hint="is this checkpoint of the same model as the base?",
                    )
            for n in selected:
                if n in provided:
                    jobs_by_name[n].append(Job(run.name, run.method, step, snap))
    model_type = base.config.get("model_type")
    shapes = {n: base.shape(n) for n in selected}
    plan = [
        Task(name, nm.module_name(nm.strip_wrappers(name)), _layout(base, name, model_type, jobs, layout, shapes), tuple(jobs))
        for name, jobs in jobs_by_name.items()
        if jobs
    ]
    if not plan:
        raise InputError(
            "none of the selected matrices is changed by the tuned checkpoints",
            path=runs[0].path,
            hint="check --modules against the adapter's target_modules",
        )
    return plan


def _layout(
    base: TensorStore, name: str, model_type: str | None, jobs: list[Job], layout: str | None, shapes: dict[str, tuple[int, ...]]
) -> bool:
    """Is base tensor ``name`` stored [in, out]? ``--layout``, else the config, the adapters, the shapes; else refuse."""
    if not nm.is_conv1d_kind(name) or nm.is_embedding(name):
        return _stored_transposed(name, model_type, jobs)
    if layout is not None:
        return LAYOUTS[layout]
    if model_type is not None:
        return nm.is_fan_in_fan_out(name, model_type)
    hints = {j.snapshot.stored_transposed(name) for j in jobs} - {None}
    if len(hints) == 1:
        return bool(hints.pop())
    guess = nm.conv1d_layout_from_shapes(shapes)
    if guess is None:
        raise InputError(
            "cannot tell how this GPT-2-style matrix is stored: [in, out] (GPT-2 Conv1D) or [out, in] (Linear, as in GPTBigCode); "
            "the base has no config.json and the shapes do not say",
            path=base.path,
            tensor=name,
            hint="pass --layout conv1d or --layout linear, or put the model's config.json beside the weights",
        )
    return guess


def _tied_heads(base: TensorStore, snap: FullSnapshot, selected: list[str], provided: set[str]) -> tuple[Snapshot, set[str]]:
    """A tuned checkpoint saved without its output head because the head is the input embedding.

    Hugging Face drops ``lm_head.weight`` from checkpoints of models with
    ``tie_word_embeddings``: the head is then the tuned embedding. Paired only when the tie is
    known: a config.json that says so (its default is true), or, with no config, a base whose
    own head equals its embedding. Otherwise the head stays missing (and is reported so).
    """
    heads = [n for n in selected if n not in provided and nm.is_tied_head(n)]
    if not heads or any(nm.is_tied_head(k) for k in snap.store.keys()):
        return snap, provided
    embedding = nm.word_embedding(snap.store.keys())
    base_embedding = nm.word_embedding(base.keys())
    if embedding is None or base_embedding is None:
        return snap, provided
    configs = [c for c in (snap.store.config, base.config) if c]
    if configs:
        tied = all(bool(c.get("tie_word_embeddings", True)) for c in configs)
    else:
        tied = all(torch.equal(base.get(h), base.get(base_embedding)) for h in heads)
    if not tied:
        return snap, provided
    return _TiedHead(snap, dict.fromkeys(heads, embedding)), provided | set(heads)


class _TiedHead(Snapshot):
    """A full snapshot whose tied output heads are read from its input embedding."""

    def __init__(self, inner: FullSnapshot, heads: dict[str, str]) -> None:
        self.inner, self.heads = inner, heads
        self.path: Path = inner.path
        self.method, self.complete = inner.method, inner.complete

    def bind(self, base: TensorStore) -> set[str]:
        return self.inner.bind(base) | set(self.heads)

    def weight(self, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        if name in self.heads:
            return self.inner.store.get(self.heads[name])
        return self.inner.weight(name, base_weight)

    def stored_transposed(self, name: str) -> bool | None:
        return self.inner.stored_transposed(name)

    def update_for(self, name: str) -> object | None:
        return None if name in self.heads else self.inner.update_for(name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)


def _stored_transposed(name: str, model_type: str | None, jobs: list[Job]) -> bool:
    """Is base tensor ``name`` stored [in, out]? The base's config says; else the adapters do."""
    if model_type is None:
        # No config.json beside the base: an adapter that targets this matrix settled its
        # layout against the base (PEFT's fan_in_fan_out), which is better than a guess.
        hints = {j.snapshot.stored_transposed(name) for j in jobs} - {None}
        if len(hints) == 1:
            return bool(hints.pop())
    return nm.is_fan_in_fan_out(name, model_type)
