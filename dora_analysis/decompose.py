"""The weight-decomposition math of the DoRA paper (Liu et al., ICML 2024, section 3.2).

Pure functions on tensors: no files, no pandas. A weight matrix is read as a stack of
vectors, W = m * V / ||V||, with m the vector of their norms (the *magnitude*) and V / ||V|| the
unit vectors (the *direction*). Between a base weight W0 and a tuned weight W_t (paper eqs. 3-4):

    dM_t = (1/k) * sum_n | m_t[n] - m_0[n] |
    dD_t = (1/k) * sum_n ( 1 - cos(W_t[n], W_0[n]) )

Axis convention. The paper writes W as [in, out] and normalises each of its *columns*, i.e.
one vector per **output feature**. A torch ``nn.Linear.weight`` is stored [out, in], so those
vectors are its **rows**: ``torch.linalg.norm(W, dim=1)``. This is what the first author
confirmed, what the official DoRA code and PEFT compute, and the default here
(``axis="out"``). ``axis="in"`` takes one vector per input feature (the columns of an
[out, in] weight), as some public re-implementations do, to compare the two readings.

Layouts that are not [out, in] are brought to it first:
  * GPT-2 ``Conv1D`` (and any ``fan_in_fan_out`` layer) stores [in, out]: transposed.
  * Conv weights [out, in, *kernel] are flattened to [out, in * prod(kernel)], the layout in
    which PEFT takes DoRA's magnitude (one norm per output channel).
  * Embeddings [num_embeddings, dim] are ``fan_in_fan_out`` in PEFT (magnitude length = dim),
    so the caller passes ``fan_in_fan_out=True`` for them.

Numerics. A full fine-tune's dD is ~1e-2, only a few times bf16's machine epsilon, so every
reduction here runs in float64 whatever the stored dtype, in row blocks to bound memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

# Which vectors a matrix is read as: one per output feature ("out", the paper's) or per input
# feature ("in"). The one axis type of the package: the analysis, DoRA magnitudes, kohya scales.
Axis = Literal["out", "in"]
AXES: tuple[Axis, ...] = get_args(Axis)

# Default elements per float64 block, when the caller does not choose (the code that runs a
# plan does, see ``dora_analysis.engine``). On the CPU, 512 KB: small enough to stay in a
# core's L2, so the float64 work costs about what a plain float32 upcast of the matrix costs.
# On a GPU, few large blocks (launches cost more than memory there), still bounded: 512 MB.
DEFAULT_BLOCK_ELEMENTS = {"cpu": 1 << 16, "cuda": 1 << 26}
# At least this many rows per block, so wide matrices do not spend their time in the Python loop.
_MIN_BLOCK_ROWS = 8


def as_vectors(weight: torch.Tensor, *, fan_in_fan_out: bool = False, axis: Axis = "out") -> torch.Tensor:
    """Return ``weight`` as a 2-D view whose rows are the vectors the analysis normalises.

    Args:
        weight: A weight of shape ``[out, in]``, ``[in, out]`` (with ``fan_in_fan_out``) or
            ``[out, in, *kernel]`` (conv).
        fan_in_fan_out: The weight is stored ``[in, out]`` (GPT-2 ``Conv1D``, embeddings).
        axis: ``"out"`` (default, the paper's): one vector per output feature.
            ``"in"``: one vector per input feature.

    Returns:
        A 2-D tensor ``[k, d]`` (a view where possible): ``k`` vectors of length ``d``.
    """
    stored, vectors_are_rows = _stored_2d(weight, fan_in_fan_out=fan_in_fan_out, axis=axis)
    return stored if vectors_are_rows else stored.T


def _stored_2d(weight: torch.Tensor, *, fan_in_fan_out: bool, axis: Axis) -> tuple[torch.Tensor, bool]:
    """The weight as a 2-D view in storage order, and whether the vectors are its rows.

    Keeping storage order (instead of a transposed view) lets the reductions read memory
    contiguously: summing down the columns of a [32000, 2048] embedding through its transpose
    was measured 13x slower than summing its rows.
    """
    if weight.ndim < 2:
        raise ValueError(f"expected a weight with at least 2 dimensions, got shape {tuple(weight.shape)}")
    if axis not in AXES:
        raise ValueError(f"axis must be 'out' or 'in', got {axis!r}")
    if fan_in_fan_out and weight.ndim != 2:
        raise ValueError(f"fan_in_fan_out applies to 2-D weights, got shape {tuple(weight.shape)}")
    stored = weight.flatten(1) if weight.ndim > 2 else weight
    # Output features are the rows of [out, in] and the columns of [in, out] (fan_in_fan_out).
    return stored, (axis == "out") != fan_in_fan_out


@dataclass(frozen=True)
class MatrixChange:
    """How one weight moved from its base, in the paper's terms.

    Attributes:
        rows: Number of vectors k (output features with ``axis="out"``).
        cols: Length of each vector.
        delta_m: dM, mean absolute change of the vector norms (paper eq. 3).
        delta_d: dD, mean of 1 - cos over vectors whose norm is non-zero on both sides
            (paper eq. 4); NaN only if every vector has zero norm.
        delta_m_signed: mean of m_t - m_0: positive when vectors grow, negative when they shrink.
        base_norm: mean of m_0, the scale that dM is measured against.
        zero_rows: vectors left out of dD because their norm is zero in W0 or W_t.
    """

    rows: int
    cols: int
    delta_m: float
    delta_d: float
    delta_m_signed: float
    base_norm: float
    zero_rows: int


def default_block_elements(device: torch.device) -> int:
    """The block budget :func:`compare` uses on ``device`` when the caller names none."""
    return DEFAULT_BLOCK_ELEMENTS.get(device.type, DEFAULT_BLOCK_ELEMENTS["cuda"])


def _block_rows(weight: torch.Tensor, budget: int) -> int:
    """Rows per block: two float64 rows of the pair buffer per row, within ``budget`` elements."""
    k, d = weight.shape
    return min(k, max(_MIN_BLOCK_ROWS, budget // max(2 * d, 1)))


def _sums(base: torch.Tensor, tuned: torch.Tensor, *, rows: bool, budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """|w0|^2, |w|^2 and w0.w of every vector, in float64: the rows or the columns of ``base``."""
    return _row_sums(base, tuned, budget) if rows else _column_sums(base, tuned, budget)


def _column_sums(base: torch.Tensor, tuned: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`_row_sums` for the columns, reading the rows in order and accumulating."""
    k, d = base.shape
    block = _block_rows(base, budget)
    sums = torch.zeros(3, d, dtype=torch.float64, device=base.device)
    pair = torch.empty(2, block, d, dtype=torch.float64, device=base.device)
    for start in range(0, k, block):
        n = min(block, k - start)
        a, b = pair[0, :n], pair[1, :n]
        a.copy_(base[start : start + n])
        b.copy_(tuned[start : start + n])
        sums[0] += (a * a).sum(0)
        sums[1] += (b * b).sum(0)
        sums[2] += (a * b).sum(0)
    return sums[0], sums[1], sums[2]


def _row_sums(base: torch.Tensor, tuned: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared norms of both sides and their row dot products, in float64, block by block.

    Each block's rows are stacked pairwise, ``S[i] = [base[i]; tuned[i]]`` (2 x d, float64),
    and one batched matmul gives every row's 2 x 2 Gram matrix ``S[i] S[i]^T``:
    ``[[|b|^2, b.t], [b.t, |t|^2]]``. One pass over the data instead of six.
    """
    k, d = base.shape
    block = _block_rows(base, budget)
    gram = torch.empty(k, 2, 2, dtype=torch.float64, device=base.device)
    pair = torch.empty(block, 2, d, dtype=torch.float64, device=base.device)
    for start in range(0, k, block):
        n = min(block, k - start)
        # copy_ upcasts while it copies: each side is read once, whatever its dtype.
        pair[:n, 0].copy_(base[start : start + n])
        pair[:n, 1].copy_(tuned[start : start + n])
        torch.bmm(pair[:n], pair[:n].transpose(1, 2), out=gram[start : start + n])
    return gram[:, 0, 0], gram[:, 1, 1], gram[:, 0, 1]


def compare(
    base: torch.Tensor,
    tuned: torch.Tensor,
    *,
    fan_in_fan_out: bool = False,
    axis: Axis = "out",
    block_elements: int | None = None,
) -> MatrixChange:
    """dM, dD and friends between a base weight and a tuned weight of the same shape.

    Args:
        base: W0, any float dtype, any device.
        tuned: W_t, same shape as ``base`` (dtype may differ).
        fan_in_fan_out: Both are stored ``[in, out]``.
        axis: Which vectors to normalise, see :func:`as_vectors`.
        block_elements: float64 elements per block of the reduction (memory, and cache use);
            default: :func:`default_block_elements` of the device. The result does not
            depend on it beyond float64 rounding.

    Returns:
        A :class:`MatrixChange`.

    Raises:
        ValueError: Shapes differ, or either side holds NaN or Inf.

    Example:
        >>> w0 = torch.randn(4, 3)
        >>> compare(w0, 2 * w0).delta_d  # scaling changes magnitude only
        0.0
    """
    if base.shape != tuned.shape:
        raise ValueError(f"shape mismatch: base {tuple(base.shape)} vs tuned {tuple(tuned.shape)}")
    a, rows = _stored_2d(base, fan_in_fan_out=fan_in_fan_out, axis=axis)
    b, _ = _stored_2d(tuned, fan_in_fan_out=fan_in_fan_out, axis=axis)
    budget = default_block_elements(a.device) if block_elements is None else block_elements
    return _change(a, b, rows=rows, budget=budget)


def _change(a: torch.Tensor, b: torch.Tensor, *, rows: bool, budget: int) -> MatrixChange:
    """:func:`compare` on two 2-D weights in storage order, vectors along ``rows`` or columns."""
    base_sq, tuned_sq, dot = _sums(a, b, rows=rows, budget=budget)
    # NaN/Inf anywhere in a row propagates into its sums: one cheap check instead of a pass
    # over the whole matrix.
    for side, sums in (("base", base_sq), ("tuned", tuned_sq)):
        if not bool(torch.isfinite(sums).all()):
            raise ValueError(f"{side} weight contains NaN or Inf")
    m0, m = base_sq.sqrt(), tuned_sq.sqrt()
    diff = m - m0
    nonzero = (m0 > 0) & (m > 0)
    n_valid = int(nonzero.sum())
    if n_valid:
        # |a| |b| as sqrt(|a|^2 |b|^2): for an unchanged vector (b = a, so dot = |a|^2) this is
        # exactly |a|^2, since sqrt(x * x) == x in IEEE arithmetic, and 1 - cos is exactly 0
        # rather than a rounding residue of ~1e-16. Where the product leaves float64's range,
        # the product of the norms.
        norms = torch.sqrt(base_sq[nonzero] * tuned_sq[nonzero])
        in_range = torch.isfinite(norms) & (norms > 0)
        norms = torch.where(in_range, norms, m0[nonzero] * m[nonzero])
        cos = dot[nonzero] / norms
        delta_d = float((1.0 - cos.clamp(-1.0, 1.0)).mean())
    else:
        delta_d = math.nan
    k, d = a.shape if rows else a.shape[::-1]
    return MatrixChange(
        rows=k,
        cols=d,
        delta_m=float(diff.abs().mean()),
        delta_d=delta_d,
        delta_m_signed=float(diff.mean()),
        base_norm=float(m0.mean()),
        zero_rows=k - n_valid,
    )


def magnitude(weight: torch.Tensor, *, fan_in_fan_out: bool = False, axis: Axis = "out") -> torch.Tensor:
    """m = ||W||_c, the float64 norm of each vector (one per output feature by default)."""
    w = as_vectors(weight, fan_in_fan_out=fan_in_fan_out, axis=axis)
    return torch.linalg.vector_norm(w.to(torch.float64), dim=1)


def delta_magnitude(base: torch.Tensor, tuned: torch.Tensor, **kwargs: object) -> float:
    """dM between ``base`` and ``tuned`` (paper eq. 3); keyword args as :func:`compare`."""
    return compare(base, tuned, **kwargs).delta_m  # type: ignore[arg-type]


def delta_direction(base: torch.Tensor, tuned: torch.Tensor, **kwargs: object) -> float:
    """dD between ``base`` and ``tuned`` (paper eq. 4); keyword args as :func:`compare`."""
    return compare(base, tuned, **kwargs).delta_d  # type: ignore[arg-type]
