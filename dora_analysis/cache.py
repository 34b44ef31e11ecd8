"""The incremental result cache: what ``analyze`` measured once, it never measures again.

Results are stored per (base, tuned snapshot, metric and its version, options) in one CSV file
each under the output folder (``DIR/.cache/<key>.csv``, one row per base tensor), so a rerun
on a run folder that gained checkpoints computes only the new ones. The plan is split
*before* the engine runs (:meth:`ResultCache.split`): a job found here is never handed to the
engine, so its tuned tensor is never read, and a task whose every job is cached does not read
its base matrix either.

What makes a stored result valid:

* **Snapshot identity** (:func:`identity`): for each file that can hold weights or the
  settings that shape them (weights, ``*.index.json``, ``config.json``,
  ``adapter_config.json``), its name, size and modification time, plus a hash of the
  safetensors header or of the small JSON file; never the whole of a large file. The same
  for the base. A re-saved or edited checkpoint is a different snapshot.
* **The metric**: its name, ``version`` (bumped when its numbers change) and its settings
  (``axis`` ...); and the execution settings that could touch the last bits (device type,
  block size) and the adapter reader options.
* **The matrix**: the tensor name and its storage layout (``fan_in_fan_out``).

Values are written as Python's shortest round-trip text (``repr`` of a float), and read back
with ``float()``, so a cached number is bit for bit the number first computed.

Beside the results, :class:`BaseCache` keeps per-base-matrix work (the spectral metrics' SVD
of each base matrix) in ``DIR/.cache/base/``, one safetensors file per matrix, so a second
run over the same base skips it, even when the results themselves cannot be cached.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .metrics import Column, Metric
from .metrics.base import Memo, Tensors
from .plan import Job, Task

Record = dict[str, object]

CACHE_DIR = ".cache"
# Files in a checkpoint folder that may hold weights or the settings that shape them.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")
# Files a training run writes beside the weights that never change them (and that a trainer
# deletes or rewrites later: they must not change the snapshot's identity).
_NOT_WEIGHTS = ("optimizer", "scheduler", "rng_state", "training_args", "trainer_state", "scaler")
# JSON files up to this size are hashed whole (configs, shard indexes); larger ones by size and time.
_SMALL_JSON = 1 << 20
_MAX_HEADER = 100_000_000


# Cache writes held back by :func:`held_writes`; None writes at once.
_PENDING: ContextVar[list[Callable[[], None]] | None] = ContextVar("held cache writes", default=None)


@contextmanager
def held_writes() -> Iterator[Callable[[], None]]:
    """Hold every cache write made inside the block until the yielded ``commit()`` is called.

    The cache lives inside the output folder, which is written all or nothing: a command
    analyses, writes its outputs, and only then commits the new cache entries, so a run that
    fails or is interrupted leaves the folder (cache included) as it found it. Writes not
    committed when the block ends are dropped.
    """
    pending: list[Callable[[], None]] = []
    token = _PENDING.set(pending)

    def commit() -> None:
        while pending:
            pending.pop(0)()

    try:
        yield commit
    finally:
        _PENDING.reset(token)


def _later(write: Callable[[], None]) -> None:
    """Run ``write`` now, or when the enclosing :func:`held_writes` block commits."""
    pending = _PENDING.get()
    if pending is None:
        write()
    else:
        pending.append(write)


def _matters(path: Path) -> bool:
    return path.is_file() and path.name.endswith(_WEIGHT_SUFFIXES) and not path.name.startswith(_NOT_WEIGHTS)


def _content_digest(path: Path) -> bytes:
    """A hash of a safetensors file's header, or of a small JSON file; else nothing."""
    try:
        with path.open("rb") as fh:
            if path.name.endswith(".safetensors"):
                head = fh.read(8)
                size = int.from_bytes(head, "little") if len(head) == 8 else 0
                return hashlib.sha256(head + fh.read(min(size, _MAX_HEADER))).digest()
            if path.name.endswith(".json") and path.stat().st_size <= _SMALL_JSON:
                return hashlib.sha256(fh.read()).digest()
    except OSError:
        return b"unreadable"
    return b""


def identity(path: str | os.PathLike[str]) -> str | None:
    """A cheap, safe identity of a checkpoint: a folder's weight files, or one file and its configs.

    Args:
        path: A checkpoint or adapter folder, or a weights file.

    Returns:
        A hex digest, or None if the path does not exist (an in-memory state has no identity).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _matters(p))
    elif path.is_file():
        siblings = [path.parent / "config.json", path.parent / "adapter_config.json"]
        if path.name.endswith(".index.json"):
            siblings += [p for p in path.parent.iterdir() if _matters(p)]
        files = [path, *sorted({p for p in siblings if p != path and p.is_file()})]
    else:
        return None
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        digest.update(_content_digest(f))
    return digest.hexdigest()


def metric_settings(metric: Metric) -> dict[str, Any]:
    """A metric's name, version and settings (its public instance attributes, e.g. ``axis``)."""
    options = {k: v for k, v in sorted(vars(metric).items()) if not k.startswith("_")}
    return {"name": metric.name, "version": metric.version, "options": options}


def _encode(value: object, dtype: str) -> str:
    """A value as text that reads back exactly (floats: Python's shortest round-trip repr)."""
    if dtype == "float64":
        return repr(float(value))  # type: ignore[arg-type]
    if dtype == "int64":
        return str(int(value))  # type: ignore[call-overload]
    return str(value)


def _decode(text: str, dtype: str) -> object:
    if dtype == "float64":
        return float(text)
    if dtype == "int64":
        return int(text)
    return text


class ResultCache:
    """Stored results of one analysis setting, in ``folder``.

    Args:
        folder: Where the files live (``DIR/.cache``); created on first write.
        base_path: The base checkpoint's path (its identity is part of every key).
        metrics: The chosen metrics.
        context: Other settings the numbers depend on (device type, block size, reader
            options): any JSON-able mapping.
    """

    def __init__(self, folder: str | os.PathLike[str], base_path: Path, metrics: Sequence[Metric], context: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.metrics = list(metrics)
        self.base_id = identity(base_path)
        self._context = json.dumps(context, sort_keys=True, default=repr)
        self._ids: dict[Path, str | None] = {}
        self._tables: dict[Path, dict[str, dict[str, str]]] = {}

    @property
    def usable(self) -> bool:
        """Whether stored results can stand in for computed ones.

        False when the base has no identity on disk (an in-memory base), or when a metric
        compares the tuned versions of a matrix with each other (``directions``, for the
        subspace pairs): those need every version in the same task, cached or not.
        """
        return self.base_id is not None and not any(hasattr(m, "directions") for m in self.metrics)

    def _snapshot_id(self, job: Job) -> str | None:
        path = Path(job.snapshot.path)
        if path not in self._ids:
            self._ids[path] = identity(path)
        return self._ids[path]

    def _file(self, job: Job, metric: Metric) -> Path | None:
        snap = self._snapshot_id(job)
        if snap is None or self.base_id is None:
            return None
        key = json.dumps([self.base_id, snap, metric_settings(metric), self._context], sort_keys=True, default=repr)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.csv"

    def _table(self, file: Path) -> dict[str, dict[str, str]]:
        """A cache file's rows by tensor name, as text (read once per analysis)."""
        if file not in self._tables:
            rows: dict[str, dict[str, str]] = {}
            if file.is_file():
                try:
                    frame = pd.read_csv(file, dtype=str, keep_default_na=False)
                    rows = {r["tensor"]: r for r in frame.to_dict("records")}
                except (OSError, ValueError, KeyError, pd.errors.ParserError):
                    rows = {}  # a damaged cache file is recomputed, never trusted
            self._tables[file] = rows
        return self._tables[file]

    def _lookup(self, task: Task, job: Job) -> Record | None:
        record: Record = {"run": job.run, "method": job.method, "step": job.step, "module": task.module}
        for metric in self.metrics:
            file = self._file(job, metric)
            row = None if file is None else self._table(file).get(task.name)
            if row is None or row.get("fan_in_fan_out") != str(task.fan_in_fan_out):
                return None
            try:
                record.update({c.name: _decode(row[c.name], c.dtype) for c in metric.columns})
            except (KeyError, ValueError):
                return None
        return record

    def split(self, plan: Sequence[Task]) -> tuple[list[Task], list[Record]]:
        """Separate the jobs already measured from those to compute.

        Returns:
            The plan left to run (tasks with only their uncached jobs; tasks with none are
            dropped, so their base matrix is not read) and the cached records.
        """
        todo: list[Task] = []
        cached: list[Record] = []
        for task in plan:
            left = []
            for job in task.jobs:
                record = self._lookup(task, job)
                if record is None:
                    left.append(job)
                else:
                    cached.append(record)
            if left:
                todo.append(Task(task.name, task.module, task.fan_in_fan_out, tuple(left)))
        return todo, cached

    def save(self, plan: Sequence[Task], records: Sequence[Record]) -> None:
        """Store the engine's records for the plan it ran; each touched file rewritten atomically."""
        where = {(job.run, job.step, task.module): (task, job) for task in plan for job in task.jobs}
        changed: dict[Path, Sequence[Column]] = {}
        for record in records:
            found = where.get((record["run"], record["step"], record["module"]))  # type: ignore[arg-type]
            if found is None:
                continue
            task, job = found
            for metric in self.metrics:
                file = self._file(job, metric)
                if file is None:
                    continue
                row = {"tensor": task.name, "fan_in_fan_out": str(task.fan_in_fan_out)}
                row.update({c.name: _encode(record[c.name], c.dtype) for c in metric.columns})
                self._table(file)[task.name] = row
                changed[file] = metric.columns
        for file, columns in sorted(changed.items()):
            _later(functools.partial(self._write, file, columns))

    def _write(self, file: Path, columns: Sequence[Column]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        header = ["tensor", "fan_in_fan_out", *(c.name for c in columns)]
        rows = [[row[h] for h in header] for row in self._tables[file].values() if all(h in row for h in header)]
        frame = pd.DataFrame(rows, columns=header)
        fd, tmp = tempfile.mkstemp(prefix=f".{file.stem}.", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "w", newline="") as fh:
                frame.to_csv(fh, index=False)
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


BASE_DIR = "base"


class BaseCache:
    """Per-base-matrix work kept between runs, in ``folder`` (usually ``DIR/.cache/base``).

    A metric asks for it through :meth:`MatrixContext.remember
    <dora_analysis.metrics.base.MatrixContext.remember>` with a label (what is computed, and
    its version); the engine hands each task's context the :meth:`memo` of its matrix. One
    safetensors file per (base :func:`identity`, tensor name, storage layout, device type,
    torch version, label). A damaged or unreadable file is recomputed and rewritten, never
    trusted; writes are atomic, so workers may share the folder. Tensors read back with the
    values and the memory layout (row- or column-major) they were computed with, so a
    cached SVD gives bit for bit the numbers a fresh one does.

    Args:
        folder: Where the files live; created on first write.
        base_path: The base checkpoint's path; a base with no identity (in memory) is not cached.
    """

    def __init__(self, folder: str | os.PathLike[str], base_path: Path | None) -> None:
        self.folder = Path(folder)
        self.base_id = None if base_path is None else identity(base_path)

    def memo(self, tensor: str, fan_in_fan_out: bool, device: torch.device) -> Memo | None:
        """The memo of one base matrix on ``device`` (None when the base has no identity)."""
        if self.base_id is None:
            return None
        return functools.partial(self._remember, tensor, fan_in_fan_out, torch.device(device))

    def _file(self, tensor: str, fan_in_fan_out: bool, device: torch.device, label: str) -> Path:
        key = json.dumps([self.base_id, tensor, fan_in_fan_out, device.type, torch.__version__, label])
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.safetensors"

    def _remember(self, tensor: str, fan_in_fan_out: bool, device: torch.device, label: str, compute: Callable[[], Tensors]) -> Tensors:
        file = self._file(tensor, fan_in_fan_out, device, label)
        found = _read_tensors(file, device)
        if found is not None:
            return found
        tensors = compute()
        _later(functools.partial(self._write, file, tensors, {"tensor": tensor, "label": label}))
        return tensors

    def _write(self, file: Path, tensors: Tensors, metadata: dict[str, str]) -> None:
        from safetensors.torch import save_file

        # A column-major matrix (LAPACK's U) is stored as its transpose and read back as a view.
        columns = sorted(k for k, t in tensors.items() if t.ndim == 2 and not t.is_contiguous() and t.T.is_contiguous())
        stored = {k: (t.T if k in columns else t).detach().contiguous().cpu() for k, t in tensors.items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{file.stem}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        try:
            save_file(stored, tmp, metadata={**metadata, "column_major": ",".join(columns)})
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _read_tensors(file: Path, device: torch.device) -> Tensors | None:
    """A :class:`BaseCache` file's tensors on ``device``, or None if absent or unreadable."""
    from safetensors import safe_open

    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as fh:
            columns = set(filter(None, (fh.metadata() or {}).get("column_major", "").split(",")))
            return {k: fh.get_tensor(k).T if k in columns else fh.get_tensor(k) for k in fh.keys()}
    except Exception:  # a damaged cache file is recomputed, whatever the reader raised
        return None
