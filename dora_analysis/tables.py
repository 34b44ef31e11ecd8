"""Plain-text tables of the analyzer's results, built from the metrics' column specs.

What the command-line tools print. Every header and number format comes from the
:class:`~dora_analysis.metrics.Column` that defines the column, so a new metric's columns show
up here with no edit.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from .metrics import GROUP_COLUMNS, METRICS, Metric, build_metrics, metrics_of


def format_summary(summary: pd.DataFrame, metrics: Sequence[Metric] | None = None) -> str:
    """One table per metric with a summary: its columns per run and kind, and a reading in words."""
    if metrics is None:
        present = set(summary.columns)
        metrics = [m for m in build_metrics(METRICS.names()) if any(c.name in present for c in m.summary_columns)]
    blocks = []
    for metric in metrics:
        columns = [c for c in metric.summary_columns if c.name in summary.columns]
        if not columns:
            continue
        shown = pd.DataFrame({c.name: summary[c.name] for c in GROUP_COLUMNS})
        for column in columns:
            shown[column.header] = summary[column.name].map(column.display)
        reading = getattr(metric, "reading", None)
        if reading is not None:
            shown["reading"] = [reading(row) for row in summary.to_dict("records")]
        blocks.append(f"{metric.title}, per run and matrix kind\n" + shown.to_string(index=False))
    return "\n\n".join(blocks)


def format_layers(layers: pd.DataFrame, metrics: Sequence[Metric] | None = None, *, max_rows: int = 60) -> str:
    """Each metric's headline columns per layer at each run's last step, one column per matrix kind."""
    metrics = metrics_of(layers.columns) if metrics is None else metrics
    last = layers[layers["step"] == layers.groupby("run")["step"].transform("max")]
    blocks = []
    for metric in metrics:
        by_name = {c.name: c for c in metric.columns}
        columns = [by_name[name] for name in metric.headline if name in layers.columns]
        if not columns:
            continue
        cells = [" / ".join(c.display(v) for c, v in zip(columns, values)) for values in zip(*(last[c.name] for c in columns))]
        table = last.assign(v=cells).pivot_table(index=["run", "step", "layer"], columns="kind", values="v", aggfunc="first", dropna=False)
        lines = table.dropna(how="all").to_string(na_rep="").splitlines()
        if len(lines) > max_rows:
            lines = lines[:max_rows] + [f"... ({len(lines) - max_rows} more lines in layers.csv)"]
        title = " / ".join(c.header for c in columns)
        blocks.append(f"{title} per layer at each run's last step\n" + "\n".join(lines))
    return "\n\n".join(blocks)
