"""The ``ray`` engine: a plan's tasks as Ray tasks, on one machine or a cluster.

Each plan task (one base matrix, every tuned version of it) becomes one Ray task that runs
:func:`~dora_analysis.engine.execute_task`, the same function the serial engine runs, so the
numbers are the same bit for bit; records come back in plan order, so ``layers.csv`` is
byte-identical. What travels:

* the plan, the base store and the metrics are put in Ray's object store once. Stores travel
  as paths (each reopens its files, reading headers only, on first use in a worker), so every
  node must see the same paths: a shared file system;
* each task sends back its records (a few numbers per tuned matrix), never a tensor.

Per task, a worker holds what the serial walk holds: the base matrix, one tuned matrix, the
metrics' per-base state. Failures:

* bad input inside a task (an :class:`~dora_analysis.errors.InputError`) is not retried: it
  comes back as the same error, the other tasks are cancelled, nothing is written;
* a worker process that dies (killed, out of memory) is retried by Ray on another worker
  (``max_retries``); tasks are pure reads, so a retry gives the same records;
* if the driver (the ``dora-analyze`` process) dies, Ray cancels its tasks and the run is lost:
  nothing was written, and it is rerun from the start.

Ray is an optional extra: ``pip install 'dora-analysis[ray]'``.
"""

from __future__ import annotations

import errno
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from .containers import TensorStore
from .engine import ENGINES, ExecutionPolicy, Record, execute_task
from .errors import InputError
from .metrics import Metric
from .plan import Task

# How often Ray reruns a task whose worker process died (Ray's own default is 3).
MAX_RETRIES = 3

# Test-only: a file path; the first task attempt that finds no file there creates it and kills
# its own worker process (os._exit), so tests can check that Ray's retry gives the same result.
_TEST_CRASH_ONCE: str | None = None

# In each worker: the plan it was last sent, by object id, so that stores are reopened once per
# worker rather than once per task.
_CONTEXT: dict[str, Any] = {}


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError(
            "--engine ray needs Ray, which is not installed",
            hint="pip install 'dora-analysis[ray]' (or pip install 'ray>=2.9'), or use --engine serial",
        ) from None
    return ray


def _crash_once(marker: str) -> None:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return
        raise
    os.close(fd)
    os._exit(1)


def _task(context: list[Any], index: int, crash_marker: str | None) -> list[Record]:
    """One plan task, in a Ray worker (``context`` is ``[ObjectRef]``, so it arrives unresolved)."""
    (ref,) = context
    key = ref.hex()
    if key not in _CONTEXT:
        import ray

        _CONTEXT.clear()  # one plan at a time: drop the previous plan's open stores
        _CONTEXT[key] = ray.get(ref)
    tasks, base, metrics, device, policy = _CONTEXT[key]
    if crash_marker is not None:
        _crash_once(crash_marker)
    return execute_task(tasks[index], base, metrics, device=device, policy=policy)


@functools.cache
def _remote() -> Any:
    return _ray().remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(_task)


def _connect(ray: Any, address: str | None, workers: int | None) -> bool:
    """Join ``address`` or start a local cluster with ``workers`` CPUs; True if this call started Ray."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
    if address is not None:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=workers or os.cpu_count() or 1, **kwargs)
    return True


class RayEngine:
    """Every task as a Ray task; records gathered in plan order."""

    name = "ray"

    def run(
        self,
        tasks: Sequence[Task],
        base: TensorStore,
        metrics: Sequence[Metric],
        *,
        device: torch.device,
        policy: ExecutionPolicy,
        progress: bool | None,
        address: str | None = None,
        workers: int | None = None,
    ) -> list[Record]:
        """Run the plan on Ray.

        Args:
            address: A running cluster to join (``auto``: the one on this machine, or
                ``RAY_ADDRESS``; ``ray://host:10001``). Default: start a local one.
            workers: Tasks at once; with no ``address``, the local cluster's CPUs (default:
                all cores). If Ray is running in this process already, it is used as it is.

        Raises:
            InputError: Ray missing, bad input in a task (as the serial engine says it).
        """
        if workers is not None and workers < 1:
            raise InputError("--workers must be at least 1")
        if address is not None and workers is not None:
            raise InputError("give --address (join a cluster) or --workers (start a local one), not both")
        ray = _ray()
        started = _connect(ray, address, workers)
        try:
            return self._run(ray, list(tasks), base, list(metrics), device, policy, progress, workers)
        finally:
            if started:
                ray.shutdown()

    def _run(
        self,
        ray: Any,
        tasks: list[Task],
        base: TensorStore,
        metrics: list[Metric],
        device: torch.device,
        policy: ExecutionPolicy,
        progress: bool | None,
        workers: int | None,
    ) -> list[Record]:
        context = [ray.put((tasks, base, metrics, device, policy))]
        remote = _remote()
        # Two tasks per worker in flight: each worker finds its next task queued when it finishes
        # one, instead of idling for a round trip to the driver; Ray runs only as many at once as
        # there are CPUs, so a queued task holds no memory.
        window = 2 * workers if workers else len(tasks)
        results: dict[int, list[Record]] = {}
        pending: dict[Any, int] = {}
        # Largest tasks first, so that no worker is left with the embedding while the others
        # idle; records are still gathered in plan order.
        queue = iter(sorted(range(len(tasks)), key=lambda i: -_work(tasks[i], base)))
        disable = None if progress is None else not progress
        with tqdm(total=sum(len(t.jobs) for t in tasks), desc="comparing", unit="matrix", disable=disable, leave=False) as bar:
            try:
                while len(results) < len(tasks):
                    for index in queue:
                        pending[remote.remote(context, index, _TEST_CRASH_ONCE)] = index
                        if len(pending) >= window:
                            break
                    done, _ = ray.wait(list(pending), num_returns=1)
                    for ref in done:
                        index = pending.pop(ref)
                        results[index] = _get(ray, ref)
                        bar.update(len(tasks[index].jobs))
            finally:
                for ref in pending:  # an error: nothing more is needed
                    ray.cancel(ref, force=False)
        return [record for index in range(len(tasks)) for record in results[index]]


def _work(task: Task, base: TensorStore) -> int:
    """A task's size for scheduling: elements of the base matrix times the matrices read."""
    return math.prod(base.shape(task.name)) * (1 + len(task.jobs))


def _get(ray: Any, ref: Any) -> list[Record]:
    """A task's records; an exception raised in the task is raised here as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, BaseException):
            raise cause from None  # InputError stays InputError: one line, exit 2
        raise


ENGINES.register(RayEngine())  # type: ignore[arg-type]
