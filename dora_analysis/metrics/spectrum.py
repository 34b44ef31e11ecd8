"""The spectrum of the update dW = W_t - W0 (Hu et al. 2021, LoRA, section 7: how low-rank is it?).

Per matrix: ||dW||_F, its size relative to ||W0||_F, the stable rank, the effective rank (Roy &
Vetterli 2007) and the number of singular values holding 90% of the energy. The math is in
:mod:`dora_analysis.spectral`; a LoRA-family update's spectrum comes from its factors (QR of
B and A^T, an r x r core), a dense one's (full fine-tuning, DoRA) from ``torch.linalg`` in
float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
import torch

from .. import spectral as sp
from .base import Column, MatrixContext

DEFAULT_RANK = 8
# How many of dW's singular values each tuned matrix contributes to spectra.csv: enough to see
# a LoRA update stop at its rank and a full fine-tune's decay past it.
SPECTRUM_POINTS = 64


@dataclass(frozen=True)
class BaseMatrix:
    """What the spectral metrics keep of a base matrix: it in ``[out, in]`` float32, and its norm."""

    weight: torch.Tensor
    fro: float
    fan_in_fan_out: bool


def prepare_base(base: torch.Tensor, ctx: MatrixContext) -> BaseMatrix:
    """The base matrix in the analysed layout (float32), checked finite, with ||W0||_F in float64."""
    w0 = sp.as_matrix(base, fan_in_fan_out=ctx.fan_in_fan_out).to(torch.float32)
    sp.check_finite(w0, "base")
    return BaseMatrix(w0, float(torch.linalg.vector_norm(w0.to(torch.float64))), ctx.fan_in_fan_out)


def tuned_matrix(base: BaseMatrix, tuned: torch.Tensor, change: sp.Change) -> torch.Tensor:
    """A tuned weight in the base's analysed layout, checked finite (once per tuned matrix)."""
    w = sp.as_matrix(tuned, fan_in_fan_out=base.fan_in_fan_out)
    sp.check_tuned(w, change)
    return w


class UpdateMetric:
    """What the metrics on the update dW share: a rank for its top singular vectors when the
    update's own rank is unknown (``--rank``), and the base as it is analysed.

    Args:
        rank: The number of top singular vectors of dW to use for a full fine-tune; an
            adapter's own rank r wins.
    """

    # measure() takes the update's factors when the engine has them (see dora_analysis.engine).
    uses_change: ClassVar[bool] = True

    def __init__(self, rank: int = DEFAULT_RANK) -> None:
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.rank = rank

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> UpdateMetric:
        return cls(rank=int(options.get("rank") or DEFAULT_RANK))

    def prepare(self, base: torch.Tensor, ctx: MatrixContext) -> BaseMatrix:
        return prepare_base(base, ctx)


class UpdateSpectrum(UpdateMetric):
    """The ``spectrum`` metric: how large and how low-rank the update is.

    Args:
        rank: How many of dW's top left singular vectors the subspace similarity between runs
            and steps compares (``pairs.csv``) when the update's own rank is unknown (full
            fine-tuning); an adapter's rank r otherwise.
    """

    name: ClassVar[str] = "spectrum"
    version: ClassVar[int] = 1
    title: ClassVar[str] = "Spectrum of the update (how low-rank is dW?)"
    description: ClassVar[str] = (
        "dW = W_t − W0 is the change fine-tuning made to a matrix. Its stable rank ||dW||²_F / σ₁² and its "
        "effective rank (the exponential of the entropy of its normalised singular values) say over how many "
        "directions the change is spread: 1 when a single direction carries it, up to the matrix's size when "
        "it is spread evenly. rank90 counts the singular values that hold 90% of its energy. A LoRA update "
        "of rank r can never exceed r; full fine-tuning and DoRA (whose magnitude rescales every row) are "
        "not bound to it (Hu et al. 2021, LoRA, section 7). dw_rel is ||dW||_F / ||W0||_F, the size of the "
        "change against the weight it changes."
    )
    columns: ClassVar[tuple[Column, ...]] = (
        Column("dw_fro", "float64", "||W_t - W0||_F, the Frobenius norm of the update", ".3g", "||dW||"),
        Column("dw_rel", "float64", "||W_t - W0||_F / ||W0||_F", ".3g", "||dW|| / ||W0||"),
        Column("dw_stable_rank", "float64", "stable rank of dW: ||dW||_F^2 / sigma_1^2", ".3g", "stable rank"),
        Column(
            "dw_effective_rank",
            "float64",
            "effective rank of dW: exp of the entropy of sigma_i / sum(sigma) (Roy & Vetterli 2007)",
            ".3g",
            "effective rank",
        ),
        Column("dw_rank90", "int64", "singular values of dW holding 90% of its energy sum(sigma^2)", "d", "rank90"),
    )
    summary_columns: ClassVar[tuple[Column, ...]] = ()
    headline: ClassVar[tuple[str, ...]] = ("dw_rel", "dw_stable_rank", "dw_effective_rank")
    summary_inputs: ClassVar[tuple[str, ...]] = ("dw_fro", "dw_stable_rank")

    def measure(self, state: BaseMatrix, tuned: torch.Tensor, change: sp.Change | None = None) -> dict[str, object]:
        change = change or sp.Change()
        w = tuned_matrix(state, tuned, change)
        s = sp.update_svd(state.weight, w, change).S
        spec = sp.spectrum(s)
        return {
            "dw_fro": spec.fro,
            "dw_rel": spec.fro / state.fro if state.fro > 0 else float("nan"),
            "dw_stable_rank": spec.stable_rank,
            "dw_effective_rank": spec.effective_rank,
            "dw_rank90": spec.rank90,
        }

    def singular_values(self, state: BaseMatrix, tuned: torch.Tensor, change: sp.Change | None = None) -> torch.Tensor:
        """dW's top singular values (at most :data:`SPECTRUM_POINTS`), largest first, float64:
        the rows of ``spectra.csv``. Free after :meth:`measure` (the SVD is kept on ``change``)."""
        change = change or sp.Change()
        s = sp.update_svd(state.weight, tuned_matrix(state, tuned, change), change).S
        return s[:SPECTRUM_POINTS].to(torch.float64)

    def directions(self, state: BaseMatrix, tuned: torch.Tensor, change: sp.Change | None = None) -> torch.Tensor:
        """dW's top-r left singular vectors ``[out, r]`` (r: the adapter's rank, else ``rank``),
        for the subspace similarity between runs and steps."""
        change = change or sp.Change()
        full = sp.update_svd(state.weight, tuned_matrix(state, tuned, change), change)
        r = change.rank or self.rank
        return full.U[:, : min(r, full.U.shape[1])]

    def summarize(self, part: pd.DataFrame, *, n_boot: int, seed: int) -> dict[str, object]:
        return {}
