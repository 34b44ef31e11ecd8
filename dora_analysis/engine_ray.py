"""The ``ray`` engine: a plan's tasks as Ray tasks, on one machine or a cluster.

Plan tasks (one base matrix, every tuned version of it) go to Ray in batches, the largest
tasks first and alone, the small ones grouped (a Ray task costs milliseconds to schedule); a
worker runs each with :func:`~dora_analysis.engine.execute_task`, the same function the serial
engine runs, so the numbers are the same bit for bit; records are put back in plan order, so
``layers.csv`` is byte-identical. What travels:

* the plan, the base store and the metrics are put in Ray's object store once. Stores travel
  as paths (each reopens its files, reading headers only, once per worker), so every node must
  see the same paths: a shared file system. A store held in memory (a DeepSpeed ZeRO step
  consolidated by this process, a live model) is refused before Ray starts, with how to save it;
* each task sends back its records (a few numbers per tuned matrix), never a tensor.

Per task, a worker holds what the serial walk holds: the base matrix, one tuned matrix, the
metrics' per-base state. Failures:

* bad input inside a task (an :class:`~dora_analysis.errors.InputError`) is not retried: the
  error shown is the serial engine's, that of the first bad task in plan order (tasks after it
  are cancelled, those before it finish), and nothing is written;
* a worker process that dies (killed, out of memory) is retried by Ray on another worker
  (``max_retries``); tasks are pure reads, so a retry gives the same records;
* if the driver (the ``dora-analyze`` process) dies, Ray cancels its tasks and the run is lost:
  nothing was written, and it is rerun from the start.

Ray is an optional extra: ``pip install 'dora-analysis[ray]'``.
"""

from __future__ import annotations

import collections
import errno
import functools
import io
import math
import os
import pickle
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from .containers import MemoryStore, TensorStore
from .engine import ENGINES, ExecutionPolicy, Record, execute_task
from .errors import InputError
from .metrics import Metric
from .plan import Task

# How often Ray reruns a task whose worker process died (Ray's own default is 3).
MAX_RETRIES = 3

# Plan tasks travel in batches, about this many per CPU: a Ray task costs ~2 ms to schedule and
# return (measured with no-op tasks on 2 cores), as much as comparing one small matrix, while
# batches of about 1/8 of a worker's share keep the workers evenly loaded to the end.
BATCHES_PER_CPU = 8

# Test-only: a file path; the first task attempt that finds no file there creates it and kills
# its own worker process (os._exit), so tests can check that Ray's retry gives the same result.
_TEST_CRASH_ONCE: str | None = None

# In each worker: the plan it was last sent, by plan id, so that stores are reopened once per
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


def _task(context: tuple[str, bytes], batch: list[int], crash_marker: str | None) -> tuple[list[list[Record]], InputError | None]:
    """A batch of plan tasks, in a Ray worker.

    ``context`` is the plan's id and the plan pickled by the driver (as Ray pickles every
    argument; never bytes read from a file): Ray resolves it before the task starts, and it is
    unpickled (stores reopened) once per worker. Not an ObjectRef fetched here with
    ``ray.get``: a worker blocked in ``ray.get`` lends its CPU back, Ray starts another task on
    another worker in the meantime, and more tasks than CPUs then run at once.

    Returns the records of each task, in the batch's order, up to the first with bad input,
    and that task's error (None if there was none): the driver decides which error to show.
    """
    plan_id, blob = context
    if plan_id not in _CONTEXT:
        _CONTEXT.clear()  # one plan at a time: drop the previous plan's open stores
        _CONTEXT[plan_id] = pickle.loads(blob)
    tasks, base, metrics, device, policy = _CONTEXT[plan_id]
    if crash_marker is not None:
        _crash_once(crash_marker)
    done: list[list[Record]] = []
    for index in batch:
        try:
            done.append(execute_task(tasks[index], base, metrics, device=device, policy=policy))
        except InputError as exc:
            return done, exc
    return done, None


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
            InputError: Ray missing, a store held in memory (it cannot travel as a path), bad
                input in a task (as the serial engine says it).
        """
        if workers is not None and workers < 1:
            raise InputError("--workers must be at least 1")
        if address is not None and workers is not None:
            raise InputError("give --address (join a cluster) or --workers (start a local one), not both")
        ray = _ray()
        tasks = list(tasks)
        plan = _plan_bytes((tasks, base, list(metrics), device, policy))  # before Ray starts: it may refuse
        started = _connect(ray, address, workers)
        try:
            return self._run(ray, tasks, base, plan, progress, workers)
        finally:
            if started:
                ray.shutdown()

    def _run(
        self,
        ray: Any,
        tasks: list[Task],
        base: TensorStore,
        plan: bytes,
        progress: bool | None,
        workers: int | None,
    ) -> list[Record]:
        context = ray.put((uuid.uuid4().hex, plan))
        remote = _remote()
        cpus = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        batches = _batches(tasks, base, cpus)
        # Two batches per CPU in flight: each worker finds its next one queued when it finishes
        # one, instead of idling for a round trip to the driver; Ray runs only as many at once
        # as there are CPUs, so a queued batch holds no memory.
        window = 2 * cpus
        results: dict[int, list[Record]] = {}
        pending: dict[Any, list[int]] = {}
        waiting = collections.deque(batches)
        # Bad input: the error shown is the one the serial engine shows, that of the first bad
        # task in plan order. Once task i failed, tasks after i are not needed (cancelled), and
        # those before i still run, in case one of them fails too.
        first_error: tuple[int, InputError] | None = None

        def needed(batch: list[int]) -> bool:
            return first_error is None or batch[0] < first_error[0]

        disable = None if progress is None else not progress
        with tqdm(total=sum(len(t.jobs) for t in tasks), desc="comparing", unit="matrix", disable=disable, leave=False) as bar:
            try:
                while True:
                    while waiting and len(pending) < window:
                        batch = waiting.popleft()
                        if needed(batch):
                            pending[remote.remote(context, batch, _TEST_CRASH_ONCE)] = batch
                    for ref in [ref for ref, batch in pending.items() if not needed(batch)]:
                        ray.cancel(ref, force=False)
                        del pending[ref]
                    if not pending:
                        break
                    done, _ = ray.wait(list(pending), num_returns=1)
                    for ref in done:
                        batch = pending.pop(ref)
                        records, error = _get(ray, ref)
                        for index, task_records in zip(batch, records):
                            results[index] = task_records
                            bar.update(len(tasks[index].jobs))
                        if error is not None:
                            index = batch[len(records)]
                            if first_error is None or index < first_error[0]:
                                first_error = (index, error)
            finally:
                for ref in pending:  # an exception other than bad input: nothing more is needed
                    ray.cancel(ref, force=False)
        if first_error is not None:
            raise first_error[1]
        return [record for index in range(len(tasks)) for record in results[index]]


class _PathsOnly(pickle.Pickler):
    """Pickles a plan, refusing a store whose tensors are held in this process's memory."""

    def persistent_id(self, obj: Any) -> None:
        if isinstance(obj, MemoryStore):
            # Pickled, it would carry the whole model to every worker: each task would hold all
            # of it, not a few matrices.
            raise InputError(
                "--engine ray has its workers open every checkpoint from files, and this one is held in memory"
                " (consolidated or taken from a live model)",
                path=obj.path,
                hint=obj.to_files or "save it to files first, or use --engine serial",
            )
        return None


def _plan_bytes(plan: tuple[Any, ...]) -> bytes:
    buffer = io.BytesIO()
    _PathsOnly(buffer, protocol=5).dump(plan)
    return buffer.getvalue()


def _batches(tasks: list[Task], base: TensorStore, cpus: int) -> list[list[int]]:
    """Plan task indices in batches, largest tasks first (so that no worker is left alone with
    the embedding at the end): consecutive tasks join a batch until it holds
    1 / (BATCHES_PER_CPU x cpus) of the work; a task larger than that is a batch of its own."""
    work = [_work(task, base) for task in tasks]
    share = sum(work) / (BATCHES_PER_CPU * cpus)
    batches: list[list[int]] = [[]]
    size = 0
    for index in sorted(range(len(tasks)), key=lambda i: -work[i]):
        if size >= share:
            batches.append([])
            size = 0
        batches[-1].append(index)
        size += work[index]
    # Within a batch, plan order: a task that fails then leaves only later tasks undone.
    return [sorted(batch) for batch in batches if batch]


def _work(task: Task, base: TensorStore) -> int:
    """A task's size for scheduling: elements of the base matrix times the matrices read."""
    return math.prod(base.shape(task.name)) * (1 + len(task.jobs))


def _get(ray: Any, ref: Any) -> tuple[list[list[Record]], InputError | None]:
    """A batch's records and bad-input error; another exception raised in it is raised here as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, BaseException):
            raise cause from None  # the task's own exception, not Ray's wrapper
        raise


ENGINES.register(RayEngine())  # type: ignore[arg-type]
