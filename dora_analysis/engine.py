"""Running a plan: where tasks execute, on how many threads, in what block sizes.

The math (:mod:`dora_analysis.decompose`, the metrics) is pure; every execution choice is
made here. A task (:class:`~dora_analysis.plan.Task`) is executed by :func:`execute_task`:
read the base matrix once, let every metric ``prepare`` for it, then for each tuned version
read it and ``measure``. Engines decide where tasks run; ``serial`` runs them in this process,
in plan order. Each engine is one entry in :data:`ENGINES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm import tqdm  # not tqdm.auto: it warns in notebooks without ipywidgets

from .containers import TensorStore
from .decompose import DEFAULT_BLOCK_ELEMENTS
from .errors import InputError
from .metrics import MatrixContext, Metric
from .plan import Job, Task
from .registry import Registry

Record = dict[str, object]


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
    """

    math_threads: int | None = 1
    block_elements: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_BLOCK_ELEMENTS))

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
    w0 = base.get(task.name).to(device)  # the one read of this base matrix
    ctx = MatrixContext(name=task.name, fan_in_fan_out=task.fan_in_fan_out, block_elements=policy.block_for(device))
    with _threads(policy, device):
        states = [m.prepare(w0, ctx) for m in metrics]
    records = []
    for job in task.jobs:
        w = job.snapshot.weight(task.name, w0).to(device)
        if w.shape != w0.shape:
            raise InputError(
                f"shape mismatch: base {tuple(w0.shape)} vs tuned {tuple(w.shape)}", path=job.snapshot.path, tensor=task.name
            )
        record: Record = {"run": job.run, "method": job.method, "step": job.step, "module": task.module}
        for metric, state in zip(metrics, states):
            record.update(_measure(metric, state, w, job, task, base, device, policy))
        records.append(record)
        del w
        on_job()
    return records


def _measure(
    metric: Metric, state: object, w: torch.Tensor, job: Job, task: Task, base: TensorStore, device: torch.device, policy: ExecutionPolicy
) -> Record:
    try:
        with _threads(policy, device):
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
