"""The merge math every adapter format shares: W' = W0 + s·B·A, and DoRA's renormalisation.

Pure functions on tensors, no files. One update is described in the *layer frame*, the layout
of ``nn.Linear`` and ``nn.Conv2d`` weights: ``[out, in, *kernel]``. A stored weight that is laid
out ``[in, out]`` instead (GPT-2 ``Conv1D``, PEFT's ``fan_in_fan_out``, embedding tables) is
flagged ``transposed`` by the caller, and the delta is transposed to match it, as PEFT does
(``transpose(weight_B @ weight_A, self.fan_in_fan_out) * self.scaling[adapter]``,
``peft/tuners/lora/layer.py``, ``Linear.get_delta_weight``).

DoRA (Liu et al. 2024, eq. 5) rescales the updated weight V = W0 + s·B·A to a learnt norm m
per feature: W' = m · V / ||V||. The norm runs over every dimension but one *feature axis*:
the output features for PEFT, the official DoRA code and LyCORIS >= 3.2.0, the input features
for LyCORIS before 3.2.0.

Everything is computed in float32 whatever the stored dtypes (bf16 / fp16 weights and
adapters are upcast), and returned in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from ..decompose import Axis


def low_rank_product(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """B·A as an ``[out, in * prod(kernel)]`` float32 matrix.

    Args:
        down: A, shape ``[r, in, *kernel]`` (``lora_A``, ``lora_down``).
        up: B, shape ``[out, r, *ones]`` (``lora_B``, ``lora_up``).

    For a k x k convolution PEFT composes the two convolutions,
    ``conv2d(weight_A.transpose(0, 1), weight_B).transpose(0, 1)``
    (``peft/tuners/lora/layer.py``, ``_ConvNd.get_delta_weight``); since B is 1 x 1 that is
    exactly ``B.view(out, r) @ A.view(r, -1)``, which is also what PEFT's DoRA uses for
    convolutions (``torch.mm(lora_B.view([-1, r]), lora_A.view([r, -1]))``, ``dora.py``).
    """
    rank, fan_in = down.shape[0], math.prod(down.shape[1:])
    # Explicit sizes, not -1: a magnitude-only update has rank 0 and an empty A.
    return up.float().reshape(up.shape[0], rank) @ down.float().reshape(rank, fan_in)


def to_storage(delta: torch.Tensor, shape: torch.Size, *, transposed: bool) -> torch.Tensor:
    """Lay an ``[out, in * prod(kernel)]`` delta out like a stored weight of ``shape``."""
    return delta.T if transposed else delta.reshape(shape)


def storage_axis(feature_axis: Axis, *, transposed: bool) -> int:
    """Which dimension of the stored weight indexes the ``out`` or ``in`` features."""
    frame_axis = 0 if feature_axis == "out" else 1
    return 1 - frame_axis if transposed else frame_axis


def renormalise(weight: torch.Tensor, magnitude: torch.Tensor, *, axis: int, eps: float = 0.0) -> torch.Tensor:
    """DoRA's W' = m · V / ||V||, the norm taken over every dimension but ``axis``.

    Args:
        weight: V = W0 + s·B·A, float32, in storage layout.
        magnitude: m, one value per index of ``axis`` (any shape with that many elements:
            PEFT stores ``[out]`` or ``[1, out, 1, 1]``, the official code ``[out, 1]``,
            LyCORIS ``[out, 1]`` or ``[1, in]``).
        axis: The dimension of ``weight`` that m runs along.
        eps: Added to the norm before dividing. LyCORIS adds ``torch.finfo(dtype).eps``;
            PEFT and the official code add nothing.

    Returns:
        W', float32. A vector whose norm is zero stays zero: PEFT would compute 0 / 0 = NaN
        there (m / ||V|| is inf and V is 0), and zero is both the limit and what the
        analysis can use (it counts such vectors in ``zero_rows``).
    """
    dims = tuple(d for d in range(weight.ndim) if d != axis)
    norm = torch.linalg.vector_norm(weight, dim=dims, keepdim=True) + eps
    scale = magnitude.float().reshape(norm.shape) / norm
    return weight * torch.where(norm > 0, scale, torch.zeros_like(scale))


class Update(Protocol):
    """What an adapter does to one layer: the merged weight (and bias) from the base's.

    Implementations: :class:`LowRankUpdate` (LoRA, DoRA, VeRA: W0 + s·B·A, optionally
    renormalised) and :class:`DenseUpdate` (a stored full difference, W0 + ΔW).
    """

    def apply(self, weight: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
        """The merged weight W', float32, laid out like ``weight`` (``[in, out]`` if ``transposed``)."""

    def apply_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """The merged bias, float32."""


@dataclass(frozen=True)
class DenseUpdate:
    """A full weight difference, ΔW stored outright: W' = W0 + ΔW, b' = b0 + Δb.

    LyCORIS ``full`` modules save ``diff`` (the layer frame, ``[out, in, *kernel]``) and
    ``diff_b``; their merge is ``weight + diff`` (``FullModule.get_merged_weight``).

    Attributes:
        diff: ΔW in the layer frame.
        bias: Δb, or None.
    """

    diff: torch.Tensor
    bias: torch.Tensor | None = None

    def apply(self, weight: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
        w0 = weight.float()
        diff = self.diff.to(w0.device).float()
        return w0 + to_storage(diff.reshape(diff.shape[0], -1), w0.shape, transposed=transposed)

    def apply_bias(self, bias: torch.Tensor) -> torch.Tensor:
        b0 = bias.float()
        return b0 if self.bias is None else b0 + self.bias.to(b0.device).float()


@dataclass(frozen=True)
class LowRankUpdate:
    """One layer's change: ΔW = scale · B·A, then optionally DoRA's magnitude.

    Attributes:
        down: A, ``[r, in, *kernel]`` (``lora_A``, ``lora_down``; ``r`` may be 0 for a
            magnitude-only update).
        up: B, ``[out, r, *ones]``.
        scale: s, e.g. ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).
        magnitude: DoRA's m, one value per feature along ``magnitude_axis``; None for LoRA.
        magnitude_axis: ``"out"`` (PEFT, official DoRA, LyCORIS >= 3.2.0) or ``"in"``.
        norm_eps: Added to DoRA's norm (LyCORIS: float32 eps; PEFT: 0).
        bias: ``lora_B``'s own bias ``[out]`` (PEFT ``lora_bias=True``), or None.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None
    magnitude_axis: Axis = "out"
    norm_eps: float = 0.0
    bias: torch.Tensor | None = None

    def apply(self, weight: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
        """The merged weight W', float32, laid out like ``weight``.

        Args:
            weight: W0 as stored: ``[out, in, *kernel]``, or ``[in, out]`` if ``transposed``.
            transposed: The stored weight is ``[in, out]`` (``fan_in_fan_out``, embeddings).
        """
        w0 = weight.float()
        # The factors come from the (CPU) adapter file; compute where the base weight is.
        product = low_rank_product(self.down.to(w0.device), self.up.to(w0.device))
        delta = to_storage(product, w0.shape, transposed=transposed)
        # PEFT: `base_layer.weight.data += delta_weight` with delta = (B @ A) * scaling.
        merged = w0 + delta * self.scale
        if self.magnitude is None:
            return merged
        axis = storage_axis(self.magnitude_axis, transposed=transposed)
        return renormalise(merged, self.magnitude.to(w0.device), axis=axis, eps=self.norm_eps)

    def apply_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """The merged bias, float32.

        PEFT: ``base_layer.bias.data += self.lora_B[active_adapter].bias * self.scaling[...]``
        (``Linear.merge``); DoRA does not rescale the bias.
        """
        b0 = bias.float()
        return b0 if self.bias is None else b0 + self.bias.to(b0.device).float() * self.scale
