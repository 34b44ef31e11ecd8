"""Running a plan: where tasks execute, on how many threads, in what block sizes.

The math (:mod:`dora_analysis.decompose`, the metrics) is pure; every execution choice is
made here. A task (:class:`~dora_analysis.plan.Task`) is executed by :func:`execute_task`:
read the base matrix once, let every metric ``prepare`` for it, then for each tuned version
read it and ``measure``. Engines decide where tasks run; ``serial`` runs them in this process,
in plan order. Each engine is one entry in :data:`ENGINES`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm import tqdm  # not tqdm.auto: it warns in notebooks without ipywidgets

from .adapters.merge import LowRankUpdate
from .containers import TensorStore
from .decompose import DEFAULT_BLOCK_ELEMENTS
from .errors import InputError
from .metrics import MatrixContext, Metric
from .metrics.base import Memo
from .plan import Job, Task
from .registry import Registry
from .spectral import Change, LowRank, subspace_similarity

Record = dict[str, object]
# The key of a task's first record under which execute_task returns the task's pair records
# (subspace similarity between every two tuned versions of the matrix); analysis pops it.
PAIRS_KEY = "_pairs"
# The key of a record under which execute_task returns that tuned matrix's update spectrum (the
# top singular values of dW, from a metric that offers ``singular_values``); analysis pops it.
SPECTRUM_KEY = "_spectrum"


class BaseMemos(Protocol):
    """Where per-base-matrix work is kept between runs (:class:`dora_analysis.cache.BaseCache`)."""

    def memo(self, tensor: str, fan_in_fan_out: bool, device: torch.device) -> Memo | None: ...


@dataclass(frozen=True)
class ExecutionPolicy:
    """How the numbers are computed, never what they are.

    Attributes:
        math_threads: torch threads while a metric measures, on the CPU. One: a measurement
            is many small ops (cache-sized blocks, then k-length vectors), each an OpenMP
            parallel region, and on a machine where another process holds a core every
            region waits for a descheduled thread (measured on 2 shared cores, 5632 x 2048
            bf16: ~30 ms on one thread, 0.3-4 s on two). None leaves torch's setting alone.
        block_elements: float64 elements per block of blocked reductions, by device type.
            On the CPU 512 KB, small enough for a core's L2 cache.
        base_cache: Where metrics may keep per-base-matrix work (the base SVD) between runs,
            handed to each task's :class:`MatrixContext` as its ``memo``; None computes it
            every time. ``analyze(..., cache=DIR)`` sets it to ``DIR/base``.
    """

    math_threads: int | None = 1
    block_elements: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_BLOCK_ELEMENTS))
    base_cache: BaseMemos | None = None

    def block_for(self, device: torch.device) -> int:
        return self.block_elements.get(device.type, self.block_elements.get("cuda", DEFAULT_BLOCK_ELEMENTS["cuda"]))


@contextmanager
def _threads(policy: ExecutionPolicy, device: torch.device) -> Iterator[None]:
    """torch's CPU thread count set to the policy's for the duration, then restored."""
    wanted = policy.math_threads
    if device.type != "cpu" or wanted is None or torch.get_num_threads() == wanted:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def execute_task(
    task: Task,
    base: TensorStore,
    metrics: Sequence[Metric],
    *,
    device: torch.device,
    policy: ExecutionPolicy,
    on_job: Callable[[], None] = lambda: None,
) -> list[Record]:
    """Measure one base matrix against every tuned version of it: one record per job.

    Raises:
        InputError: A tuned matrix of another shape, or NaN / Inf on either side (named by
            file and tensor).
    """
    w0 = _as_weight(base.get(task.name), base.path, task.name).to(device)  # the one read of this base matrix
    memo = None if policy.base_cache is None else policy.base_cache.memo(task.name, task.fan_in_fan_out, device)
    ctx = MatrixContext(name=task.name, fan_in_fan_out=task.fan_in_fan_out, block_elements=policy.block_for(device), memo=memo)
    with _threads(policy, device):
        states = [m.prepare(w0, ctx) for m in metrics]
    wants_change = any(getattr(m, "uses_change", False) for m in metrics)
    records = []
    directions: list[tuple[Job, torch.Tensor]] = []
    # Per-job hook: the update's singular values (spectra.csv).
    singular_values = _offered(metrics, states, "singular_values")
    # Per-task hook: the update's top directions, every two tuned versions compared below
    # (pairs.csv); only when there are two.
    directions_of = _offered(metrics, states, "directions") if len(task.jobs) > 1 else None
    for job in task.jobs:
        w = _as_weight(job.snapshot.weight(task.name, w0), job.snapshot.path, task.name).to(device)
        if w.shape != w0.shape:
            raise InputError(f"shape mismatch: base {tuple(w0.shape)} vs tuned {tuple(w.shape)}", path=job.snapshot.path, tensor=task.name)
        change = _change(job, task, device) if wants_change else None
        identity: Record = {"run": job.run, "method": job.method, "step": job.step, "module": task.module}
        record = dict(identity)
        for metric, state in zip(metrics, states, strict=True):
            record.update(_measure(metric, state, w, job, task, base, device, policy, change))
        if singular_values is not None:
            with _threads(policy, device):
                values = singular_values(w, change)
            record[SPECTRUM_KEY] = [{**identity, "i": i + 1, "sigma": float(v)} for i, v in enumerate(values.cpu().tolist())]
        if directions_of is not None:
            with _threads(policy, device):
                directions.append((job, directions_of(w, change)))
        records.append(record)
        del w
        on_job()
    if records and len(directions) > 1:
        records[0][PAIRS_KEY] = _pairs(task, directions)
    return records


def _offered(metrics: Sequence[Metric], states: list[object], hook: str) -> Callable[[torch.Tensor, Change | None], torch.Tensor] | None:
    """The first metric's optional method ``hook`` (it takes the metric's per-base state, the
    tuned matrix and the change), bound to that metric's state; None if no metric offers it."""
    for metric, state in zip(metrics, states, strict=True):
        if hasattr(metric, hook):
            return functools.partial(getattr(metric, hook), state)
    return None


def _change(job: Job, task: Task, device: torch.device) -> Change:
    """What a metric may know of a tuned matrix's update: low-rank factors when W' = W0 + s·B·A
    exactly, in the analysed ``[out, in]`` layout, and the adapter's rank."""
    update = job.snapshot.update_for(task.name)
    if not isinstance(update, LowRankUpdate):
        return Change()
    rank = int(update.down.shape[0]) or None
    transposed = job.snapshot.stored_transposed(task.name)
    # The factors are in the layer frame, which is the analysed layout when the adapter and
    # the plan agree on how the base stores this matrix; a renormalised (DoRA) W' is not
    # W0 + s·B·A, and neither is an empty magnitude-only update.
    if update.magnitude is not None or rank is None or (transposed is not None and transposed != task.fan_in_fan_out):
        return Change(rank=rank)
    up = update.up.reshape(update.up.shape[0], -1).to(device)
    down = update.down.reshape(update.down.shape[0], -1).to(device)
    return Change(update=LowRank(up=up, down=down, scale=float(update.scale)), rank=rank)


def _pairs(task: Task, directions: list[tuple[Job, torch.Tensor]]) -> list[Record]:
    """phi(i, j) for every two tuned versions of one matrix (Hu et al. 2021, section 7)."""
    rows: list[Record] = []
    for a in range(len(directions)):
        for b in range(a + 1, len(directions)):
            (job_a, u_a), (job_b, u_b) = directions[a], directions[b]
            phi = subspace_similarity(u_a, u_b).cpu()
            for i in range(phi.shape[0]):
                for j in range(phi.shape[1]):
                    rows.append({
                        "run_a": job_a.run, "step_a": job_a.step, "run_b": job_b.run, "step_b": job_b.step,
                        "module": task.module, "i": i + 1, "j": j + 1, "phi": float(phi[i, j]),
                    })  # fmt: skip
    return rows


def _as_weight(tensor: torch.Tensor, path: object, name: str) -> torch.Tensor:
    """Only floating-point tensors are weights: integer, bool or complex ones are refused by name.

    Integer tensors in a checkpoint are quantization codes (or indices, masks); their norms
    are not the model's. Quantized formats with documented scales are dequantized before
    this (:mod:`dora_analysis.containers.quantized`).
    """
    if tensor.is_floating_point():
        return tensor
    raise InputError(
        f"stored as {str(tensor.dtype).removeprefix('torch.')}: raw integer codes (or a non-float tensor) are not weights",
        path=path,  # type: ignore[arg-type]
        tensor=name,
        hint="a quantized checkpoint needs its scales (bitsandbytes SCB, weight_scale) beside the weights; or leave it out with --modules",
    )


def _measure(
    metric: Metric,
    state: object,
    w: torch.Tensor,
    job: Job,
    task: Task,
    base: TensorStore,
    device: torch.device,
    policy: ExecutionPolicy,
    change: Change | None = None,
) -> Record:
    try:
        with _threads(policy, device):
            if getattr(metric, "uses_change", False):
                # A metric that can use the update's factors says so (``uses_change``).
                return dict(metric.measure(state, w, change=change))  # type: ignore[call-arg]
            return dict(metric.measure(state, w))
    except ValueError as exc:
        # The math says which side held the NaN/Inf; name that side's file.
        path = base.path if str(exc).startswith("base") else job.snapshot.path
        raise InputError(str(exc), path=path, tensor=task.name) from exc


class SerialEngine:
    """Every task in this process, one after the other, in plan order."""

    name = "serial"

    def run(
        self,
        tasks: Sequence[Task],
        base: TensorStore,
        metrics: Sequence[Metric],
        *,
        device: torch.device,
        policy: ExecutionPolicy,
        progress: bool | None,
    ) -> list[Record]:
        total = sum(len(t.jobs) for t in tasks)
        # disable=None: tqdm shows the bar only when stderr is a terminal.
        disable = None if progress is None else not progress
        records: list[Record] = []
        with tqdm(total=total, desc="comparing", unit="matrix", disable=disable, leave=False) as bar:
            for task in tasks:
                records += execute_task(task, base, metrics, device=device, policy=policy, on_job=lambda: bar.update(1))
        return records


ENGINES: Registry[SerialEngine] = Registry("engine")
ENGINES.register(SerialEngine())
