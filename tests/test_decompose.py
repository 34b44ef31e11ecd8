"""The math against closed forms and an independent float64 computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dora_analysis.decompose import as_vectors, compare, delta_direction, delta_magnitude, magnitude


def _rotate_rows(w: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate every row of ``w`` by ``angle`` within the plane of its first two coordinates."""
    out = w.clone()
    c, s = math.cos(angle), math.sin(angle)
    out[:, 0] = c * w[:, 0] - s * w[:, 1]
    out[:, 1] = s * w[:, 0] + c * w[:, 1]
    return out


def _reference(w0: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """dM and dD in float64 numpy, straight from the paper's equations 3-4 (rows = vectors)."""
    w0, w = w0.astype(np.float64), w.astype(np.float64)
    m0, m = np.linalg.norm(w0, axis=1), np.linalg.norm(w, axis=1)
    cos = (w0 * w).sum(axis=1) / (m0 * m)
    return float(np.abs(m - m0).mean()), float((1 - cos).mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    ("shape", "axis", "fan_in_fan_out"),
    [((20, 10), "out", False), ((300, 700), "out", False), ((64, 48), "in", False), ((48, 64), "out", True)],
)
def test_identical_weights_give_exactly_zero(dtype: torch.dtype, shape: tuple[int, int], axis: str, fan_in_fan_out: bool) -> None:
    # An unchanged matrix (a frozen layer) is dD = 0, not a rounding residue of ~1e-17.
    w0 = (torch.randn(shape) * 3).to(dtype)
    ch = compare(w0, w0.clone(), axis=axis, fan_in_fan_out=fan_in_fan_out, block_elements=4096)  # type: ignore[arg-type]
    assert (ch.delta_m, ch.delta_d, ch.zero_rows) == (0.0, 0.0, 0)


def test_unchanged_rows_add_exactly_zero_to_the_mean() -> None:
    w0 = torch.randn(40, 16, dtype=torch.float64)
    w = w0.clone()
    w[:10] += 0.05 * torch.randn(10, 16, dtype=torch.float64)  # a quarter of the rows change
    assert compare(w0, w).delta_d == pytest.approx(compare(w0[:10], w[:10]).delta_d / 4, rel=1e-12)


def test_scaling_changes_magnitude_only() -> None:
    w0 = torch.randn(20, 10)
    ch = compare(w0, 2 * w0)
    assert ch.delta_m == pytest.approx(float(torch.linalg.norm(w0.double(), dim=1).mean()), rel=1e-12)
    assert ch.delta_d == pytest.approx(0.0, abs=1e-15)
    assert ch.delta_m_signed == pytest.approx(ch.delta_m)


@pytest.mark.parametrize("angle", [1e-3, 0.1, 0.5, 1.0, math.pi / 2, 3.0])
def test_rotation_gives_one_minus_cos(angle: float) -> None:
    w0 = torch.randn(16, 8, dtype=torch.float64)
    ch = compare(w0, _rotate_rows(w0, angle))
    # A rotation in the (x0, x1) plane turns the row's (x0, x1) part by `angle`; the row's
    # cosine is then 1 - (1 - cos t) * (x0^2 + x1^2) / |row|^2.
    share = (w0[:, :2] ** 2).sum(1) / (w0**2).sum(1)
    expected = float(((1 - math.cos(angle)) * share).mean())
    assert ch.delta_d == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert ch.delta_m == pytest.approx(0.0, abs=1e-12)


def test_single_row_rotated_by_angle() -> None:
    w0 = torch.zeros(1, 2, dtype=torch.float64)
    w0[0, 0] = 3.0
    for t in (0.01, 0.7, 2.0):
        w = torch.tensor([[3 * math.cos(t), 3 * math.sin(t)]], dtype=torch.float64)
        assert delta_direction(w0, w) == pytest.approx(1 - math.cos(t), rel=1e-12)
        assert delta_magnitude(w0, w) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(64, 48), (257, 1000), (3, 5000)])
def test_bf16_matches_float64_on_same_values(shape: tuple[int, int]) -> None:
    """bf16 storage is read without further loss: same answer as float64 on those values."""
    w0 = torch.randn(*shape).to(torch.bfloat16)
    w = (w0.float() + 0.05 * torch.randn(*shape)).to(torch.bfloat16)
    ch = compare(w0, w)
    ref_m, ref_d = _reference(w0.float().numpy(), w.float().numpy())
    assert ref_d >= 1e-3
    assert ch.delta_d == pytest.approx(ref_d, rel=1e-6)
    assert ch.delta_m == pytest.approx(ref_m, rel=1e-6)


def test_small_direction_change_survives_float32_storage() -> None:
    """dD ~ 1e-6 (a short fine-tune) is resolved, not swamped by float32 rounding."""
    w0 = torch.randn(128, 512)
    w = w0 + 1e-3 * torch.randn(128, 512)
    ch = compare(w0, w)
    _, ref_d = _reference(w0.numpy(), w.numpy())
    assert ch.delta_d == pytest.approx(ref_d, rel=1e-4)


def test_zero_rows_are_left_out_of_direction_and_counted() -> None:
    w0 = torch.randn(10, 6, dtype=torch.float64)
    w = _rotate_rows(w0, 0.3)
    w0[2] = 0.0  # zero in base
    w[7] = 0.0  # zero in tuned
    ch = compare(w0, w)
    assert ch.zero_rows == 2
    keep = [i for i in range(10) if i not in (2, 7)]
    share = (w0[keep, :2] ** 2).sum(1) / (w0[keep] ** 2).sum(1)
    assert ch.delta_d == pytest.approx(float(((1 - math.cos(0.3)) * share).mean()), rel=1e-9)
    assert math.isfinite(ch.delta_m)


def test_all_zero_matrix_has_undefined_direction_not_an_error() -> None:
    ch = compare(torch.zeros(4, 3), torch.zeros(4, 3))
    assert ch.zero_rows == 4 and math.isnan(ch.delta_d) and ch.delta_m == 0.0


def test_conv1d_layout_is_transposed_first() -> None:
    """GPT-2 Conv1D stores [in, out]: the vectors are its columns."""
    w0 = torch.randn(12, 5)  # [in, out] -> 5 output features
    w = w0 * torch.linspace(1, 2, 5)  # scale each output feature (column)
    ch = compare(w0, w, fan_in_fan_out=True)
    assert ch.rows == 5 and ch.cols == 12
    assert ch.delta_d == pytest.approx(0.0, abs=1e-12)
    m0 = torch.linalg.norm(w0.double(), dim=0)
    assert ch.delta_m == pytest.approx(float((m0 * torch.linspace(0, 1, 5).double()).mean()), rel=1e-6)
    # Read as [out, in] instead, the same change also turns the rows.
    assert compare(w0, w).delta_d > 1e-3


def test_axis_in_takes_one_vector_per_input_feature() -> None:
    w0 = torch.randn(6, 9)
    w = w0 * torch.linspace(1, 3, 9)  # scale input columns: pure magnitude change per column
    by_in = compare(w0, w, axis="in")
    by_out = compare(w0, w, axis="out")
    assert by_in.rows == 9 and by_in.cols == 6
    assert by_in.delta_d == pytest.approx(0.0, abs=1e-12)
    assert by_out.delta_d > 1e-3
    ref_m, ref_d = _reference(w0.T.numpy(), w.T.numpy())
    assert by_in.delta_m == pytest.approx(ref_m, rel=1e-6)


def test_conv_weight_is_flattened_per_output_channel() -> None:
    w0 = torch.randn(8, 3, 3, 3)
    w = w0 + 0.1 * torch.randn_like(w0)
    ch = compare(w0, w)
    ref_m, ref_d = _reference(w0.flatten(1).numpy(), w.flatten(1).numpy())
    assert (ch.rows, ch.cols) == (8, 27)
    assert ch.delta_d == pytest.approx(ref_d, rel=1e-6)
    assert ch.delta_m == pytest.approx(ref_m, rel=1e-6)


def test_magnitude_is_row_norm() -> None:
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert magnitude(w).tolist() == [5.0, 1.0]
    assert magnitude(w, axis="in").tolist() == pytest.approx([3.0, math.sqrt(17)])


def test_mixed_dtypes_compare() -> None:
    w0 = torch.randn(10, 4).to(torch.bfloat16)
    w = w0.float() * 1.5
    assert compare(w0, w).delta_d == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_rejected(bad: float) -> None:
    w0 = torch.randn(5, 5)
    w = w0.clone()
    w[1, 2] = bad
    with pytest.raises(ValueError, match="tuned weight contains NaN or Inf"):
        compare(w0, w)
    with pytest.raises(ValueError, match="base weight"):
        compare(w, w0)


def test_shape_mismatch_and_vectors() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        compare(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        as_vectors(torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_vectors_read_in_storage_order_match_rows_of_the_transpose(dtype: torch.dtype) -> None:
    """Vectors that are columns (fan_in_fan_out, axis="in") are summed without transposing:
    same numbers as rows of the explicit transpose, across many row blocks."""
    w0 = torch.randn(2000, 40).to(dtype)  # 2000 rows: more than one block of 819
    w = (w0.float() + 0.1 * torch.randn(2000, 40)).to(dtype)
    w[:, 5] = 0  # a zero column: left out of dD on both paths
    by_columns = compare(w0, w, fan_in_fan_out=True)
    by_rows = compare(w0.T.contiguous(), w.T.contiguous())
    assert by_columns.zero_rows == by_rows.zero_rows == 1
    for field in ("rows", "cols", "delta_m", "delta_d", "delta_m_signed", "base_norm"):
        assert getattr(by_columns, field) == pytest.approx(getattr(by_rows, field), rel=1e-12), field
    assert compare(w0, w, axis="in").delta_d == pytest.approx(by_rows.delta_d, rel=1e-12)
