"""Watching run folders while they train: each checkpoint analysed once it is complete.

:func:`watch` polls the run folders, and when a checkpoint is complete (its step file,
``trainer_state.json``, is there and parses: the Trainer writes it last, so a half-written
folder is never read) it analyses it, through the result cache (``OUT/.cache``) so that every
checkpoint is measured exactly once, and rewrites the output folder all or nothing. It stops
when every run has reached ``until_step``, or on Ctrl-C, after the work in hand, with the
outputs of the last complete pass in place.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from .analysis import analyze
from .containers import TensorStore, open_checkpoint
from .errors import InputError
from .runs import Run, match_step_folder, open_snapshot
from .snapshot import Snapshot

PathLike = str | os.PathLike[str]


def complete_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """The step folders of ``run`` that are complete, as ``(step, path)``, ascending.

    Complete means the pattern's step file (``trainer_state.json``) exists and parses as
    JSON; its ``global_step`` is the step. A pattern without a step file cannot tell a
    finished folder from one being written, so its folders count once they exist.
    """
    found = []
    for child in run.iterdir() if run.is_dir() else ():
        matched = match_step_folder(child.name)
        if matched is None or not child.is_dir():
            continue
        pattern, number = matched
        step = number
        if pattern.step_file is not None:
            try:
                state = json.loads((child / pattern.step_file).read_text())
            except (OSError, ValueError):
                continue  # not written yet, or being written
            value = state.get("global_step") if isinstance(state, dict) else None
            step = int(value) if isinstance(value, (int, float)) else number
        found.append((step, child))
    return sorted(found)


class _Stop:
    """Ctrl-C as a request: the loop stops at its next check, never inside a write.

    A second Ctrl-C raises ``KeyboardInterrupt`` at once, for a user who will not wait.
    """

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: object) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.requested and time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))


def watch(
    base: PathLike | TensorStore,
    tuned: Sequence[PathLike],
    out: PathLike,
    *,
    until_step: int | None = None,
    poll: float = 5.0,
    cache: bool = True,
    plots: bool = True,
    fmt: str = "png",
    on_update: Callable[[pd.DataFrame, pd.DataFrame], None] | None = None,
    reader_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> pd.DataFrame | None:
    """Analyse each run's checkpoints as they appear, rewriting ``out`` after each new one.

    Args:
        base: The base model's checkpoint (or an open ``TensorStore``).
        tuned: Run folders (``checkpoint-N/`` appear in them while training runs).
        out: The output folder; results are cached in ``out/.cache``.
        until_step: Stop once every run has a complete checkpoint at this step or later.
            None: run until Ctrl-C.
        poll: Seconds between looks at the run folders.
        cache: Keep results in ``out/.cache`` (each checkpoint is then measured once);
            without it every pass recomputes every checkpoint.
        plots, fmt: As :func:`dora_analysis.outputs.write_outputs`.
        on_update: Called with ``(layers, summary)`` after each rewrite.
        reader_options: As :func:`dora_analysis.analyze`.
        **options: Further :func:`dora_analysis.analyze` settings (``modules``, ``axis``...).

    Returns:
        The last ``layers`` table written, or None if no checkpoint was complete.

    Raises:
        InputError: A run folder that does not exist, or any input error of ``analyze``.
    """
    from .cache import held_writes
    from .outputs import write_outputs
    from .summary import summarize

    out = Path(out)
    folders = [Path(t) for t in tuned]
    for folder in folders:
        if not folder.is_dir():
            raise InputError("--watch needs run folders that exist", path=folder, hint="create the run folder, or start training first")
    store = base if isinstance(base, TensorStore) else open_checkpoint(base)
    # A run handed to analyze as a Run keeps its own label, and its steps are filtered there:
    # the method label is applied here, and only wanted steps are opened, so that a run whose
    # wanted checkpoints are not written yet waits instead of failing the pass.
    method = options.pop("method", None)
    wanted = None if options.get("steps") is None else set(options["steps"])
    opened: dict[Path, dict[Path, tuple[int, Snapshot]]] = {f: {} for f in folders}
    reached = dict.fromkeys(folders, -1)  # the latest complete step of each run, wanted or not
    layers: pd.DataFrame | None = None
    stop = _Stop()
    with stop.installed():
        while True:
            new = False
            for folder in folders:
                for step, path in complete_checkpoints(folder):
                    reached[folder] = max(reached[folder], step)
                    if path not in opened[folder] and (wanted is None or step in wanted):
                        opened[folder][path] = (step, open_snapshot(path, reader_options=reader_options))
                        new = True
            if new and all(opened.values()):
                runs = [_run(folder, opened[folder], method) for folder in folders]
                with held_writes() as commit_cache:  # the cache lands only with the outputs
                    layers = analyze(
                        store, runs, reader_options=reader_options, cache=out / ".cache" if cache else None, progress=False, **options
                    )
                    summary = summarize(layers)
                    write_outputs(out, layers, summary, fmt=fmt, plots=plots)
                    commit_cache()
                if on_update is not None:
                    on_update(layers, summary)
            if until_step is not None and all(step >= until_step for step in reached.values()):
                return layers
            if stop.requested:
                return layers
            stop.sleep(poll)
            if stop.requested:
                return layers


def _run(folder: Path, snapshots: Mapping[Path, tuple[int, Snapshot]], method: str | None = None) -> Run:
    """A run of the complete checkpoints found so far, as :func:`~dora_analysis.runs.open_run` makes it."""
    steps = sorted(snapshots.values(), key=lambda t: t[0])
    if len({s for s, _ in steps}) != len(steps):
        raise InputError("two checkpoints report the same step", path=folder, hint="check trainer_state.json global_step")
    methods = {snap.method for _, snap in steps}
    if method is None and len(methods) > 1:
        raise InputError(f"run mixes methods {sorted(methods)}", path=folder)
    return Run(name=folder.name, path=folder, steps=steps, method=method or methods.pop())
