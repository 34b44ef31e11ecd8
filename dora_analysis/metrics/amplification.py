"""How much the update amplifies directions the pretrained weight hardly uses (Hu et al. 2021,
LoRA, section 7 and table 7).

With U, V the top-r left and right singular vectors of dW = W_t - W0, ||U^T W0 V||_F is the
part of W0 inside the update's subspace, and the amplification factor is
||dW||_F / ||U^T W0 V||_F (about 21.5 for r = 4 on GPT-3's W_q in the paper). r is the
adapter's rank, else ``rank`` (default 8).
"""

from __future__ import annotations

from typing import ClassVar

import pandas as pd
import torch

from .. import spectral as sp
from .base import Column
from .spectrum import BaseMatrix, UpdateMetric, tuned_matrix


class Amplification(UpdateMetric):
    """The ``amplification`` metric: ||dW||_F over the base's projection on dW's top-r subspace.

    Args:
        rank: r when the update's own rank is unknown (full fine-tuning).
    """

    name: ClassVar[str] = "amplification"
    version: ClassVar[int] = 1
    title: ClassVar[str] = "Amplification of the pretrained weight's directions"
    description: ClassVar[str] = (
        "Hu et al. (2021, LoRA, section 7) ask whether the update dW amplifies directions the pretrained "
        "weight W0 already emphasises, or ones it hardly uses. With U, V the top-r singular vectors of dW, "
        "proj_norm = ||Uᵀ W0 V||_F is how much of W0 lies in the update's subspace, and amplification = "
        "||dW||_F / proj_norm. A large factor means the update strengthens directions W0 barely expresses "
        "(the paper: about 21.5 for r = 4 on GPT-3's W_q); a small one that it re-weights directions W0 "
        "already uses. r is the adapter's rank, else --rank."
    )
    columns: ClassVar[tuple[Column, ...]] = (
        Column("amp_rank", "int64", "r: the update's top singular vectors used (the adapter's rank, else --rank)", "d", "r"),
        Column("proj_norm", "float64", "||U^T W0 V||_F with U, V the top-r singular vectors of dW", ".3g", "||U'W0V||"),
        Column("amplification", "float64", "||dW||_F / ||U^T W0 V||_F (LoRA paper, section 7)", ".3g"),
    )
    summary_columns: ClassVar[tuple[Column, ...]] = ()
    headline: ClassVar[tuple[str, ...]] = ("amplification",)
    summary_inputs: ClassVar[tuple[str, ...]] = ("proj_norm", "amplification")

    def measure(self, state: BaseMatrix, tuned: torch.Tensor, change: sp.Change | None = None) -> dict[str, object]:
        change = change or sp.Change()
        full = sp.update_svd(state.weight, tuned_matrix(state, tuned, change), change)
        r = min(change.rank or self.rank, full.S.shape[0])
        top = sp.SVD(full.U[:, :r], full.S[:r], full.V[:, :r])
        dw_fro = float(torch.sqrt((full.S.to(torch.float64) ** 2).sum()))
        proj = sp.projection_norm(state.weight, top)
        return {"amp_rank": r, "proj_norm": proj, "amplification": sp.amplification(dw_fro, proj)}

    def summarize(self, part: pd.DataFrame, *, n_boot: int, seed: int) -> dict[str, object]:
        return {}
