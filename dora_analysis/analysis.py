"""Streaming base and tuned checkpoints through the metrics into one tidy DataFrame.

The walk is matrix-major: each selected base matrix is read **once** and measured against
that matrix at every step of every run before the next is read, so peak memory is a few
matrices (not a model) and the base is read once however many steps there are. The walk is a
plan of tasks (:mod:`dora_analysis.plan`) run by an engine (:mod:`dora_analysis.engine`); the
columns come from the chosen metrics (:mod:`dora_analysis.metrics`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import engine_ray  # noqa: F401 - registers the "ray" engine (Ray itself is imported only when used)
from . import names as nm
from .cache import BASE_DIR, BaseCache, ResultCache
from .containers import TensorStore, open_checkpoint
from .decompose import Axis
from .engine import ENGINES, PAIRS_KEY, SPECTRUM_KEY, ExecutionPolicy
from .errors import InputError
from .metrics import Metric, build_metrics, layer_columns
from .peft_format import ADAPTER_CONFIG
from .plan import build_plan
from .runs import Run, open_run

PathLike = str | os.PathLike[str]

# The default table's columns (the ``md`` metric's), derived from the metric's column specs.
LAYER_COLUMNS: list[str] = [c.name for c in layer_columns(build_metrics())]


def _filter_steps(run: Run, steps: Iterable[int] | None, last: int | None) -> Run:
    """Keep only the chosen steps of a run (``steps`` first, then the ``last`` N)."""
    kept = run.steps
    if steps is not None:
        wanted = set(steps)
        kept = [s for s in kept if s[0] in wanted]
    if last is not None:
        kept = kept[-last:] if last > 0 else []
    if not kept:
        raise InputError("no checkpoint left after step selection", path=run.path, hint=f"steps present: {[s for s, _ in run.steps]}")
    return Run(name=run.name, path=run.path, steps=kept, method=run.method)


def _unique_names(runs: list[Run]) -> None:
    """Make run labels unique (two runs called `checkpoint-240` get `#2` appended)."""
    seen: dict[str, int] = {}
    for run in runs:
        count = seen.get(run.name, 0)
        seen[run.name] = count + 1
        if count:
            run.name = f"{run.name}#{count + 1}"


def open_runs(
    tuned: PathLike | Run | Sequence[PathLike | Run],
    *,
    method: str | None = None,
    steps: Iterable[int] | None = None,
    last: int | None = None,
    reader_options: Mapping[str, Any] | None = None,
) -> list[Run]:
    """Open every tuned path as a :class:`Run` and apply the step selection."""
    items = [tuned] if isinstance(tuned, (str, os.PathLike, Run)) else list(tuned)
    if not items:
        raise InputError("no tuned checkpoint given")
    steps = None if steps is None else list(steps)
    runs = [r if isinstance(r, Run) else open_run(r, method=method, reader_options=reader_options) for r in items]
    runs = [_filter_steps(r, steps, last) for r in runs]
    _unique_names(runs)
    return runs


def analyze(
    base: PathLike | TensorStore,
    tuned: PathLike | Run | Sequence[PathLike | Run],
    *,
    modules: str | None = None,
    all_modules: bool = False,
    method: str | None = None,
    axis: Axis = "out",
    steps: Iterable[int] | None = None,
    last: int | None = None,
    device: str | torch.device = "cpu",
    metrics: Sequence[str | Metric] | None = None,
    metric_options: Mapping[str, Any] | None = None,
    reader_options: Mapping[str, Any] | None = None,
    engine: str = "serial",
    policy: ExecutionPolicy | None = None,
    progress: bool | None = None,
    engine_options: Mapping[str, Any] | None = None,
    cache: PathLike | None = None,
    layout: str | None = None,
) -> pd.DataFrame:
    """Per-matrix change of tuned checkpoints against a base, one row per (run, step, matrix).

    Args:
        base: The base model: a checkpoint file or folder, or an open ``TensorStore``.
        tuned: One or more tuned paths (run folders with ``checkpoint-N/``, checkpoint folders,
            adapter folders, weight files) or :class:`~dora_analysis.runs.Run` objects.
        modules: Regex searched in module names (tensor name without ``.weight``). Default:
            the 2-D weights inside numbered, repeated blocks.
        all_modules: Analyse every tensor with 2 or more dimensions (embeddings, heads, convs).
        method: Label for the ``method`` column (default: ``ft`` for full checkpoints, the
            adapter's own method otherwise).
        axis: ``"out"`` (the paper's: one vector per output feature) or ``"in"``; the ``md``
            metric's setting.
        steps: Keep only these training steps.
        last: Keep only the last N steps of each run (after ``steps``).
        device: Where to compute (``"cuda"`` moves each matrix to the GPU).
        metrics: Metric names in :data:`dora_analysis.metrics.METRICS` (or instances);
            default ``["md"]``, the magnitude / direction change.
        metric_options: Further settings the metrics read (``axis`` is passed for you).
        reader_options: Format-specific reader settings, e.g. ``{"dora_axis": "out"}`` for
            kohya / LyCORIS DoRA files whose ``dora_scale`` axis the shape cannot tell.
        engine: Where tasks run: a name in :data:`dora_analysis.engine.ENGINES`.
        policy: Thread count and block sizes (default :class:`ExecutionPolicy`); they never
            change the numbers beyond float64 rounding.
        progress: Show a progress bar on stderr (default: when stderr is a terminal).
        engine_options: Settings of the chosen engine, e.g. ``{"workers": 2}`` or
            ``{"address": "auto"}`` for ``engine="ray"`` (:mod:`dora_analysis.engine_ray`).
        layout: ``"linear"`` or ``"conv1d"``: how GPT-2-style matrices (``c_attn``, ``c_proj``,
            ``c_fc``) are stored, for a base whose config.json is missing; wins over any guess.
        cache: A folder of stored results (:mod:`dora_analysis.cache`, usually ``DIR/.cache``):
            jobs measured before are taken from it without reading their tensors, new ones
            are added to it; per-base-matrix work (the base SVD of ``intruders``) is kept in
            its ``base/`` folder, so a second run over the same base skips it even when the
            results are not cached. None: compute everything.

    Returns:
        The identity columns (``run``, ``method``, ``step``, ``module``, ``layer``, ``kind``),
        then each metric's columns (for ``md``: :data:`LAYER_COLUMNS`).

    Raises:
        InputError: Missing or unreadable checkpoints, no matching matrices, shape
            mismatches, NaN/Inf weights, an unknown metric or engine.

    Example:
        >>> df = analyze("base/", ["runs/ft", "runs/dora"], modules=r"attention\\.self\\.query")
        >>> summarize(df)[["run", "kind", "pearson_r"]]
    """
    try:
        chosen = build_metrics(metrics, {**(metric_options or {}), "axis": axis})
    except ValueError as exc:
        raise InputError(str(exc), hint="list them with `dora-analyze --list-metrics`") from None
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}", hint=f"known: {', '.join(ENGINES.names())}")
    store = base if isinstance(base, TensorStore) else _open_base(base)
    runs = open_runs(tuned, method=method, steps=steps, last=last, reader_options=reader_options)
    shapes = {k: store.shape(k) for k in store.keys()}
    selected = select_modules(shapes, modules, include_all=all_modules)
    if not selected:
        what = f"--modules {modules!r}" if modules else "the default selection (2-D weights inside numbered blocks)"
        raise InputError(f"no tensor matches {what}", path=store.path, hint="list names with `dora-analyze --list BASE`")
    plan = build_plan(store, runs, selected, layout=layout)
    modules = [task.module for task in plan]  # reading order, whatever the cache spares
    policy = policy or ExecutionPolicy()
    stored, cached = None, []
    if cache is not None:
        # Per-base-matrix work (the spectral metrics' base SVD) is kept too, results cached or not.
        policy = dataclasses.replace(policy, base_cache=BaseCache(Path(cache) / BASE_DIR, store.path))
        # Split before the engine runs: a cached job never reads its tuned tensor.
        stored = ResultCache(cache, store.path, chosen, _cache_context(torch.device(device), policy, reader_options))
        if stored.usable:
            plan, cached = stored.split(plan)
    run = ENGINES[engine].run
    options = dict(engine_options or {})
    records = run(plan, store, chosen, device=torch.device(device), policy=policy, progress=progress, **options) if plan else []
    if stored is not None and stored.usable:
        stored.save(plan, records)
    return _table([*cached, *records], runs, modules, chosen)


def _cache_context(device: torch.device, policy: ExecutionPolicy, reader_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """What, besides the files and the metric, a stored number depends on."""
    return {"device": device.type, "block_elements": policy.block_for(device), "reader_options": dict(reader_options or {})}


def select_modules(shapes: Mapping[str, tuple[int, ...]], modules: str | None, *, include_all: bool = False) -> list[str]:
    """:func:`dora_analysis.names.select`, with a bad ``--modules`` regex as an ``InputError``."""
    try:
        return nm.select(shapes, modules, include_all=include_all)
    except nm.InvalidPattern as exc:
        raise InputError(f"--modules {exc}", hint="it is a Python regex: escape dots as \\.") from None


def _table(records: list[dict[str, object]], runs: list[Run], modules: list[str], metrics: Sequence[Metric]) -> pd.DataFrame:
    """The records as the analyzer's DataFrame: identity columns filled in, rows in reading order.

    The subspace similarities between tuned versions that the engine returns with a task's
    records (:data:`~dora_analysis.engine.PAIRS_KEY`) go to ``df.attrs["pairs"]``
    (:func:`subspace_pairs`), the update spectra (:data:`~dora_analysis.engine.SPECTRUM_KEY`)
    to ``df.attrs["spectra"]`` (:func:`update_spectra`).
    """
    pairs = [row for record in records for row in record.pop(PAIRS_KEY, ())]  # type: ignore[attr-defined]
    spectra = [row for record in records for row in record.pop(SPECTRUM_KEY, ())]  # type: ignore[attr-defined]
    df = pd.DataFrame.from_records(records)
    kind_of = nm.kinds(df["module"].unique())
    df["kind"] = df["module"].map(kind_of)
    df["layer"] = df["module"].map(nm.layer_index).astype("Int64")
    # Records arrive matrix-major (the streaming order); present them run, step, module.
    order = ({run.name: i for i, run in enumerate(runs)}, {m: i for i, m in enumerate(modules)})
    df = _reading_order(df, *order)[[c.name for c in layer_columns(metrics)]]
    if pairs:
        frame = pd.DataFrame.from_records(pairs, columns=PAIR_COLUMNS)
        df.attrs["pairs"] = _Attached(_reading_order(frame, *order, run="run_a", step="step_a"))
    if spectra:
        frame = pd.DataFrame.from_records(spectra, columns=SPECTRUM_COLUMNS)
        df.attrs["spectra"] = _Attached(_reading_order(frame, *order, then=("i",)))
    return df


def _reading_order(
    frame: pd.DataFrame,
    run_order: Mapping[str, int],
    module_order: Mapping[str, int],
    *,
    run: str = "run",
    step: str = "step",
    then: Sequence[str] = (),
) -> pd.DataFrame:
    """``frame``'s rows by run (in the order given), step, module (in plan order), then ``then``; stable."""
    keyed = frame.assign(_r=frame[run].map(run_order), _m=frame["module"].map(module_order))
    return keyed.sort_values(["_r", step, "_m", *then], kind="stable").drop(columns=["_r", "_m"]).reset_index(drop=True)


class _Attached:
    """A frame carried in another frame's ``attrs``: pandas deep-copies ``attrs`` on every
    derived frame, and this one is shared instead of copied (it is never changed in place)."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame

    def __deepcopy__(self, memo: dict[int, object]) -> _Attached:
        return self


# pairs.csv: phi(i, j) between the top singular subspaces of two tuned versions of a matrix.
PAIR_COLUMNS: list[str] = ["run_a", "step_a", "run_b", "step_b", "module", "i", "j", "phi"]


def subspace_pairs(layers: pd.DataFrame) -> pd.DataFrame:
    """The subspace similarity between every two tuned versions of each matrix (``pairs.csv``).

    Computed in the same walk as ``layers`` by :func:`analyze` when a metric that offers the
    update's top directions (``spectrum``) is chosen and a matrix has two or more tuned
    versions (runs or steps): phi(i, j) = ||U_a[:, :i]^T U_b[:, :j]||_F^2 / min(i, j) with U
    the top-r left singular vectors of each dW (Hu et al. 2021, LoRA, section 7, figures 3-4);
    r is the adapter's rank, else ``metric_options={"rank": r}`` (default 8).

    Returns:
        One row per (run_a, step_a, run_b, step_b, module, i, j) with ``phi`` in [0, 1]; an
        empty frame with those columns when nothing was paired.

    Example:
        >>> layers = analyze("base/", ["runs/lora", "runs/dora"], metrics=["md", "spectrum"])
        >>> subspace_pairs(layers).query("i == j").groupby("i")["phi"].mean()
    """
    return _attached(layers, "pairs", PAIR_COLUMNS)


# spectra.csv: the top singular values of each tuned matrix's update dW.
SPECTRUM_COLUMNS: list[str] = ["run", "method", "step", "module", "i", "sigma"]


def update_spectra(layers: pd.DataFrame) -> pd.DataFrame:
    """The top singular values of every update dW = W_t - W0 (``spectra.csv``).

    Computed in the same walk as ``layers`` by :func:`analyze` when the ``spectrum`` metric is
    chosen: sigma_1 >= sigma_2 >= ... of each tuned matrix's update, at most 64 per matrix (a
    LoRA update of rank r has r; its singular values come from the factors). The figure is
    :func:`dora_analysis.plots.plot_update_spectra`.

    Returns:
        One row per (run, step, module, i) with ``sigma``, the i-th largest singular value (i
        from 1); an empty frame with those columns when the spectrum metric was not chosen.

    Example:
        >>> layers = analyze("base/", ["runs/ft", "runs/lora"], metrics=["md", "spectrum"])
        >>> update_spectra(layers).groupby(["run", "i"])["sigma"].median()
    """
    return _attached(layers, "spectra", SPECTRUM_COLUMNS)


def _attached(layers: pd.DataFrame, key: str, columns: list[str]) -> pd.DataFrame:
    """A copy of the frame :func:`analyze` attached to ``layers`` under ``key``, else an empty one."""
    found = layers.attrs.get(key)
    return found.frame.copy() if isinstance(found, _Attached) else pd.DataFrame(columns=columns)


def _open_base(path: PathLike) -> TensorStore:
    """The base model's checkpoint; an adapter given as the base is a mistake worth naming."""
    folder = Path(path)
    if (folder / ADAPTER_CONFIG).is_file() or folder.name.startswith("adapter_model."):
        raise InputError(
            "BASE is an adapter, not a model",
            path=folder,
            hint="give the base model it was trained on first, then the adapter",
        )
    return open_checkpoint(folder)


def base_path_for(tuned: PathLike) -> Path | None:
    """The local base model an adapter (or a run of adapters) names, if any."""
    from .adapters import base_path_of
    from .runs import checkpoint_dirs

    path = Path(tuned)
    dirs = checkpoint_dirs(path)
    return base_path_of(dirs[0][1] if dirs else path)
