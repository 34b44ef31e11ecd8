"""The spectral math (dora_analysis.spectral) and its metrics: closed forms and float64 numpy oracles.

Tiny matrices only; the PEFT oracle and the end-to-end runs are in test_spectral_peft.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dora_analysis import spectral as sp
from dora_analysis.metrics import MatrixContext, build_metrics

CTX = MatrixContext(name="w")


def rel(actual: float, expected: float) -> float:
    return abs(actual - expected) / max(abs(expected), 1e-300)


def np_spectrum(dw: np.ndarray) -> tuple[float, float, float, int]:
    """Oracle: fro, stable rank, effective rank, rank90 from numpy's float64 SVD."""
    s = np.linalg.svd(dw, compute_uv=False)
    p = s[s > 0] / s.sum()
    energy = np.cumsum(s**2) / (s**2).sum()
    return (
        float(np.sqrt((s**2).sum())),
        float((s**2).sum() / s[0] ** 2),
        float(np.exp(-(p * np.log(p)).sum())),
        int(np.argmax(energy >= 0.9) + 1),
    )


def np_intruder_sims(w0: np.ndarray, wt: np.ndarray, k: int) -> np.ndarray:
    """Oracle: PEFT's rule, (U_t.T @ U_0).abs().max(1) on thin float64 SVDs, first k."""
    u0 = np.linalg.svd(w0, full_matrices=False)[0]
    ut = np.linalg.svd(wt, full_matrices=False)[0]
    return np.abs(ut.T @ u0).max(axis=1)[:k]


def low_rank(out: int, inp: int, r: int, scale: float = 0.5) -> sp.LowRank:
    return sp.LowRank(torch.randn(out, r), torch.randn(r, inp), scale)


def measure(name: str, w0: torch.Tensor, wt: torch.Tensor, change: sp.Change | None = None, **options: object) -> dict[str, object]:
    metric = build_metrics([name], options)[0]
    return dict(metric.measure(metric.prepare(w0, CTX), wt, change=change))  # type: ignore[call-arg]


# -- closed forms --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["dense", "low-rank"])
def test_rank_one_update_has_stable_rank_one_and_rank90_one(path: str) -> None:
    w0 = torch.randn(12, 9)
    update = low_rank(12, 9, 1, scale=3.0)
    change = sp.Change(update=update, rank=1) if path == "low-rank" else None
    row = measure("spectrum", w0, (w0.double() + update.dense()).float(), change)
    assert row["dw_stable_rank"] == pytest.approx(1.0, rel=1e-6)
    assert row["dw_effective_rank"] == pytest.approx(1.0, rel=1e-4)
    assert row["dw_rank90"] == 1


def test_no_change_gives_no_intruders_and_similarity_one() -> None:
    w0 = torch.randn(10, 14)
    row = measure("intruders", w0, w0.clone())
    assert row["intruders"] == 0
    assert row["intruder_min_sim"] == pytest.approx(1.0, abs=1e-5)
    zero = sp.LowRank(torch.zeros(10, 2), torch.zeros(2, 14), 1.0)
    row = measure("intruders", w0, w0.clone(), sp.Change(update=zero, rank=2))
    assert row["intruders"] == 0
    assert row["intruder_min_sim"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("path", ["dense", "low-rank"])
def test_update_orthogonal_to_a_tall_base_is_exactly_one_intruder(path: str) -> None:
    out, inp = 16, 6  # tall: W0's left singular vectors span only 6 of 16 directions
    w0 = torch.randn(out, inp, dtype=torch.float64)
    u0 = torch.linalg.svd(w0, full_matrices=False)[0]
    v = torch.randn(out, 1, dtype=torch.float64)
    v -= u0 @ (u0.T @ v)  # orthogonal to W0's column space
    v /= v.norm()
    a = torch.randn(1, inp, dtype=torch.float64)
    scale = 100 * float(torch.linalg.matrix_norm(w0, 2)) / float(a.norm())  # far above sigma_1(W0)
    update = sp.LowRank(v.float(), a.float(), scale)
    wt = (w0 + update.dense()).float()
    change = sp.Change(update=update, rank=1) if path == "low-rank" else None
    row = measure("intruders", w0.float(), wt, change)
    assert row["intruders"] == 1
    assert row["intruder_min_sim"] < 0.05  # W0 tilts the new direction by ~sigma(W0) / the update's


def test_permuting_base_columns_keeps_its_left_vectors() -> None:
    w0 = torch.randn(8, 11)
    row = measure("intruders", w0, w0[:, torch.randperm(11)])
    assert row["intruders"] == 0
    assert row["intruder_min_sim"] == pytest.approx(1.0, abs=1e-5)


def test_zero_update_spectrum() -> None:
    w0 = torch.randn(5, 4)
    row = measure("spectrum", w0, w0.clone())
    assert row["dw_fro"] == 0 and row["dw_rank90"] == 0
    assert math.isnan(row["dw_stable_rank"]) and math.isnan(row["dw_effective_rank"])  # type: ignore[arg-type]


def test_subspace_similarity_closed_forms() -> None:
    q = torch.linalg.qr(torch.randn(20, 6, dtype=torch.float64))[0]
    assert torch.allclose(sp.subspace_similarity(q, q).diagonal(), torch.ones(6, dtype=torch.float64))
    phi = sp.subspace_similarity(q[:, :3], q[:, 3:])  # orthogonal subspaces
    assert float(phi.abs().max()) < 1e-12
    # Against the definition, entry by entry.
    a, b = q[:, :4], torch.linalg.qr(torch.randn(20, 5, dtype=torch.float64))[0]
    phi = sp.subspace_similarity(a, b)
    for i in range(1, 5):
        for j in range(1, 6):
            expected = float(torch.linalg.matrix_norm(a[:, :i].T @ b[:, :j]) ** 2) / min(i, j)
            assert float(phi[i - 1, j - 1]) == pytest.approx(expected, rel=1e-12)
    assert float(phi.min()) >= 0 and float(phi.max()) <= 1 + 1e-12


# -- oracles -------------------------------------------------------------------------------


@pytest.mark.parametrize(("out", "inp", "r"), [(24, 16, 4), (16, 24, 3), (20, 20, 8)])
def test_low_rank_path_matches_numpy_float64(out: int, inp: int, r: int) -> None:
    w0 = torch.randn(out, inp)
    update = low_rank(out, inp, r)
    dw = update.dense().numpy()
    wt = (w0.double() + update.dense()).float()
    change = sp.Change(update=update, rank=r)
    row = measure("spectrum", w0, wt, change)
    fro, stable, effective, rank90 = np_spectrum(dw)
    assert rel(row["dw_fro"], fro) < 1e-9  # type: ignore[arg-type]
    assert rel(row["dw_stable_rank"], stable) < 1e-9  # type: ignore[arg-type]
    assert rel(row["dw_effective_rank"], effective) < 1e-9  # type: ignore[arg-type]
    assert row["dw_rank90"] == rank90
    assert rel(row["dw_rel"], fro / np.linalg.norm(w0.double().numpy())) < 1e-9  # type: ignore[arg-type]
    # Amplification: U, V the top-r singular vectors of dW; W0 as stored (float32) in float64.
    amp = measure("amplification", w0, wt, sp.Change(update=update, rank=r))
    u, _, vt = np.linalg.svd(dw)
    proj = np.linalg.norm(u[:, :r].T @ w0.double().numpy() @ vt[:r].T)
    assert amp["amp_rank"] == r
    assert rel(amp["proj_norm"], proj) < 1e-9  # type: ignore[arg-type]
    assert rel(amp["amplification"], fro / proj) < 1e-9  # type: ignore[arg-type]


def test_dense_path_matches_numpy_float64() -> None:
    w0 = torch.randn(18, 13)
    wt = w0 + 0.05 * torch.randn(18, 13)
    dw = wt.double().numpy() - w0.double().numpy()
    row = measure("spectrum", w0, wt)
    for got, want in zip((row["dw_fro"], row["dw_stable_rank"], row["dw_effective_rank"]), np_spectrum(dw)[:3], strict=True):
        assert rel(got, want) < 1e-9  # type: ignore[arg-type]
    amp = measure("amplification", w0, wt, rank=5)
    u, _, vt = np.linalg.svd(dw)
    proj = np.linalg.norm(u[:, :5].T @ w0.double().numpy() @ vt[:5].T)
    assert amp["amp_rank"] == 5
    assert rel(amp["proj_norm"], proj) < 1e-9  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("out", "inp", "r", "scale", "arpack"),
    [(30, 20, 3, 0.5, False), (20, 30, 3, 2.0, False), (25, 25, 4, 1.0, False), (70, 60, 4, 0.2, True), (60, 70, 3, 1.0, True)],
)
def test_intruder_similarities_match_full_svds(
    out: int, inp: int, r: int, scale: float, arpack: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Low-rank path (a dense core; ARPACK past _DENSE_CORE_MAX, lowered here) and dense path against numpy."""
    if arpack:
        monkeypatch.setattr(sp, "_DENSE_CORE_MAX", 16)
    w0 = torch.randn(out, inp) / math.sqrt(inp)
    update = low_rank(out, inp, r, scale)
    wt = w0.double() + update.dense()
    expected = np_intruder_sims(w0.double().numpy(), wt.numpy(), 10)
    base = sp.decompose_base(w0)
    low = sp.lowrank_max_similarity(base, update, 10).numpy()
    dense = sp.max_similarity(sp.top_left_dense(wt.float(), 10), base.U).numpy()
    assert np.abs(low - expected).max() < 1e-4
    assert np.abs(dense - expected).max() < 2e-3  # float32, as PEFT: close singular values rotate
    # The low-rank path's vectors are W_t's own singular vectors (up to sign).
    _, left = sp.top_left_lowrank(base, update, 10)
    u_t = np.linalg.svd(wt.numpy(), full_matrices=False)[0][:, :10]
    assert np.abs(np.abs((left.numpy() * u_t).sum(0)) - 1).max() < 1e-4


def test_low_rank_svd_reconstructs_and_is_orthonormal() -> None:
    update = low_rank(30, 17, 5, scale=-0.7)  # a negative scale too
    svd = sp.low_rank_svd(update)
    rebuilt = svd.U @ torch.diag(svd.S) @ svd.V.T
    assert torch.allclose(rebuilt, update.dense(), atol=1e-10)
    assert torch.allclose(svd.U.T @ svd.U, torch.eye(5, dtype=torch.float64), atol=1e-12)
    assert torch.all(svd.S[:-1] >= svd.S[1:])


def test_fan_in_fan_out_is_analysed_as_out_in() -> None:
    w0 = torch.randn(7, 12)  # [out, in]
    wt = w0 + 0.1 * torch.randn(7, 12)
    metric = build_metrics(["intruders"])[0]
    straight = metric.measure(metric.prepare(w0, CTX), wt)
    stored = metric.measure(metric.prepare(w0.T.contiguous(), MatrixContext(name="w", fan_in_fan_out=True)), wt.T.contiguous())
    assert straight["intruder_min_sim"] == pytest.approx(stored["intruder_min_sim"], abs=1e-6)


def test_options_reach_the_metrics() -> None:
    intruders, spectrum, amp = build_metrics(["intruders", "spectrum", "amplification"], {"intruder_k": 3, "intruder_eps": 0.2, "rank": 5})
    assert (intruders.k, intruders.epsilon, spectrum.rank, amp.rank) == (3, 0.2, 5, 5)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="epsilon"):
        build_metrics(["intruders"], {"intruder_eps": 0})


def test_nan_names_the_side() -> None:
    w0 = torch.randn(4, 4)
    bad = w0.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^tuned"):
        measure("spectrum", w0, bad)
    with pytest.raises(ValueError, match=r"^base"):
        measure("intruders", bad, w0)


@pytest.mark.parametrize("metric", ["spectrum", "intruders", "amplification"])
@pytest.mark.parametrize("factor", ["up", "down"])
def test_nan_in_a_lora_factor_is_a_tuned_error(metric: str, factor: str) -> None:
    # The low-rank path reads the factors, not the dense W_t, so the factors are what is checked.
    w0 = torch.randn(12, 9)
    update = low_rank(12, 9, 2)
    getattr(update, factor)[1, 1] = float("nan")
    wt = w0 + torch.nan_to_num(update.dense(torch.float32))  # a finite W_t: only the factors say
    with pytest.raises(ValueError, match=r"^tuned weight holds NaN or Inf"):
        measure(metric, w0, wt, sp.Change(update=update, rank=2))


def test_the_tuned_side_is_checked_once_per_change(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(sp, "check_finite", lambda matrix, side: calls.append(side))
    w0, change = torch.randn(6, 5), sp.Change()
    wt = w0 + 0.1 * torch.randn(6, 5)
    for name in ("spectrum", "intruders", "amplification"):
        measure(name, w0, wt, change)
    assert calls.count("tuned") == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_finds_any_nan_or_inf(bad: float) -> None:
    matrix = torch.randn(5, 4)
    matrix[2, 1] = bad
    with pytest.raises(ValueError, match="tuned weight holds NaN or Inf"):
        sp.check_finite(matrix, "tuned")


def test_check_finite_accepts_finite_values_whose_sum_overflows() -> None:
    sp.check_finite(torch.full((3, 3), 1e308, dtype=torch.float64), "base")  # the sum is inf; no value is
