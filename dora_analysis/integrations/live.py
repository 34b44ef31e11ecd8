"""The decomposition of a model while it trains: the same plan, engine and metrics as ``analyze``.

Framework-free: a training loop hands :class:`LiveDecomposition` a :class:`Snapshot` of its
live weights (built from tensors in memory, exactly as its checkpoint writer would save them)
and gets the rows ``dora-analyze`` would compute from that checkpoint. The Hugging Face
``Trainer`` callback (:mod:`.hf`) and the built-in trainer (:mod:`dora_analysis.train`) both
use it, so ``decomposition.csv`` equals ``layers.csv`` of ``dora-analyze BASE RUN``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .. import names as nm
from ..analysis import analyze
from ..containers import MemoryStore, TensorStore
from ..metrics import Metric, build_metrics
from ..runs import Run
from ..snapshot import Snapshot
from ..stats import pearson

DECOMPOSITION_CSV = "decomposition.csv"
DECOMPOSITION_PNG = "decomposition.png"
# Prefix of the scalars sent to the trainer's loggers (TensorBoard groups tags by it).
SCALAR_PREFIX = "decomposition"


def base_copy(tensors: Mapping[str, torch.Tensor], modules: str | None, path: Path, config: Mapping[str, Any] | None) -> MemoryStore:
    """The selected matrices of a model's weights as they are now, copied to the CPU in their dtype."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    selected = nm.select(shapes, modules)
    return MemoryStore({k: tensors[k].detach().to("cpu", copy=True) for k in selected}, path, config)


class LiveDecomposition:
    """The rows of ``decomposition.csv`` for one training run, measured snapshot by snapshot.

    Args:
        base: The base weights (a checkpoint on disk, or a :class:`MemoryStore` copy).
        out: The run folder: ``decomposition.csv`` (and the figure) are written there.
        run: The ``run`` label (``dora-analyze`` uses the run folder's name).
        modules: Regex of matrices to analyse (default: ``analyze``'s selection).
        metrics: Metric names (default ``md``).
        metric_options: Metric settings (``{"axis": "out"}``).
    """

    def __init__(
        self,
        base: TensorStore,
        out: Path,
        *,
        run: str | None = None,
        modules: str | None = None,
        metrics: Sequence[str] = ("md",),
        metric_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.base = base
        self.out = Path(out)
        self.run = run or self.out.name
        self.modules = modules
        self.metric_names = list(metrics)
        self.metric_options = dict(metric_options or {})
        self.metrics: list[Metric] = build_metrics(self.metric_names, {"axis": "out", **self.metric_options})
        self.rows = pd.DataFrame()

    @property
    def csv(self) -> Path:
        return self.out / DECOMPOSITION_CSV

    def resume(self, step: int) -> None:
        """Keep the rows of an earlier session up to ``step`` (a run continued from a checkpoint)."""
        if self.csv.is_file():
            rows = pd.read_csv(self.csv)
            self.rows = rows[rows["step"] <= step].reset_index(drop=True)

    def measure(self, step: int, snapshot: Snapshot) -> pd.DataFrame:
        """Measure one snapshot, add its rows (replacing any of the same step), rewrite the CSV.

        Returns:
            This step's rows (``layers.csv``'s columns).
        """
        run = Run(name=self.run, path=self.out, steps=[(step, snapshot)], method=snapshot.method)
        options = {k: v for k, v in self.metric_options.items() if k != "axis"}
        axis = self.metric_options.get("axis", "out")
        rows = analyze(self.base, run, modules=self.modules, metrics=self.metric_names, metric_options=options, axis=axis, progress=False)
        kept = self.rows[self.rows["step"] != step] if len(self.rows) else self.rows
        self.rows = pd.concat([kept, rows], ignore_index=True) if len(kept) else rows
        self.rows = self.rows.sort_values("step", kind="stable").reset_index(drop=True)
        self._write_csv()
        return rows

    def _write_csv(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{DECOMPOSITION_CSV}.", suffix=".tmp", dir=self.out)
        try:
            with os.fdopen(fd, "w", newline="") as fh:
                self.rows.to_csv(fh, index=False)
            os.replace(tmp, self.csv)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def scalars(self, rows: pd.DataFrame) -> dict[str, float]:
        """Summary numbers of one step's rows, per matrix kind and pooled (``all``).

        For each metric, the mean of its headline columns (``md``: mean dD and mean dM), and
        with two headline columns their Pearson r across the matrices (the paper's figure 2
        at this step; left out when undefined, under 3 matrices or constant).
        """
        out: dict[str, float] = {}
        groups = [("all", rows), *((str(k), part) for k, part in rows.groupby("kind", sort=False))]
        for kind, part in groups:
            for metric in self.metrics:
                columns = [c for c in metric.headline if c in part.columns]
                for column in columns:
                    value = float(part[column].mean())
                    if math.isfinite(value):
                        out[f"{SCALAR_PREFIX}/{kind}/mean_{column}"] = value
                if len(columns) == 2:
                    r, _ = pearson(part[columns[0]], part[columns[1]])
                    if math.isfinite(r):
                        out[f"{SCALAR_PREFIX}/{kind}/pearson_r"] = r
        return out

    def write_figure(self) -> Path | None:
        """The paper's figure 2 from every row so far (one panel per matrix kind), as a PNG."""
        if not len(self.rows) or not {"delta_d", "delta_m"} <= set(self.rows.columns):
            return None
        from matplotlib.figure import Figure  # no pyplot: never touches the user's backend

        from ..plots import plot_md

        kinds = list(dict.fromkeys(self.rows["kind"]))
        fig = Figure(figsize=(4.2 * len(kinds), 4.0), layout="constrained")
        for ax, kind in zip(fig.subplots(1, len(kinds), squeeze=False)[0], kinds, strict=True):
            try:
                plot_md(self.rows, kind=kind, ax=ax)
            except ValueError:  # e.g. no finite point for this kind yet
                ax.set_axis_off()
        path = self.out / DECOMPOSITION_PNG
        fd, tmp = tempfile.mkstemp(prefix=f".{DECOMPOSITION_PNG}.", suffix=".png", dir=self.out)
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=110)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
