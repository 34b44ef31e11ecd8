"""Magnitude and direction, the DoRA paper's decomposition (Liu et al., ICML 2024, section 3.2).

Per matrix: dM, the mean absolute change of the vector norms, and dD, the mean of 1 - cos
between each vector and its base vector (eqs. 3-4; the math is in :mod:`dora_analysis.decompose`).
Per run and matrix kind: how dM and dD correlate (figure 2), with the statistics of
:mod:`dora_analysis.stats`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pandas as pd
import torch

from ..decompose import AXES, Axis, compare
from ..stats import correlate, strength
from .base import Column, MatrixContext


class MagnitudeDirection:
    """The ``md`` metric: dM, dD and the numbers needed to read them.

    Args:
        axis: ``"out"`` (the paper's: one vector per output feature) or ``"in"``.
    """

    name: ClassVar[str] = "md"
    version: ClassVar[int] = 1
    title: ClassVar[str] = "Magnitude and direction (dM vs dD correlation)"
    description: ClassVar[str] = (
        "ΔM is the mean absolute change of the vector norms (magnitudes) from the base weights, ΔD the mean of "
        "1 − cos between each vector and its base vector (direction), per matrix and checkpoint "
        "(Liu et al., ICML 2024, section 3.2). The paper's figure 2 plots ΔM against ΔD: full fine-tuning (FT) "
        "and DoRA show a negative slope (large changes of magnitude come with small changes of direction, "
        "or the reverse), LoRA a positive one (the two move together)."
    )
    columns: ClassVar[tuple[Column, ...]] = (
        Column("rows", "int64", "number of vectors k (output features with --axis out)", "d"),
        Column("cols", "int64", "length of each vector", "d"),
        Column("delta_m", "float64", "dM: mean absolute change of the vector norms (paper eq. 3)", ".3g", "dM"),
        Column("delta_d", "float64", "dD: mean of 1 - cos between tuned and base vectors (paper eq. 4)", ".3g", "dD"),
        Column(
            "delta_m_signed", "float64", "mean of m_t - m_0: positive when vectors grow, negative when they shrink", "+.3g", "signed dM"
        ),
        Column("base_norm", "float64", "mean base vector norm m_0, the scale dM is measured against", ".3g", "base norm"),
        Column("zero_rows", "int64", "vectors left out of dD because their norm is zero on either side", "d", "zero vectors"),
        Column("axis", "str", "which vectors were normalised: out (the paper's) or in", ""),
    )
    summary_columns: ClassVar[tuple[Column, ...]] = (
        Column("n", "int64", "points (matrices x checkpoints) in the correlation", "d"),
        Column("pearson_r", "float64", "Pearson r of dM against dD", "+.3f", "Pearson r"),
        Column("pearson_p", "float64", "two-sided p-value of r", ".2g", "p"),
        Column("spearman_rho", "float64", "Spearman's rank correlation", "+.3f", "Spearman ρ"),
        Column("slope", "float64", "OLS slope of dM on dD", ".3g"),
        Column("intercept", "float64", "OLS intercept of dM on dD", ".3g"),
        Column("r_within", "float64", "r of the points centred on their matrix: each matrix across checkpoints", "+.2f", "r within"),
        Column("r_between", "float64", "r of the per-matrix means: differences between matrices", "+.2f", "r between"),
        Column("r_ci_low", "float64", "95% cluster-bootstrap interval of r, low end (resampling matrices)", "+.2f", "95% CI low"),
        Column("r_ci_high", "float64", "95% cluster-bootstrap interval of r, high end", "+.2f", "95% CI high"),
    )
    headline: ClassVar[tuple[str, ...]] = ("delta_d", "delta_m")
    # What the summary reads: enough to summarise a frame built by hand from dD and dM.
    summary_inputs: ClassVar[tuple[str, ...]] = ("delta_d", "delta_m")

    def __init__(self, axis: Axis = "out") -> None:
        if axis not in AXES:
            raise ValueError(f"axis must be 'out' or 'in', got {axis!r}")
        self.axis: Axis = axis

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> MagnitudeDirection:
        return cls(axis=options.get("axis") or "out")

    def prepare(self, base: torch.Tensor, ctx: MatrixContext) -> tuple[torch.Tensor, MatrixContext]:
        # Nothing to precompute: compare() reads both sides in one blocked pass.
        return base, ctx

    def measure(self, state: tuple[torch.Tensor, MatrixContext], tuned: torch.Tensor) -> dict[str, object]:
        base, ctx = state
        change = compare(base, tuned, fan_in_fan_out=ctx.fan_in_fan_out, axis=self.axis, block_elements=ctx.block_elements)
        return {
            "rows": change.rows,
            "cols": change.cols,
            "delta_m": change.delta_m,
            "delta_d": change.delta_d,
            "delta_m_signed": change.delta_m_signed,
            "base_norm": change.base_norm,
            "zero_rows": change.zero_rows,
            "axis": self.axis,
        }

    def reading(self, row: Mapping[str, object]) -> str:
        """A summary row in words: the strength and sign of its Pearson r."""
        return strength(float(row["pearson_r"]))  # type: ignore[arg-type]

    def summarize(self, part: pd.DataFrame, *, n_boot: int, seed: int) -> dict[str, object]:
        return correlate(part["delta_d"], part["delta_m"], part["module"], n_boot=n_boot, seed=seed).as_dict()
