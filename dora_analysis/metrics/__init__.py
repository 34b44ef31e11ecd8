"""Metrics as plug-ins: every way of measuring a fine-tune's change is one entry in :data:`METRICS`.

A metric is a class with the :class:`Metric` shape (see :mod:`.base`); registering it makes it
available to ``analyze(..., metrics=[...])``, ``dora-analyze --metrics NAME``, the tables and
the report, with no other edit. The first metric is the DoRA paper's magnitude / direction
split, ``md`` (:mod:`.md`), the default.

Example, a metric of one column::

    class FrobeniusDistance:
        name, version = "fro", 1
        title, description = "Distance", "||W_t - W0||_F."
        columns = (Column("fro", "float64", "Frobenius norm of W_t - W0"),)
        summary_columns, headline = (), ("fro",)
        def prepare(self, base, ctx): return base.double()
        def measure(self, base, tuned): return {"fro": float((tuned.double() - base).norm())}

    METRICS.register(FrobeniusDistance)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..registry import Registry
from .amplification import Amplification
from .base import GROUP_COLUMNS, ID_COLUMNS, Column, MatrixContext, Metric
from .intruders import IntruderDimensions
from .md import MagnitudeDirection
from .spectrum import UpdateSpectrum

METRICS: Registry[type] = Registry("metric")
METRICS.register(MagnitudeDirection)
METRICS.register(UpdateSpectrum)
METRICS.register(IntruderDimensions)
METRICS.register(Amplification)

DEFAULT_METRICS: tuple[str, ...] = ("md",)

__all__ = [
    "DEFAULT_METRICS",
    "GROUP_COLUMNS",
    "ID_COLUMNS",
    "METRICS",
    "Column",
    "MatrixContext",
    "Metric",
    "build_metrics",
    "layer_columns",
    "metrics_of",
    "summary_columns",
]  # fmt: skip


def build_metrics(selection: Iterable[str | Metric] | None = None, options: Mapping[str, Any] | None = None) -> list[Metric]:
    """Metric instances for names (or ready instances), configured from ``options``.

    Args:
        selection: Metric names (``"md"``) or instances; default :data:`DEFAULT_METRICS`.
        options: Settings a metric may read in its ``from_options`` (``axis`` ...).

    Raises:
        ValueError: An unknown name, a metric chosen twice, or two metrics that define the
            same column.
    """
    chosen: list[Metric] = []
    for item in DEFAULT_METRICS if selection is None else selection:
        if isinstance(item, str):
            if item not in METRICS:
                raise ValueError(f"unknown metric {item!r}; known: {', '.join(METRICS.names())}")
            cls = METRICS[item]
            from_options = getattr(cls, "from_options", None)
            item = from_options(options or {}) if from_options is not None else cls()
        chosen.append(item)  # type: ignore[arg-type]
    names = [m.name for m in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"a metric is chosen twice: {', '.join(names)}")
    seen: dict[str, str] = {c.name: "the row's identity" for c in ID_COLUMNS}
    for metric in chosen:
        for column in (*metric.columns, *metric.summary_columns):
            owner = seen.setdefault(column.name, metric.name)
            if owner != metric.name:
                raise ValueError(f"metric {metric.name!r} defines column {column.name!r}, which {owner} defines already")
    if not chosen:
        raise ValueError("no metric chosen")
    return chosen


def layer_columns(metrics: Sequence[Metric]) -> list[Column]:
    """The per-matrix table's columns: identity, then each metric's, in order."""
    return [*ID_COLUMNS, *(c for m in metrics for c in m.columns)]


def summary_columns(metrics: Sequence[Metric]) -> list[Column]:
    """The summary table's columns: run, method, kind, then each metric's summary columns."""
    return [*GROUP_COLUMNS, *(c for m in metrics for c in m.summary_columns)]


def metrics_of(columns: Iterable[str]) -> list[Metric]:
    """The registered metrics a table (its ``columns``) holds, in the order of their columns.

    A metric counts as present when the columns its summary reads (``summary_inputs``, by
    default all its columns) are there: how a frame written earlier, read back from
    ``layers.csv`` or built by hand tells which metrics to summarise and show.
    """
    order = list(columns)
    present = set(order)
    found: list[Metric] = []
    for cls in METRICS:
        needed = getattr(cls, "summary_inputs", None) or [c.name for c in cls.columns]
        if needed and all(name in present for name in needed):
            from_options = getattr(cls, "from_options", None)
            found.append(from_options({}) if from_options is not None else cls())
    needed_first = [getattr(m, "summary_inputs", None) or [m.columns[0].name] for m in found]
    return [m for _, m in sorted(zip(needed_first, found), key=lambda t: order.index(t[0][0]))]
