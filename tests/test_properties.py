"""Properties of the paper's dM and dD (``decompose.compare``) on generated matrices.

Matrices are 1-12 x 1-12, entries 0 or of magnitude 1e-6 .. 1e3, so no square underflows or
overflows in float64 and "zero norm" means "all-zero vector". Zero vectors are common on
purpose: they are left out of dD (and counted in ``zero_rows``), and dD is NaN only when no
vector is non-zero on both sides.

Tolerances. Everything is reduced in float64, so results that should be equal are compared
to 1e-12 (relative, with an absolute floor of 1e-12 for values near 0) where only float64
rounding separates them, and bf16 / float32 / float64 copies of the *same* values to 1e-9
relative: the float64 reduction makes them agree to the last bit today, and 1e-9 still fails
loudly if any path ever reduces in float32 (errors near 1e-7).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dora_analysis.decompose import compare

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FLOAT64 = 1e-12  # same values, different float64 rounding
ACROSS_DTYPES = 1e-9  # same values, stored in another dtype


def _entry(x: float) -> float:
    # Tiny values would square to 0 and make a non-zero row count as a zero one.
    return x if abs(x) >= 1e-6 else 0.0


ENTRY = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False).map(_entry)
SIDE = st.tuples(st.integers(1, 12), st.integers(1, 12))


@st.composite
def pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """(W0, W_t) in float64: W_t independent, a small update of W0, or W0 with some rows zeroed."""
    shape = draw(SIDE)
    base = draw(arrays(np.float64, shape, elements=ENTRY))
    how = draw(st.sampled_from(["independent", "update", "rows zeroed"]))
    if how == "independent":
        tuned = draw(arrays(np.float64, shape, elements=ENTRY))
    elif how == "update":
        tuned = base + draw(arrays(np.float64, shape, elements=ENTRY)) * draw(st.sampled_from([1e-3, 1e-1, 1.0]))
        tuned = np.vectorize(_entry)(tuned)
    else:
        tuned = base.copy()
        tuned[draw(arrays(np.bool_, shape[0]))] = 0.0
    return torch.from_numpy(base), torch.from_numpy(tuned)


def _close(a: float, b: float, tol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def _same(x, y, tol: float = FLOAT64) -> None:
    """Two MatrixChange results agree: dM and dD to ``tol``, the counts exactly."""
    assert (x.rows, x.cols, x.zero_rows) == (y.rows, y.cols, y.zero_rows)
    for field in ("delta_m", "delta_d", "delta_m_signed", "base_norm"):
        assert _close(getattr(x, field), getattr(y, field), tol), (field, getattr(x, field), getattr(y, field))


def _reference(base: np.ndarray, tuned: np.ndarray) -> tuple[float, float]:
    """dM and dD per paper eqs. 3-4, one vector per row, written independently in numpy."""
    m0, m = np.linalg.norm(base, axis=1), np.linalg.norm(tuned, axis=1)
    keep = (m0 > 0) & (m > 0)
    cos = np.sum(base[keep] * tuned[keep], axis=1) / (m0[keep] * m[keep])
    dd = float(np.mean(1 - np.clip(cos, -1, 1))) if keep.any() else math.nan
    return float(np.mean(np.abs(m - m0))), dd


@pytest.mark.parametrize("axis", ["out", "in"])
@PROPERTY
@given(pair=pairs())
def test_bounds_and_zero_vectors(pair: tuple[torch.Tensor, torch.Tensor], axis: str) -> None:
    base, tuned = pair
    r = compare(base, tuned, axis=axis)
    assert r.delta_m >= 0
    dim = 1 if axis == "out" else 0  # the vectors: rows of [out, in] for "out", columns for "in"
    zero = (base.abs().sum(dim) == 0) | (tuned.abs().sum(dim) == 0)
    assert r.zero_rows == int(zero.sum())
    if r.zero_rows == r.rows:
        assert math.isnan(r.delta_d)
    else:
        assert 0 <= r.delta_d <= 2


@PROPERTY
@given(pair=pairs())
def test_matches_an_independent_numpy_reference(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    base, tuned = pair
    r = compare(base, tuned)
    dm, dd = _reference(base.numpy(), tuned.numpy())
    assert _close(r.delta_m, dm, FLOAT64) and _close(r.delta_d, dd, FLOAT64), (r, dm, dd)


@PROPERTY
@given(pair=pairs())
def test_no_change_is_zero(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    base, _ = pair
    r = compare(base, base.clone())
    assert r.delta_m == 0.0 and r.delta_m_signed == 0.0
    # cos(w, w) is 1 up to rounding of |w|^2 against sqrt(|w|^2)^2; NaN if every row is zero.
    assert math.isnan(r.delta_d) if r.zero_rows == r.rows else 0 <= r.delta_d <= FLOAT64


@pytest.mark.parametrize("axis", ["out", "in"])
@PROPERTY
@given(pair=pairs(), data=st.data())
def test_direction_ignores_positive_scaling_of_each_vector(pair: tuple[torch.Tensor, torch.Tensor], axis: str, data: st.DataObject) -> None:
    base, tuned = pair
    k = tuned.shape[0] if axis == "out" else tuned.shape[1]
    scale = torch.from_numpy(data.draw(arrays(np.float64, k, elements=st.floats(1e-3, 1e3))))
    # One factor per vector: rows for "out" (diag(s) W), columns for "in" (W diag(s)).
    scaled = tuned * (scale[:, None] if axis == "out" else scale[None, :])
    before, after = compare(base, tuned, axis=axis), compare(base, scaled, axis=axis)
    assert before.zero_rows == after.zero_rows
    assert _close(before.delta_d, after.delta_d, FLOAT64), (before.delta_d, after.delta_d)


@PROPERTY
@given(pair=pairs())
def test_swapping_base_and_tuned_keeps_dm_and_dd(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    base, tuned = pair
    forward, backward = compare(base, tuned), compare(tuned, base)
    assert forward.zero_rows == backward.zero_rows
    assert _close(forward.delta_m, backward.delta_m, FLOAT64)
    assert _close(forward.delta_d, backward.delta_d, FLOAT64)
    assert _close(forward.delta_m_signed, -backward.delta_m_signed, FLOAT64)


@PROPERTY
@given(pair=pairs())
def test_bf16_float32_float64_copies_of_the_same_values_agree(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    # Round to bf16 first, so all three dtypes hold exactly the same numbers.
    base, tuned = (t.to(torch.bfloat16) for t in pair)
    exact = compare(base.double(), tuned.double())
    _same(compare(base, tuned), exact, ACROSS_DTYPES)
    _same(compare(base.float(), tuned.float()), exact, ACROSS_DTYPES)
    _same(compare(base, tuned.float()), exact, ACROSS_DTYPES)  # sides may differ in dtype


@PROPERTY
@given(pair=pairs())
def test_layouts_and_blocking_do_not_change_the_numbers(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    base, tuned = pair
    r = compare(base, tuned)
    # The same vectors stored [in, out], or read as the columns of the transpose.
    _same(compare(base.T.contiguous(), tuned.T.contiguous(), fan_in_fan_out=True), r)
    _same(compare(base.T.contiguous(), tuned.T.contiguous(), axis="in"), r)
    # Blocks of the fewest rows the reduction allows, against one block.
    _same(compare(base, tuned, block_elements=1), r)


@PROPERTY
@given(pair=pairs(), data=st.data())
def test_nan_or_inf_anywhere_is_refused(pair: tuple[torch.Tensor, torch.Tensor], data: st.DataObject) -> None:
    base, tuned = (t.clone() for t in pair)
    side = data.draw(st.sampled_from([base, tuned]))
    i, j = data.draw(st.integers(0, side.shape[0] - 1)), data.draw(st.integers(0, side.shape[1] - 1))
    side[i, j] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    for axis in ("out", "in"):
        with pytest.raises(ValueError, match="NaN or Inf"):
            compare(base, tuned, axis=axis)
