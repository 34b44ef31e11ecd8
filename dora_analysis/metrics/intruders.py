"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

An intruder dimension is one of the top-k left singular vectors of the tuned matrix W_t whose
largest |cos| with every left singular vector of the base W0 is below epsilon: a new,
high-ranking direction the pretrained weight did not have. The convention is PEFT's detector
(``peft.tuners.lora.intruders.reduce_intruder_dimension``: ``top_k=10``,
``threshold_epsilon=0.5``, ``(U_merged.T @ U_base).abs().max(dim=1)`` on the thin SVDs), so
the two agree on a PEFT LoRA adapter. The base's SVD is computed once per matrix
(:meth:`IntruderDimensions.prepare`); for a LoRA-family update the tuned matrix's top vectors
come from it and the factors (:func:`dora_analysis.spectral.top_left_lowrank`), never from a
second full SVD.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
import torch

from .. import spectral as sp
from .base import Column, MatrixContext

DEFAULT_K = 10
DEFAULT_EPSILON = 0.5


@dataclass(frozen=True)
class BaseSpectrum:
    """The base matrix's thin SVD in the analysed layout, and its layout."""

    svd: sp.SVD
    fan_in_fan_out: bool


class IntruderDimensions:
    """The ``intruders`` metric: new top singular directions, nearly orthogonal to the base's.

    Args:
        k: How many top singular vectors of W_t to examine (PEFT's ``top_k``).
        epsilon: A vector whose largest |cos| with the base's left singular vectors is below
            this is an intruder (PEFT's ``threshold_epsilon``).
    """

    name: ClassVar[str] = "intruders"
    version: ClassVar[int] = 1
    title: ClassVar[str] = "Intruder dimensions"
    description: ClassVar[str] = (
        "Shuttleworth et al. (2024) find that LoRA, unlike full fine-tuning, adds *intruder dimensions*: "
        "among the top singular vectors of the tuned matrix, directions nearly orthogonal to every singular "
        "vector of the pretrained one. For each of the top k left singular vectors of W_t this takes its "
        "largest |cos| with any left singular vector of W0; `intruders` counts those below ε, and "
        "`intruder_min_sim` is the smallest of the k similarities (1: every top direction was already in W0; "
        "near 0: at least one is new). The convention and defaults (k = 10, ε = 0.5) are PEFT's "
        "`reduce_intruder_dimension`. Note that a wide or square W0 has left singular vectors spanning "
        "every direction, so a similarity below 1/√out cannot occur there."
    )
    columns: ClassVar[tuple[Column, ...]] = (
        Column("intruders", "int64", "top-k singular vectors of W_t whose largest |cos| with W0's is below epsilon", "d"),
        Column(
            "intruder_min_sim",
            "float64",
            "smallest, over W_t's top-k left singular vectors, of the largest |cos| with W0's",
            ".3f",
            "min similarity",
        ),
        Column("intruder_k", "int64", "k: how many top singular vectors of W_t were examined", "d", "k"),
    )
    summary_columns: ClassVar[tuple[Column, ...]] = (
        Column("intruders_mean", "float64", "mean intruder count per matrix and checkpoint", ".3g", "mean intruders"),
        Column("intruder_share", "float64", "share of matrices and checkpoints with at least one intruder", ".0%", "with intruders"),
    )
    headline: ClassVar[tuple[str, ...]] = ("intruders", "intruder_min_sim")
    summary_inputs: ClassVar[tuple[str, ...]] = ("intruders", "intruder_min_sim")
    uses_change: ClassVar[bool] = True

    def __init__(self, k: int = DEFAULT_K, epsilon: float = DEFAULT_EPSILON) -> None:
        if k < 1:
            raise ValueError(f"intruder k must be at least 1, got {k}")
        if not 0 < epsilon <= 1:
            raise ValueError(f"intruder epsilon must be in (0, 1], got {epsilon}")
        self.k, self.epsilon = k, epsilon

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> IntruderDimensions:
        k, eps = options.get("intruder_k"), options.get("intruder_eps")
        return cls(k=DEFAULT_K if k is None else int(k), epsilon=DEFAULT_EPSILON if eps is None else float(eps))

    def prepare(self, base: torch.Tensor, ctx: MatrixContext) -> BaseSpectrum:
        w0 = sp.as_matrix(base, fan_in_fan_out=ctx.fan_in_fan_out)
        sp.check_finite(w0, "base")
        # The one full SVD of the base matrix; kept between runs when the engine has a cache.
        factors = ctx.remember(sp.BASE_SVD_LABEL, lambda: sp.svd_tensors(sp.decompose_base(w0)))
        # Held in float64, the precision every comparison with it runs in: converted once per
        # base matrix here, not once per tuned version.
        svd = sp.svd_from_tensors(factors)
        return BaseSpectrum(sp.SVD(*(t.to(torch.float64) for t in (svd.U, svd.S, svd.V))), ctx.fan_in_fan_out)

    def measure(self, state: BaseSpectrum, tuned: torch.Tensor, change: sp.Change | None = None) -> dict[str, object]:
        change = change or sp.Change()
        update = change.update
        w = sp.as_matrix(tuned, fan_in_fan_out=state.fan_in_fan_out)
        sp.check_tuned(w, change)
        k = min(self.k, min(w.shape))
        if update is not None:
            similarity = sp.lowrank_max_similarity(state.svd, update, k)
        else:
            similarity = sp.max_similarity(sp.top_left_dense(w, k), state.svd.U)
        return {"intruders": sp.intruder_count(similarity, self.epsilon), "intruder_min_sim": float(similarity.min()), "intruder_k": k}

    def summarize(self, part: pd.DataFrame, *, n_boot: int, seed: int) -> dict[str, object]:
        counts = part["intruders"].astype("float64")
        return {"intruders_mean": float(counts.mean()), "intruder_share": float((counts > 0).mean())}
