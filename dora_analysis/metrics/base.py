"""What a metric is: the columns it adds, and two steps, ``prepare`` once per base matrix and
``measure`` once per tuned matrix.

The analyzer's table is one row per (run, step, matrix): the identifying columns below, then
each selected metric's columns. Everything that shows a column (the DataFrame, ``layers.csv``,
the command-line tables, the report) reads its name, type, description and display format
from the metric's :class:`Column`, so a column is defined once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import pandas as pd
import torch

Dtype = Literal["float64", "int64", "str"]


@dataclass(frozen=True)
class Column:
    """One column a metric adds to the per-matrix table or to the summary.

    Attributes:
        name: The column's name in the DataFrame and the CSV files.
        dtype: ``"float64"``, ``"int64"`` or ``"str"``.
        description: One line for a reader: what the number is.
        fmt: Display format for tables (``".3g"``, ``"+.2f"``; ``""`` for strings).
        label: Header in human-facing tables (default: the name).
    """

    name: str
    dtype: Dtype
    description: str
    fmt: str = ".3g"
    label: str = ""

    @property
    def header(self) -> str:
        return self.label or self.name

    def display(self, value: object) -> str:
        """``value`` formatted for a table; ``n/a`` for missing or non-finite numbers."""
        if self.dtype == "str":
            return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return "n/a"
        if number != number or number in (float("inf"), float("-inf")):
            return "n/a"
        return format(int(number) if self.dtype == "int64" else number, self.fmt or "")


# The columns every row starts with, whatever the metrics: which run, step and matrix.
ID_COLUMNS: tuple[Column, ...] = (
    Column("run", "str", "the run's label (its folder name unless given)", ""),
    Column("method", "str", "ft, lora, dora, vera ...: how the run was trained", ""),
    Column("step", "int64", "training step of the checkpoint", "d"),
    Column("module", "str", "the matrix's module path, without wrapper prefixes", ""),
    Column("layer", "int64", "index of the numbered block the matrix sits in (empty outside blocks)", "d"),
    Column("kind", "str", "the matrix's role in its block (query, q_proj, down_proj ...)", ""),
)
# The columns a summary row starts with: one row per run and matrix kind (plus kind "all").
GROUP_COLUMNS: tuple[Column, ...] = (ID_COLUMNS[0], ID_COLUMNS[1], ID_COLUMNS[5])

Tensors = dict[str, torch.Tensor]
# ``memo(label, compute)``: ``compute()``'s tensors, or those stored under ``label`` for this
# base matrix by an earlier run (:class:`dora_analysis.cache.BaseCache`).
Memo = Callable[[str, Callable[[], Tensors]], Tensors]


@dataclass(frozen=True)
class MatrixContext:
    """What a metric knows about the base matrix it prepares for.

    Attributes:
        name: The base tensor's name.
        fan_in_fan_out: The weight is stored ``[in, out]`` (GPT-2 ``Conv1D``, embeddings).
        block_elements: float64 elements per block for blocked reductions: an execution
            choice made by the code that runs the plan, passed down so the math stays pure.
        memo: Where per-base-matrix results may be kept between runs (the engine's on-disk
            cache of this base matrix), or None; metrics use it through :meth:`remember`.
    """

    name: str
    fan_in_fan_out: bool = False
    block_elements: int | None = None
    memo: Memo | None = None

    def remember(self, label: str, compute: Callable[[], Tensors]) -> Tensors:
        """``compute()``, or what an earlier run stored under ``label`` for this base matrix.

        ``label`` names what is computed and how (bump it when the numbers change); the
        matrix's identity (base file, tensor, layout, device type) is the memo's business.
        The metric stays pure: it never sees a file.
        """
        return compute() if self.memo is None else self.memo(label, compute)


@runtime_checkable
class Metric(Protocol):
    """A way of measuring what fine-tuning did to one weight matrix.

    Attributes:
        name: Short name, as ``--metrics`` takes it (``md``).
        version: Bumped whenever the numbers a metric computes change, so stored results
            computed by an older version are never mixed with new ones.
        title: Heading of the metric's report section.
        description: Plain-language paragraph for that section: what the columns mean and how
            to read them.
        columns: What :meth:`measure` returns, in order.
        summary_columns: What :meth:`summarize` returns (may be empty).
        headline: The columns the command-line table shows per layer.

    Optional: ``summary_inputs`` (the columns :meth:`summarize` reads, when fewer than all),
    ``from_options(options)`` (a constructor from ``analyze``'s settings), and
    ``reading(summary_row) -> str`` (a summary row in words).
    """

    name: ClassVar[str]
    version: ClassVar[int]
    title: ClassVar[str]
    description: ClassVar[str]
    columns: ClassVar[tuple[Column, ...]]
    summary_columns: ClassVar[tuple[Column, ...]]
    headline: ClassVar[tuple[str, ...]]

    def prepare(self, base: torch.Tensor, ctx: MatrixContext) -> Any:
        """Per-base-matrix work, done once however many steps and runs use this matrix."""

    def measure(self, state: Any, tuned: torch.Tensor) -> Mapping[str, object]:
        """The metric's columns for one tuned matrix (same shape and layout as the base)."""

    def summarize(self, part: pd.DataFrame, *, n_boot: int, seed: int) -> Mapping[str, object]:
        """The summary columns for one group of rows (a run and kind, or a run pooled)."""
