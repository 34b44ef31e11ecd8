"""Summaries of the analyzer's table: pandas only, no tensors.

:func:`summarize` gives one row per run and matrix kind (plus a pooled ``all`` row per run),
its columns collected from the metrics that made the table (each metric's ``summarize``
hook); :func:`magnitude_direction` says whether the vectors grew or shrank;
:func:`permutation_summary` adds a test of r that stays exact with few matrices (opt-in, so
that the default summary's columns do not change).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from . import names as nm
from .metrics import Metric, build_metrics, metrics_of, summary_columns

# The default summary's columns (the ``md`` metric's), derived from the metric's column specs.
SUMMARY_COLUMNS: list[str] = [c.name for c in summary_columns(build_metrics())]


def summarize(df: pd.DataFrame, *, metrics: Sequence[Metric] | None = None, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per run and matrix kind, plus a pooled ``all`` row per run: each metric's summary.

    For the ``md`` metric that is the correlation of dM with dD: ``pearson_r`` /
    ``pearson_p``, ``spearman_rho``, ``slope`` / ``intercept`` (OLS of dM on dD), the
    within-matrix and between-matrix parts of r, and its 95% cluster-bootstrap interval
    (resampling matrices).

    Args:
        df: The output of :func:`~dora_analysis.analyze` (or any frame with ``run``,
            ``method``, ``kind``, ``module`` and a metric's columns).
        metrics: Whose summaries to compute; default: every registered metric whose columns
            are all in ``df``.
        n_boot: Bootstrap replicates for intervals (0 to skip).
        seed: Seed of the bootstrap.

    Returns:
        One row per (run, kind), then (run, ``all``), with the columns of
        :func:`dora_analysis.metrics.summary_columns` (for ``md``: :data:`SUMMARY_COLUMNS`).
    """
    metrics = metrics_of(df.columns) if metrics is None else list(metrics)
    metrics = [m for m in metrics if m.summary_columns]
    rows: list[dict[str, object]] = []
    for run, part in df.groupby("run", sort=False):
        method = part["method"].iloc[0]
        for kind, sub in _kinds_then_all(part):
            row: dict[str, object] = {"run": run, "method": method, "kind": kind}
            for metric in metrics:
                row.update(metric.summarize(sub, n_boot=n_boot, seed=seed))
            rows.append(row)
    return pd.DataFrame(rows, columns=[c.name for c in summary_columns(metrics)])


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
    return in_block_order(out.reset_index())


def permutation_summary(df: pd.DataFrame, *, n_perm: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """The pooled r of dM against dD per run and matrix kind (and ``all``), with a
    permutation test over matrices (:func:`dora_analysis.stats.permutation_r`).

    Opt-in, beside :func:`summarize` (whose columns, and ``summary.csv``, it leaves as they
    are): the cluster bootstrap there resamples only as many matrices as there are (6 for
    figure 2), so its interval is coarse and can sit off-centre from r; the permutation test
    enumerates every pairing of the matrices' dD and dM trajectories, exact for few matrices.

    Args:
        df: The analyzer's frame with ``delta_d`` and ``delta_m``, each matrix's rows at the
            same checkpoints.
        n_perm: Random pairings when there are more than
            :data:`~dora_analysis.stats.EXACT_GROUPS` matrices (else all are enumerated).
        seed: Seed of those random pairings.

    Returns:
        One row per (run, kind), then (run, ``all``): ``run``, ``method``, ``kind``,
        ``n_matrices``, ``pearson_r`` and ``r_perm_p`` (two-sided).

    Example:
        >>> permutation_summary(analyze(base, runs)).query("kind == 'all'")
    """
    from .stats import pearson, permutation_r

    rows: list[dict[str, object]] = []
    for run, part in df.groupby("run", sort=False):
        for kind, sub in _kinds_then_all(part):
            sub = sub.sort_values("step", kind="stable")  # each matrix's points in checkpoint order
            rows.append({
                "run": run, "method": part["method"].iloc[0], "kind": kind, "n_matrices": sub["module"].nunique(),
                "pearson_r": pearson(sub["delta_d"], sub["delta_m"])[0],
                "r_perm_p": permutation_r(sub["delta_d"], sub["delta_m"], sub["module"], n_perm=n_perm, seed=seed),
            })  # fmt: skip
    return pd.DataFrame(rows, columns=["run", "method", "kind", "n_matrices", "pearson_r", "r_perm_p"])


def in_block_order(frame: pd.DataFrame) -> pd.DataFrame:
    """A per-(run, kind) frame with each run's kinds in the order a block applies them
    (:func:`dora_analysis.names.kind_order`); runs keep their order."""
    kinds = {kind: i for i, kind in enumerate(nm.kind_order(frame["kind"].astype(str)))}
    runs = {run: i for i, run in enumerate(frame["run"].drop_duplicates())}
    keyed = frame.assign(_r=frame["run"].map(runs), _k=frame["kind"].astype(str).map(kinds))
    return keyed.sort_values(["_r", "_k"], kind="stable").drop(columns=["_r", "_k"]).reset_index(drop=True)


def _kinds_then_all(part: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """A run's rows per matrix kind, in the order a block applies them, then all of them pooled."""
    by_kind = {str(kind): rows for kind, rows in part.groupby(part["kind"].astype(str), sort=False)}
    return [(kind, by_kind[kind]) for kind in nm.kind_order(by_kind)] + [("all", part)]
