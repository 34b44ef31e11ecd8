"""Spectral views of a fine-tuning update: how low-rank it is, what it adds, how runs agree.

Pure functions on tensors (torch, numpy, scipy): no files, no pandas. Every matrix here is in
the *analysed layout* ``[out, in]`` (the layer frame: a ``fan_in_fan_out`` weight transposed,
a convolution flattened to ``[out, in * prod(kernel)]``); the caller brings it there.

* Spectrum of dW = W_t - W0: Frobenius norm, stable rank ||dW||_F^2 / sigma_1^2, effective
  rank exp(-sum p_i log p_i) with p_i = sigma_i / sum(sigma) (Roy & Vetterli 2007), and the
  number of singular values that hold 90% of the energy sum(sigma^2).
* Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
  Equivalence"): among the top-k left singular vectors of W_t, those whose largest |cos| with
  every left singular vector of W0 is below epsilon. PEFT's detector
  (``peft/tuners/lora/intruders.py``) computes ``(U_merged.T @ U_base).abs().max(dim=1)`` on
  the thin SVDs of both weights and counts the first ``top_k`` below ``threshold_epsilon``.
* Amplification (Hu et al. 2021, LoRA, section 7): with U, V the top-r singular vectors of
  dW, ||U^T W0 V||_F (how much of W0 lies in dW's subspace) and ||dW||_F / ||U^T W0 V||_F.
* Subspace similarity (LoRA, section 7, figures 3-4): phi(i, j) =
  ||U_a[:, :i]^T U_b[:, :j]||_F^2 / min(i, j), in [0, 1].

Efficiency. A LoRA-family update dW = s·B·A has rank r: its SVD comes from QR factors of B and
A^T and the SVD of an r x r core, O((out + in) r^2), never from the out x in matrix
(:func:`low_rank_svd`). The top singular vectors of W_t = W0 + s·B·A come from the base's
SVD, computed once per matrix (:func:`decompose_base`): in the bases [U0, Q] and [V0, P]
(Q, P completing U0, V0 to span B and A^T), W_t is ``diag(S0) + L R^T``, a diagonal plus a
rank-r matrix whose products cost O((out + in) r), so ARPACK finds its top-k singular
vectors exactly (to its convergence tolerance, here machine precision) at a tiny cost
(:func:`top_left_lowrank`).

Numerics. Full decompositions of out x in matrices run in float32 (the base, a dense W_t, as
PEFT's detector does) or float64 (a dense dW, the difference of two nearby weights);
everything smaller (QR factors, cores, norms, sums, entropies) in float64.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Below this many columns of the core, a dense SVD is cheaper and simpler than ARPACK.
_DENSE_CORE_MAX = 512


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


def as_matrix(weight: torch.Tensor, *, fan_in_fan_out: bool = False) -> torch.Tensor:
    """``weight`` in the analysed ``[out, in]`` layout (a view where possible).

    Args:
        weight: ``[out, in]``, ``[in, out]`` with ``fan_in_fan_out``, or ``[out, in, *kernel]``.
        fan_in_fan_out: The weight is stored ``[in, out]`` (GPT-2 ``Conv1D``, embeddings).
    """
    if weight.ndim < 2:
        raise ValueError(f"a weight matrix needs 2 or more dimensions, got shape {tuple(weight.shape)}")
    if fan_in_fan_out:
        return weight.T
    return weight.reshape(weight.shape[0], -1)


def check_finite(matrix: torch.Tensor, side: str) -> None:
    """Raise ``ValueError("<side> ...")`` if ``matrix`` holds NaN or Inf (the engine names the file).

    A NaN or an infinity anywhere makes the sum non-finite, so a finite float64 sum proves the
    matrix finite in one read without a boolean copy of it; only a sum that overflowed (values
    near float64's limit) needs the element-wise check.
    """
    if bool(torch.isfinite(matrix.sum(dtype=torch.float64))):
        return
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"{side} weight holds NaN or Inf")


# --------------------------------------------------------------------------------------------
# Low-rank updates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LowRank:
    """An update dW = scale · up @ down of rank at most r, in the analysed layout.

    Attributes:
        up: B, ``[out, r]``.
        down: A, ``[r, in]``.
        scale: s (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).
    """

    up: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.up.shape[0]), int(self.down.shape[1])

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """dW as a dense ``[out, in]`` matrix (tests and small cases only)."""
        return self.scale * (self.up.to(dtype) @ self.down.to(dtype))


@dataclass(frozen=True)
class SVD:
    """A thin singular value decomposition ``M = U diag(S) V^T``, values in descending order.

    Attributes:
        U: ``[out, k]`` left singular vectors (columns).
        S: ``[k]`` singular values.
        V: ``[in, k]`` right singular vectors (columns).
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


def low_rank_svd(update: LowRank) -> SVD:
    """The SVD of dW = s·B·A from QR factors, never forming the out x in matrix.

    B = Q_B R_B and A^T = Q_A R_A, so dW = Q_B (s R_B R_A^T) Q_A^T; the SVD of the r x r core
    s R_B R_A^T = U_c S V_c^T gives U = Q_B U_c and V = Q_A V_c. Cost O((out + in) r^2), in
    float64.

    Returns:
        An :class:`SVD` with r columns (values may be 0 when B·A has rank below r).
    """
    up, down = update.up.to(torch.float64), update.down.to(torch.float64)
    if update.rank == 0:
        out, inp = update.shape
        return SVD(up.new_zeros(out, 0), up.new_zeros(0), up.new_zeros(inp, 0))
    q_b, r_b = torch.linalg.qr(up)
    q_a, r_a = torch.linalg.qr(down.T)
    u_c, s, v_ct = torch.linalg.svd(update.scale * (r_b @ r_a.T))
    # A negative scale flips signs only; the SVD of the core absorbs it.
    return SVD(q_b @ u_c, s, q_a @ v_ct.T)


def dense_svd(matrix: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> SVD:
    """Thin SVD of a dense matrix with ``torch.linalg.svd`` in ``dtype``, on its device."""
    u, s, vh = torch.linalg.svd(matrix.to(dtype), full_matrices=False)
    return SVD(u, s, vh.T)


# --------------------------------------------------------------------------------------------
# The spectrum of an update
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spectrum:
    """Summary numbers of one update's singular values (see :func:`spectrum`)."""

    fro: float
    stable_rank: float
    effective_rank: float
    rank90: int


def stable_rank(s: torch.Tensor) -> float:
    """||M||_F^2 / sigma_1^2 from the singular values ``s``; NaN for a zero matrix."""
    s = s.to(torch.float64)
    top = float(s.max()) if s.numel() else 0.0
    return float((s**2).sum()) / top**2 if top > 0 else math.nan


def effective_rank(s: torch.Tensor) -> float:
    """exp(H(p)), p_i = sigma_i / sum(sigma), 0 log 0 = 0 (Roy & Vetterli 2007); NaN for zero."""
    s = s.to(torch.float64)
    total = float(s.sum())
    if total <= 0:
        return math.nan
    p = s[s > 0] / total
    return math.exp(float(-(p * torch.log(p)).sum()))


def energy_rank(s: torch.Tensor, share: float = 0.9) -> int:
    """The fewest singular values whose squares hold ``share`` of sum(sigma^2); 0 for zero."""
    energy = torch.sort(s.to(torch.float64) ** 2, descending=True).values
    total = float(energy.sum())
    if total <= 0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # The tolerance keeps a rank-1 matrix at 1 whatever the rounding of its tiny other values.
    return int(torch.searchsorted(cumulative, torch.tensor(share - 1e-12, dtype=torch.float64)).item()) + 1


def spectrum(s: torch.Tensor) -> Spectrum:
    """Frobenius norm, stable rank, effective rank and 90%-energy rank from singular values."""
    s = s.to(torch.float64)
    return Spectrum(float(torch.sqrt((s**2).sum())), stable_rank(s), effective_rank(s), energy_rank(s, 0.9))


@dataclass
class Change:
    """What the engine knows about one tuned matrix's update, beyond the dense weight.

    Attributes:
        update: dW as low-rank factors, when the tuned matrix is exactly W0 + s·B·A (LoRA,
            VeRA, LoHa-free plain low-rank formats); None for a dense change (full
            fine-tuning, DoRA's renormalised update, a stored difference).
        rank: The adapter's rank r (also DoRA's, whose dW is not of rank r); None for full
            fine-tuning.
        memo: Results shared by the metrics measuring this one tuned matrix, so dW's
            decomposition is computed once however many metrics read it.
    """

    update: LowRank | None = None
    rank: int | None = None
    memo: dict[str, object] = field(default_factory=dict)


def check_tuned(tuned: torch.Tensor, change: Change) -> None:
    """Raise ``ValueError("tuned ...")`` if the tuned side holds NaN or Inf, once per ``change``.

    For W_t = W0 + s·B·A the spectral numbers come from W0 (checked when the base is
    prepared) and the factors, never from the dense W_t, so the factors are what is checked:
    r x (out + in) values instead of out x in, once however many metrics read them.
    """
    if change.memo.get("tuned_finite"):
        return
    update = change.update
    if update is None:
        check_finite(tuned, "tuned")
    elif not (math.isfinite(update.scale) and _all_finite(update.up) and _all_finite(update.down)):
        raise ValueError("tuned weight holds NaN or Inf (in the adapter's factors)")
    change.memo["tuned_finite"] = True


def _all_finite(matrix: torch.Tensor) -> bool:
    return bool(torch.isfinite(matrix).all())


def update_svd(base: torch.Tensor, tuned: torch.Tensor, change: Change) -> SVD:
    """Every singular triplet of dW = tuned - base (both ``[out, in]``), once per ``change``.

    From the factors when ``change.update`` is given (r triplets, :func:`low_rank_svd`), else
    the thin SVD of the dense difference taken in float64 (the difference of two nearby
    weights: float64 keeps its small singular values).
    """
    cached = change.memo.get("dw_svd")
    if cached is None:
        if change.update is not None:
            cached = low_rank_svd(change.update)
        else:
            cached = dense_svd(tuned.to(torch.float64) - base.to(device=tuned.device, dtype=torch.float64), dtype=torch.float64)
        change.memo["dw_svd"] = cached
    return cached  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Amplification (LoRA, section 7)
# --------------------------------------------------------------------------------------------


def projection_norm(base: torch.Tensor, top: SVD) -> float:
    """||U^T W0 V||_F: the part of W0 in the update's top singular subspace, in float64."""
    u, v = top.U.to(torch.float64), top.V.to(torch.float64)
    return float(torch.linalg.matrix_norm((u.T @ base.to(device=u.device, dtype=torch.float64)) @ v))


def amplification(dw_fro: float, proj: float) -> float:
    """||dW||_F / ||U^T W0 V||_F (the LoRA paper's amplification factor); NaN when undefined."""
    return dw_fro / proj if proj > 0 else math.nan


# --------------------------------------------------------------------------------------------
# Intruder dimensions
# --------------------------------------------------------------------------------------------


def decompose_base(base: torch.Tensor) -> SVD:
    """The base matrix's thin SVD, float32 on its device: the per-matrix work of the spectral
    metrics, done once however many steps and runs compare against it."""
    return dense_svd(base, dtype=torch.float32)


# What :func:`decompose_base` computes, as stored between runs (bump when its numbers change).
BASE_SVD_LABEL = "base-svd-float32-v1"


def svd_tensors(svd: SVD) -> dict[str, torch.Tensor]:
    """An SVD as named tensors to store: ``U``, ``S`` and ``Vh`` (= V^T, as LAPACK returns it)."""
    return {"U": svd.U, "S": svd.S, "Vh": svd.V.T}


def svd_from_tensors(tensors: dict[str, torch.Tensor]) -> SVD:
    """The inverse of :func:`svd_tensors`."""
    return SVD(tensors["U"], tensors["S"], tensors["Vh"].T)


def max_similarity(tuned_left: torch.Tensor, base_left: torch.Tensor) -> torch.Tensor:
    """For each column of ``tuned_left``, its largest |cos| with any column of ``base_left``.

    PEFT: ``(U_merged.T @ U_base).abs().max(dim=1).values``. Computed in float64.
    """
    dev = tuned_left.device
    return (tuned_left.to(torch.float64).T @ base_left.to(device=dev, dtype=torch.float64)).abs().max(dim=1).values


def intruder_count(similarity: torch.Tensor, epsilon: float) -> int:
    """How many of the top-k vectors' largest similarities are below ``epsilon``."""
    return int((similarity < epsilon).sum())


def top_left_dense(tuned: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` left singular vectors of a dense matrix (``torch.linalg.svd``, float32)."""
    return dense_svd(tuned, dtype=torch.float32).U[:, :k]


def _complement(basis: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``vectors = basis @ C + Q @ R`` with Q orthonormal and orthogonal to ``basis``.

    Returns ``(C, Q, R)``. When ``basis`` is square (spans everything), Q has no columns.
    Two passes of projection (Gram-Schmidt twice is enough) keep Q orthogonal to the basis.
    """
    coeff = basis.T @ vectors
    if basis.shape[1] >= basis.shape[0]:
        return coeff, vectors.new_zeros(vectors.shape[0], 0), vectors.new_zeros(0, vectors.shape[1])
    residual = vectors - basis @ coeff
    again = basis.T @ residual
    coeff, residual = coeff + again, residual - basis @ again
    q, r = torch.linalg.qr(residual)
    return coeff, q, r


def top_left_lowrank(base: SVD, update: LowRank, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` left singular vectors of W_t = W0 + s·B·A from the base's SVD, exactly.

    With B' = s·B = U0 C_B + Q R_B and A^T = V0 C_A + P R_A (Q, P orthonormal, orthogonal to
    U0, V0), W_t = [U0 Q] M [V0 P]^T where M = diag(S0, 0) + [C_B; R_B] [C_A; R_A]^T, a
    diagonal plus a rank-r matrix of size (p + r) x (p + r), p = min(out, in). Its top-k
    singular vectors come from ARPACK on products costing O((p + r) r) each (a dense SVD
    when the core is small). The left singular vectors of W_t are [U0 Q] u_M.

    Returns:
        ``(coords, left)``: u_M's first p rows (the coordinates on U0, so that
        |coords| is already the cosine with each base vector) as ``[p, k]``, and W_t's
        left singular vectors ``[out, k]``; float64.
    """
    dev = base.U.device
    u0, s0, v0 = (t.to(torch.float64) for t in (base.U, base.S, base.V))
    up = update.scale * update.up.to(device=dev, dtype=torch.float64)
    down_t = update.down.to(device=dev, dtype=torch.float64).T
    c_b, q, r_b = _complement(u0, up)
    c_a, _, r_a = _complement(v0, down_t)  # P is not needed: only left vectors are returned
    left = torch.cat([c_b, r_b]).cpu()  # [p + ru, r]
    right = torch.cat([c_a, r_a]).cpu()  # [p + rv, r]
    diag = s0.cpu()
    n_rows, n_cols, n_diag = left.shape[0], right.shape[0], diag.shape[0]
    k = min(k, n_rows, n_cols)
    if min(n_rows, n_cols) <= max(_DENSE_CORE_MAX, 2 * k + 2):
        core = left @ right.T
        core[:n_diag, :n_diag] += torch.diag(diag)
        u_m = torch.linalg.svd(core, full_matrices=False)[0][:, :k]
    else:
        u_m = _arpack_top_left(diag, left, right, k)
    u_m = u_m.to(dev)
    left_vectors = u0 @ u_m[:n_diag] + q @ u_m[n_diag:]
    return u_m[:n_diag], left_vectors


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """numpy / scipy BLAS on one thread while ARPACK runs.

    ARPACK's own work is on thin ``[p, ncv]`` blocks: threads only wait on each other there
    (measured on 2 shared cores, p = 2048, k = 10: 0.05 s on one thread, ~1 s on two).
    """
    with _blas_controller().limit(limits=1, user_api="blas"):
        yield


@functools.cache
def _blas_controller() -> Any:
    """threadpoolctl's view of the loaded BLAS libraries, made once (after scipy is imported):
    finding them walks every loaded shared object, milliseconds that per ARPACK call would
    cost as much as the solve itself."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _arpack_top_left(diag: torch.Tensor, left: torch.Tensor, right: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k left singular vectors of M = diag(diag, 0) + left @ right.T, by ARPACK on M M^T.

    M M^T = D D^T + W C W^T with W = [left, D right] and C = [[right^T right, I], [I, 0]]: a
    diagonal plus a rank-2r symmetric matrix, so one product costs O(size · r) in two thin
    matrix products. Its top-k eigenvectors are M's top-k left singular vectors; ARPACK
    (scipy ``eigsh``, ``tol=0``: to machine precision) finds them with one call back per
    iteration, in numpy float64 (torch round trips per call would cost more than the product).
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    d, a, b = (t.numpy().astype(np.float64, copy=False) for t in (diag, left, right))
    n_rows, n_diag, r = a.shape[0], d.shape[0], a.shape[1]
    squares = np.zeros(n_rows)
    squares[:n_diag] = d**2
    d_b = np.zeros((n_rows, r))
    d_b[:n_diag] = d[:, None] * b[:n_diag]
    w = np.concatenate([a, d_b], axis=1)  # [n_rows, 2r]
    c = np.block([[b.T @ b, np.eye(r)], [np.eye(r), np.zeros((r, r))]])
    w_c = w @ c

    def gram(x: np.ndarray) -> np.ndarray:
        x = x.reshape(n_rows, -1)
        return squares[:, None] * x + w_c @ (w.T @ x)

    op = LinearOperator((n_rows, n_rows), matvec=gram, matmat=gram, dtype=np.float64)
    start = np.random.default_rng(0).standard_normal(n_rows)  # deterministic
    with _one_blas_thread():
        values, vectors = eigsh(op, k=k, which="LA", tol=0, v0=start)
    return torch.from_numpy(np.ascontiguousarray(vectors[:, np.argsort(-values, kind="stable")]))


def lowrank_max_similarity(base: SVD, update: LowRank, k: int) -> torch.Tensor:
    """:func:`max_similarity` of W_t's top-k left vectors with U0, for W_t = W0 + s·B·A.

    On U0's own basis the cosines are the coordinates: ``|u_M[:p]|.max(dim=0)``.
    """
    coords, _ = top_left_lowrank(base, update, k)
    return coords.abs().max(dim=0).values


# --------------------------------------------------------------------------------------------
# Subspace similarity (LoRA, section 7)
# --------------------------------------------------------------------------------------------


def subspace_similarity(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """phi(i, j) = ||U_a[:, :i]^T U_b[:, :j]||_F^2 / min(i, j) for every i, j (1-based).

    Args:
        u_a: ``[out, r_a]`` orthonormal columns, most important first.
        u_b: ``[out, r_b]``.

    Returns:
        ``[r_a, r_b]`` float64; entry ``[i - 1, j - 1]`` is phi(i, j), in [0, 1].
    """
    g = (u_a.to(torch.float64).T @ u_b.to(device=u_a.device, dtype=torch.float64)) ** 2
    cumulative = g.cumsum(0).cumsum(1)
    i = torch.arange(1, g.shape[0] + 1, dtype=torch.float64, device=g.device)[:, None]
    j = torch.arange(1, g.shape[1] + 1, dtype=torch.float64, device=g.device)[None, :]
    return cumulative / torch.minimum(i, j)
