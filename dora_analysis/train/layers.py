"""The project's own LoRA and DoRA layers, so that training needs no peft.

Shapes follow torch. A base weight ``W0`` is ``[out, in]`` (an ``nn.Linear``; a GPT-2
``Conv1D`` stores ``[in, out]`` and is transposed on the fly), ``A`` is ``[r, in]``, ``B`` is
``[out, r]`` and the adapter scale is ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA):

* LoRA: ``W' = W0 + s B A``.
* DoRA (Liu et al. 2024, eq. 5): ``W' = m * (W0 + s B A) / ||W0 + s B A||_row``, one norm per
  output feature (row), the norm treated as a constant in backprop (section 4.3).

Parameter names (``lora_A.weight``, ``lora_B.weight``, ``magnitude``) map one to one onto PEFT's
(``lora_A.weight``, ``lora_B.weight``, ``lora_magnitude_vector``); see ``checkpoint.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..peft_format import lora_scale

# Floor for the row norm: a zero row of W0 (real MoE checkpoints have them) would otherwise
# give 0 / 0 = NaN; with the floor it stays 0, as W0 has it.
_NORM_FLOOR = 1e-12


def is_adaptable(module: nn.Module) -> bool:
    """True for the layers LoRA / DoRA can wrap here: ``nn.Linear`` and GPT-2 ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: ``y = base(x) + s B A x``.

    Args:
        base: The ``nn.Linear`` (or ``Conv1D``) to adapt; its parameters are frozen.
        rank: r, the rank of the update.
        alpha: The scale numerator; s = alpha / r (alpha / sqrt(r) with ``rslora``).
        rslora: Use rank-stabilised scaling (Kalajdzievski 2023).
        dropout: Dropout probability on the adapter's input (the base path never drops).

    Shapes:
        ``x``: ``(..., in)`` -> ``(..., out)``.
    """

    def __init__(self, base: nn.Module, *, rank: int, alpha: float, rslora: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if not is_adaptable(base):
            raise TypeError(f"LoRA wraps nn.Linear or Conv1D, got {type(base).__name__}")
        self.base_layer = base
        self.base_layer.requires_grad_(False)
        self.fan_in_fan_out = isinstance(base, Conv1D)  # Conv1D stores its weight [in, out]
        out_features, in_features = self.base_weight().shape
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, out_features, bias=False, **factory)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank = rank
        self.scaling = lora_scale(alpha, rank, rslora=rslora)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A as ``nn.Linear``'s default init (kaiming-uniform, a = sqrt(5)), B = 0.

        The same as PEFT and the original LoRA code: with B = 0 the adapted layer starts
        exactly equal to the base layer.
        """
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def base_weight(self) -> torch.Tensor:
        """W0 as ``[out, in]`` (a view of the frozen base weight)."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update ``s B A``, ``[out, in]``."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def _to_base_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """An ``[out, in]`` matrix in the base layer's own storage layout."""
        return weight.T.contiguous() if self.fan_in_fan_out else weight

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The effective weight ``W0 + s B A``, in the base layer's layout (``[in, out]`` for Conv1D)."""
        return self._to_base_layout(self.base_weight() + self.delta_weight())

    def adapter_update(self, x: torch.Tensor) -> torch.Tensor:
        """``B A dropout(x)`` (unscaled), ``(..., in)`` -> ``(..., out)``."""
        return self.lora_B(self.lora_A(self.lora_dropout(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scaling * self.adapter_update(x)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, fan_in_fan_out={self.fan_in_fan_out}"


class DoRALinear(LoRALinear):
    """Weight-decomposed LoRA: ``W' = m * (W0 + s B A) / ||W0 + s B A||_row``.

    The row norm is computed without building the ``[out, in]`` matrix ``W0 + s B A``
    (:meth:`weight_norm`) and, as the paper's section 4.3 suggests, treated as a constant in
    backprop. The forward computes ``x W0^T`` once and reuses it:
    ``y = (m / norm) * (x W0^T + s B A x) + bias``.

    With dropout, only the adapter's input is dropped: ``(m / norm) * (x W0^T + s B A drop(x))``.
    (PEFT also feeds the dropped input to its ``(m / norm - 1) x W0^T`` correction term, so the
    two differ in training mode when dropout > 0; they agree otherwise.)

    Args:
        base, rank, alpha, rslora, dropout: As :class:`LoRALinear`.
        magnitude_only: Train the magnitude m alone, A and B frozen with B = 0 (paper table 6):
            the layer then rescales W0's rows without turning them.

    Attributes:
        magnitude: m, ``[out]``, trainable; initialised to ``||W0||_row`` by
            :meth:`initialize_magnitude` so that the layer starts equal to the base.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int,
        alpha: float,
        rslora: bool = False,
        dropout: float = 0.0,
        magnitude_only: bool = False,
    ) -> None:
        super().__init__(base, rank=rank, alpha=alpha, rslora=rslora, dropout=dropout)
        out_features = self.base_weight().shape[0]
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        # ||W0||^2 per row: W0 is frozen, so it is computed once. Not saved (persistent=False):
        # it is a function of the base weights.
        self.register_buffer("base_sq_norm", torch.empty(out_features, **factory), persistent=False)
        self.magnitude = nn.Parameter(torch.empty(out_features, **factory))
        self.magnitude_only = magnitude_only
        if magnitude_only:
            self.lora_A.requires_grad_(False)
            self.lora_B.requires_grad_(False)
        self.initialize_magnitude()

    @torch.no_grad()
    def initialize_magnitude(self) -> None:
        """Cache ``||W0||^2_row`` and set ``m = ||W0||_row``.

        Called on construction; call it again if the base weight is replaced afterwards.
        """
        w0 = self.base_weight()
        self.base_sq_norm.copy_((w0 * w0).sum(dim=1))
        self.magnitude.copy_(self.base_sq_norm.sqrt())

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``||W0 + s B A||_row``, ``[out]``, outside the autograd graph (section 4.3).

        Expands the square instead of building the ``[out, in]`` matrix (O(out * in * r)):

            ||W0 + s BA||^2 = ||W0||^2 + 2 s <W0, BA> + s^2 ||BA||^2            (per row)
            <W0, BA>_row    = rowsum(B * (W0 A^T))
            ||BA||^2_row    = rowsum((B A A^T) * B)

        ``||W0||^2`` is cached. The paper: "we suggest treating ||V + dV||_c in Eq. (5) as a
        constant, thereby detaching it from the gradient graph".
        """
        a, b, s = self.lora_A.weight, self.lora_B.weight, self.scaling
        # Both terms share the factor B: rowsum(B * (2s W0 A^T + s^2 B A A^T)), in few kernels.
        inner = torch.addmm(b @ (a @ a.T), self.base_weight(), a.T, beta=s * s, alpha=2.0 * s)
        squared = self.base_sq_norm + torch.linalg.vecdot(b, inner)
        # Rounding can push a (near-)zero row slightly negative: clamp before the root.
        return squared.clamp_min(_NORM_FLOOR**2).sqrt()

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The effective weight ``m * (W0 + s B A) / ||W0 + s B A||_row``, in the base layer's layout."""
        direction = self.base_weight() + self.delta_weight()
        scale = self.magnitude / self.weight_norm()
        return self._to_base_layout(scale[:, None] * direction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.base_weight())  # x W0^T, computed once and shared by both terms
        scale = self.magnitude / self.weight_norm()  # m / ||W0 + sBA||: the only path to m's gradient
        combined = torch.add(base, self.adapter_update(x), alpha=self.scaling)  # (W0 + sBA) x
        bias = self.base_layer.bias
        # Fused: bias + scale * combined. Each op here costs a kernel launch per layer per step,
        # which is what DoRA adds to LoRA's time on small models.
        return scale * combined if bias is None else torch.addcmul(bias, scale, combined)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", magnitude_only={self.magnitude_only}"
