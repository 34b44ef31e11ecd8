"""The plan on paper: tasks, bytes read and peak memory per task, from headers alone.

``dora-analyze --dry-run BASE TUNED ...`` builds the same plan :func:`~dora_analysis.analyze`
would run (reading names, shapes and dtypes only; a ``*.shapes.json`` description will do,
see :mod:`dora_analysis.containers.shapes`) and prints, per task, what it reads and the most
memory it holds. The model of a task (:func:`~dora_analysis.engine.execute_task`):

* reads: the base matrix once, then each tuned version (a full checkpoint's matrix; an
  adapter's factors, which are small, so they are counted as 0);
* holds at most: the base matrix and one tuned matrix as stored, plus, for an adapter, W' built
  in float32, plus the blocks of the blocked reductions (two float64 blocks) and a few float64
  vectors per row. Everything else (the interpreter, torch) is a constant per worker, and so
  is what a reader keeps while its checkpoint is open: nothing for the formats read one tensor
  at a time, the whole file for a legacy torch pickle, which is printed beside the tasks.

Wall time on N nodes is then ``total bytes / (N x per-node read bandwidth)`` for as long as
there are more tasks than workers; see ``docs/scaling.md`` for the worked 70B case.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

from . import names as nm
from .analysis import _open_base, open_runs
from .containers import TensorStore, headers_only
from .decompose import DEFAULT_BLOCK_ELEMENTS
from .errors import InputError
from .plan import Task, build_plan
from .snapshot import FullSnapshot

_ASSUMED_ITEMSIZE = 4  # float32, for a format that does not say its dtype in its headers


@dataclass(frozen=True)
class TaskCost:
    """What one task reads and holds.

    Attributes:
        name: The base matrix.
        jobs: Tuned versions measured against it.
        read_bytes: Bytes read from disk (base once + every full tuned matrix).
        peak_bytes: Most bytes of tensors held at once.
    """

    name: str
    jobs: int
    read_bytes: int
    peak_bytes: int


def _nbytes(store: TensorStore, key: str) -> int:
    dtype = store.dtype(key)
    return prod(store.shape(key)) * (dtype.itemsize if dtype is not None else _ASSUMED_ITEMSIZE)


def task_cost(task: Task, base: TensorStore) -> TaskCost:
    """The read and memory model of one task (see the module docstring)."""
    base_bytes = _nbytes(base, task.name)
    shape = base.shape(task.name)
    numel = prod(shape)
    read, largest_tuned = base_bytes, 0
    for job in task.jobs:
        snap = job.snapshot
        if isinstance(snap, FullSnapshot):
            tuned = _nbytes(snap.store, snap._names[task.name])
            read += tuned
        else:
            tuned = 4 * numel  # W' = W0 + update, built in float32
        largest_tuned = max(largest_tuned, tuned)
    rows = shape[0] if shape else 1
    working = 2 * 8 * DEFAULT_BLOCK_ELEMENTS["cpu"] + 4 * 8 * rows
    return TaskCost(task.name, len(task.jobs), read, base_bytes + largest_tuned + working)


@dataclass(frozen=True)
class PlanCost:
    """A costed plan.

    Attributes:
        tasks: One per base matrix, in plan order.
        held: Each opened checkpoint whose reader keeps its tensors in memory while open (a
            legacy torch pickle is read whole), with those bytes: held by every process that
            runs tasks, for the whole run, on top of each task's peak. A checkpoint opened
            twice (as base and as a step) is held twice.
    """

    tasks: list[TaskCost]
    held: list[tuple[Path, int]]


def plan_costs(
    base: str | os.PathLike[str],
    tuned: Sequence[str | os.PathLike[str]],
    *,
    modules: str | None = None,
    all_modules: bool = False,
    steps: Iterable[int] | None = None,
    last: int | None = None,
) -> PlanCost:
    """The plan ``analyze`` would run on these paths, costed; reads headers only."""
    with headers_only():  # a checkpoint that has no headers to plan from is refused, not loaded
        store = _open_base(base)
        runs = open_runs(list(tuned), steps=steps, last=last)
        shapes = {k: store.shape(k) for k in store.keys()}  # may open shards: still headers only
        selected = nm.select(shapes, modules, include_all=all_modules)
        if not selected:
            raise InputError("no tensor matches the selection", path=store.path, hint="list names with `dora-analyze --list BASE`")
        tasks = [task_cost(task, store) for task in build_plan(store, runs, selected)]
    # After costing: a sharded checkpoint has opened exactly the shards the run will read.
    holders = [(store.path, store.held_bytes())] + [(snap.path, snap.held_bytes()) for run in runs for _, snap in run.steps]
    return PlanCost(tasks, [(path, n) for path, n in holders if n])


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def describe_plan(base: str | os.PathLike[str], tuned: Sequence[str | os.PathLike[str]], **selection: object) -> str:
    """The plan as text: one line per task, then the totals."""
    plan = plan_costs(base, tuned, **selection)  # type: ignore[arg-type]
    costs = plan.tasks
    width = max(len(c.name) for c in costs)
    lines = [f"{'task (base matrix)':{width}s}  tuned  {'read':>10s}  {'peak memory':>11s}"]
    lines += [f"{c.name:{width}s}  {c.jobs:5d}  {_size(c.read_bytes):>10s}  {_size(c.peak_bytes):>11s}" for c in costs]
    largest = max(costs, key=lambda c: c.peak_bytes)
    total = sum(c.read_bytes for c in costs)
    lines += [
        "",
        f"tasks: {len(costs)} (one per base matrix); tuned matrices: {sum(c.jobs for c in costs)}",
        f"bytes read in all: {_size(total)} ({total} B)",
        f"largest task: {largest.name}: reads {_size(largest.read_bytes)}, peak memory {_size(largest.peak_bytes)}",
    ]
    if plan.held:
        held = sum(n for _, n in plan.held)
        lines += [
            f"held for the whole run by every process that runs tasks, on top of each task's peak: {_size(held)},"
            f" read whole from {len(plan.held)} checkpoint(s) that cannot be read one tensor at a time"
            " (torch pickles in the legacy or a big-endian format; resave them as safetensors to read them lazily):",
            *(f"  {path}: {_size(n)}" for path, n in plan.held),
        ]
    lines.append(f"base: {Path(base)}")
    return "\n".join(lines)
