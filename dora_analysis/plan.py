"""The plan of an analysis: one task per selected base matrix, with every snapshot that changes it.

Building the plan reads headers only (names, shapes, adapter configs); the tasks then read
tensors. A task holds everything needed to measure one base matrix against all its tuned
versions, so each base matrix is read once however many runs and steps there are, and a task
can run anywhere the files can be read.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import names as nm
from .containers import TensorStore
from .errors import InputError
from .runs import Run
from .snapshot import Snapshot


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


def build_plan(base: TensorStore, runs: list[Run], selected: list[str]) -> list[Task]:
    """For each selected base matrix, the snapshots that provide it, in run and step order.

    Raises:
        InputError: A full checkpoint lacks a selected matrix, or no snapshot changes any.
    """
    jobs_by_name: dict[str, list[Job]] = {n: [] for n in selected}
    for run in runs:
        for step, snap in run.steps:
            provided = snap.bind(base)
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
    plan = [
        Task(name, nm.module_name(nm.strip_wrappers(name)), _stored_transposed(name, model_type, jobs), tuple(jobs))
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


def _stored_transposed(name: str, model_type: str | None, jobs: list[Job]) -> bool:
    """Is base tensor ``name`` stored [in, out]? The base's config says; else the adapters do."""
    if model_type is None:
        # No config.json beside the base: an adapter that targets this matrix settled its
        # layout against the base (PEFT's fan_in_fan_out), which is better than a guess.
        hints = {j.snapshot.stored_transposed(name) for j in jobs} - {None}
        if len(hints) == 1:
            return bool(hints.pop())
    return nm.is_fan_in_fan_out(name, model_type)
