"""Streaming base and tuned checkpoints through the math into one tidy DataFrame.

The walk is matrix-major: each selected base matrix is read **once** and compared with that
matrix at every step of every run before the next is read, so peak memory is a few matrices
(not a model) and the base is read once however many steps there are.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm  # not tqdm.auto: it warns in notebooks without ipywidgets

from . import names as nm
from .checkpoints import TensorStore, open_checkpoint
from .decompose import Axis, compare
from .errors import InputError
from .runs import Run, Snapshot, open_run
from .stats import correlate

PathLike = str | os.PathLike[str]

LAYER_COLUMNS = [
    "run", "method", "step", "module", "layer", "kind", "rows", "cols",
    "delta_m", "delta_d", "delta_m_signed", "base_norm", "zero_rows", "axis",
]  # fmt: skip
SUMMARY_COLUMNS = [
    "run", "method", "kind", "n", "pearson_r", "pearson_p", "spearman_rho", "slope", "intercept",
    "r_within", "r_between", "r_ci_low", "r_ci_high",
]  # fmt: skip


@dataclass(frozen=True)
class _Job:
    """One (run, step, snapshot) to compare against the current base matrix."""

    run: Run
    step: int
    snapshot: Snapshot


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
    dora_scale_axis: str | None = None,
) -> list[Run]:
    """Open every tuned path as a :class:`Run` and apply the step selection."""
    items = [tuned] if isinstance(tuned, (str, os.PathLike, Run)) else list(tuned)
    if not items:
        raise InputError("no tuned checkpoint given")
    steps = None if steps is None else list(steps)
    runs = [r if isinstance(r, Run) else open_run(r, method=method, dora_scale_axis=dora_scale_axis) for r in items]
    runs = [_filter_steps(r, steps, last) for r in runs]
    _unique_names(runs)
    return runs


def _plan(base: TensorStore, runs: list[Run], selected: list[str]) -> list[tuple[str, list[_Job]]]:
    """For each selected base matrix, the snapshots that provide it, in run and step order."""
    jobs_by_name: dict[str, list[_Job]] = {n: [] for n in selected}
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
                    jobs_by_name[n].append(_Job(run, step, snap))
    plan = [(n, jobs) for n, jobs in jobs_by_name.items() if jobs]
    if not plan:
        raise InputError(
            "none of the selected matrices is changed by the tuned checkpoints",
            path=runs[0].path,
            hint="check --modules against the adapter's target_modules",
        )
    return plan


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
    dora_scale_axis: str | None = None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Per-matrix magnitude and direction change of tuned checkpoints against a base.

    Args:
        base: The base model: a checkpoint file or folder, or an open ``TensorStore``.
        tuned: One or more tuned paths (run folders with ``checkpoint-N/``, checkpoint folders,
            adapter folders, weight files) or :class:`~dora_analysis.runs.Run` objects.
        modules: Regex searched in module names (tensor name without ``.weight``). Default:
            the 2-D weights inside numbered, repeated blocks.
        all_modules: Analyse every tensor with 2 or more dimensions (embeddings, heads, convs).
        method: Label for the ``method`` column (default: ``ft`` for full checkpoints, the
            adapter's own method otherwise).
        axis: ``"out"`` (the paper's: one vector per output feature) or ``"in"``.
        steps: Keep only these training steps.
        last: Keep only the last N steps of each run (after ``steps``).
        device: Where to compute (``"cuda"`` moves each matrix to the GPU).
        dora_scale_axis: For kohya/LyCORIS DoRA files whose ``dora_scale`` axis the shape
            cannot tell (square matrices): ``"out"`` (LyCORIS >= 3.2) or ``"in"``.
        progress: Show a progress bar on stderr (default: when stderr is a terminal).

    Returns:
        One row per (run, step, module), with the columns in :data:`LAYER_COLUMNS`.

    Raises:
        InputError: Missing or unreadable checkpoints, no matching matrices, shape
            mismatches, NaN/Inf weights.

    Example:
        >>> df = analyze("base/", ["runs/ft", "runs/dora"], modules=r"attention\\.self\\.query")
        >>> summarize(df)[["run", "kind", "pearson_r"]]
    """
    store = base if isinstance(base, TensorStore) else _open_base(base)
    runs = open_runs(tuned, method=method, steps=steps, last=last, dora_scale_axis=dora_scale_axis)
    shapes = {k: store.shape(k) for k in store.keys()}
    selected = nm.select(shapes, modules, include_all=all_modules)
    if not selected:
        what = f"--modules {modules!r}" if modules else "the default selection (2-D weights inside numbered blocks)"
        raise InputError(f"no tensor matches {what}", path=store.path, hint="list names with `dora-analyze --list BASE`")
    plan = _plan(store, runs, selected)
    model_type = store.config.get("model_type")
    device = torch.device(device)

    records: list[dict[str, object]] = []
    total = sum(len(jobs) for _, jobs in plan)
    # disable=None: tqdm shows the bar only when stderr is a terminal.
    disable = None if progress is None else not progress
    with tqdm(total=total, desc="comparing", unit="matrix", disable=disable, leave=False) as bar:
        for name, jobs in plan:
            w0 = store.get(name).to(device)  # the one read of this base matrix
            fan_in_fan_out = _stored_transposed(name, model_type, jobs)
            for job in jobs:
                w = job.snapshot.weight(name, w0).to(device)
                records.append(_record(job, name, store.path, w0, w, fan_in_fan_out=fan_in_fan_out, axis=axis))
                del w
                bar.update(1)
            del w0

    df = pd.DataFrame.from_records(records)
    kind_of = nm.kinds(df["module"].unique())
    df["kind"] = df["module"].map(kind_of)
    df["layer"] = df["module"].map(nm.layer_index).astype("Int64")
    # Records arrive matrix-major (the streaming order); present them run, step, module.
    run_order = {run.name: i for i, run in enumerate(runs)}
    module_order = {m: i for i, m in enumerate(df["module"].unique())}
    df = df.assign(_r=df["run"].map(run_order), _m=df["module"].map(module_order))
    df = df.sort_values(["_r", "step", "_m"], kind="stable")
    return df[LAYER_COLUMNS].reset_index(drop=True)


def _open_base(path: PathLike) -> TensorStore:
    """The base model's checkpoint; an adapter given as the base is a mistake worth naming."""
    folder = Path(path)
    if (folder / "adapter_config.json").is_file() or folder.name.startswith("adapter_model."):
        raise InputError(
            "BASE is an adapter, not a model",
            path=folder,
            hint="give the base model it was trained on first, then the adapter",
        )
    return open_checkpoint(folder)


def _stored_transposed(name: str, model_type: str | None, jobs: list[_Job]) -> bool:
    """Is base tensor ``name`` stored [in, out]? The base's config says; else the adapters do."""
    if model_type is None:
        # No config.json beside the base: an adapter that targets this matrix settled its
        # layout against the base (PEFT's fan_in_fan_out), which is better than a guess.
        hints = {j.snapshot.stored_transposed(name) for j in jobs} - {None}
        if len(hints) == 1:
            return bool(hints.pop())
    return nm.is_fan_in_fan_out(name, model_type)


def _record(
    job: _Job, name: str, base_path: Path, w0: torch.Tensor, w: torch.Tensor, *, fan_in_fan_out: bool, axis: Axis
) -> dict[str, object]:
    """Compare one tuned matrix with its base; bad shapes and NaN/Inf become InputErrors."""
    if w.shape != w0.shape:
        raise InputError(
            f"shape mismatch: base {tuple(w0.shape)} vs tuned {tuple(w.shape)}",
            path=job.snapshot.path,
            tensor=name,
        )
    try:
        change = compare(w0, w, fan_in_fan_out=fan_in_fan_out, axis=axis)
    except ValueError as exc:
        # compare() says which side held the NaN/Inf; name that side's file.
        path = base_path if str(exc).startswith("base") else job.snapshot.path
        raise InputError(str(exc), path=path, tensor=name) from exc
    return {
        "run": job.run.name,
        "method": job.run.method,
        "step": job.step,
        "module": nm.module_name(nm.strip_wrappers(name)),
        "kind": None,
        "layer": None,
        "rows": change.rows,
        "cols": change.cols,
        "delta_m": change.delta_m,
        "delta_d": change.delta_d,
        "delta_m_signed": change.delta_m_signed,
        "base_norm": change.base_norm,
        "zero_rows": change.zero_rows,
        "axis": axis,
    }


def summarize(df: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Correlation of dM with dD per run and matrix kind, plus a pooled ``all`` row per run.

    Args:
        df: The output of :func:`analyze` (or any frame with ``run``, ``method``, ``kind``,
            ``module``, ``delta_d``, ``delta_m``).
        n_boot: Bootstrap replicates for the interval on r (0 to skip).
        seed: Seed of the bootstrap.

    Returns:
        One row per (run, kind), then (run, ``all``), with :data:`SUMMARY_COLUMNS`:
        ``pearson_r``/``pearson_p``, ``spearman_rho``, ``slope``/``intercept`` (OLS of dM on
        dD), the within-matrix and between-matrix parts of r, and its 95% cluster-bootstrap
        interval (resampling matrices).
    """
    rows: list[dict[str, object]] = []
    for run, part in df.groupby("run", sort=False):
        method = part["method"].iloc[0]
        groups = [(k, p) for k, p in part.groupby("kind", sort=True)]
        groups.append(("all", part))
        for kind, sub in groups:
            corr = correlate(sub["delta_d"], sub["delta_m"], sub["module"], n_boot=n_boot, seed=seed)
            rows.append({"run": run, "method": method, "kind": kind, **corr.as_dict()})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def magnitude_direction(df: pd.DataFrame) -> pd.DataFrame:
    """Do the vectors grow or shrink? The signed magnitude change per run and matrix kind.

    dM is an absolute change, so it cannot tell a fine-tune that lengthens rows from one that
    shortens them; weight decay shortens them, and that drives the sign of the correlation.

    Returns:
        One row per (run, kind): ``n`` points, ``delta_m_signed`` (mean of m_t - m_0),
        ``relative`` (that mean over the base norm), and ``shrink_share``, the share of points
        whose vectors got shorter on average.
    """
    grouped = df.assign(
        relative=df["delta_m_signed"] / df["base_norm"],
        shrinks=(df["delta_m_signed"] < 0).astype(float),
    ).groupby(["run", "method", "kind"], sort=False)
    out = grouped.agg(
        n=("delta_m_signed", "size"),
        delta_m_signed=("delta_m_signed", "mean"),
        relative=("relative", "mean"),
        shrink_share=("shrinks", "mean"),
    )
    return out.reset_index()


def base_path_for(tuned: PathLike) -> Path | None:
    """The local base model an adapter (or a run of adapters) names, if any."""
    from .adapters import base_path_of
    from .runs import checkpoint_dirs

    path = Path(tuned)
    dirs = checkpoint_dirs(path)
    return base_path_of(dirs[0][1] if dirs else path)
