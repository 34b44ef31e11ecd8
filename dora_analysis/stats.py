"""Statistics on (dD, dM) points: correlation, regression, and how robust they are.

Plain numpy/scipy on arrays; no drawing, no files. Used by the summary table, the report
and the plots alike, so every number shown anywhere comes from one place.

Beyond the paper. A pooled Pearson r over (layer, checkpoint) points mixes two things:
the same matrix moving across checkpoints (*within*: dM and dD both grow with training, so
this part tends to be positive for every method) and differences between matrices (*between*:
the per-matrix means). :func:`within_between` reports both, and :func:`bootstrap_r` gives an
interval for r by resampling whole matrices (points of one matrix are not independent).
With 6 matrices that interval is coarse and can sit off-centre from r;
:func:`permutation_r` is a test that stays exact with few matrices (opt-in: the summary's
columns do not include it; :func:`dora_analysis.summary.permutation_summary` reports it).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps

ArrayLike = np.ndarray | list[float]


def _clean(x: ArrayLike, y: ArrayLike, groups: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Float arrays with the points where x or y is NaN dropped."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(xa) & np.isfinite(ya)
    ga = None if groups is None else np.asarray(groups)[keep]
    return xa[keep], ya[keep], ga


def _degenerate(x: np.ndarray, y: np.ndarray) -> bool:
    """True when r is undefined: fewer than 3 points or a constant coordinate."""
    return len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0


def pearson(x: ArrayLike, y: ArrayLike) -> tuple[float, float]:
    """Pearson r and its two-sided p-value; NaNs when undefined (n < 3 or constant)."""
    xa, ya, _ = _clean(x, y)
    if _degenerate(xa, ya):
        return math.nan, math.nan
    res = sps.pearsonr(xa, ya)
    return float(res.statistic), float(res.pvalue)


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman's rank correlation rho; NaN when undefined."""
    xa, ya, _ = _clean(x, y)
    if _degenerate(xa, ya):
        return math.nan
    return float(sps.spearmanr(xa, ya).statistic)


def ols(x: ArrayLike, y: ArrayLike) -> tuple[float, float]:
    """Least-squares line y = slope * x + intercept (dM on dD); NaNs when undefined."""
    xa, ya, _ = _clean(x, y)
    if len(xa) < 2 or np.ptp(xa) == 0:
        return math.nan, math.nan
    res = sps.linregress(xa, ya)
    return float(res.slope), float(res.intercept)


def ols_band(x: ArrayLike, y: ArrayLike, grid: ArrayLike, *, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Confidence band of the OLS fitted mean at ``grid`` (t interval, n - 2 dof).

    Analytic rather than seaborn's bootstrap: deterministic, and what the slope's usual
    standard error implies: se(x0) = s * sqrt(1/n + (x0 - mean x)^2 / Sxx).

    Returns:
        ``(low, high)`` arrays shaped like ``grid``; NaN with fewer than 3 points.
    """
    xa, ya, _ = _clean(x, y)
    g = np.asarray(grid, dtype=np.float64)
    n = len(xa)
    slope, intercept = ols(xa, ya)
    if n < 3 or not math.isfinite(slope):
        return np.full_like(g, np.nan), np.full_like(g, np.nan)
    resid = ya - (slope * xa + intercept)
    s = math.sqrt(float(resid @ resid) / (n - 2))
    sxx = float(((xa - xa.mean()) ** 2).sum())
    half = sps.t.ppf(0.5 + level / 2, n - 2) * s * np.sqrt(1 / n + (g - xa.mean()) ** 2 / sxx)
    centre = slope * g + intercept
    return centre - half, centre + half


def within_between(x: ArrayLike, y: ArrayLike, groups: ArrayLike) -> tuple[float, float]:
    """The within-group and between-group parts of a pooled correlation.

    Args:
        x, y: The points (dD, dM).
        groups: A label per point; a group is one matrix followed across checkpoints.

    Returns:
        ``(r_within, r_between)``: Pearson r of the group-centred points, and Pearson r of
        the group means. NaN where undefined (e.g. one point per group has no within part).
    """
    xa, ya, ga = _clean(x, y, groups)
    if len(xa) == 0:
        return math.nan, math.nan
    _, inverse = np.unique(ga, return_inverse=True)
    counts = np.bincount(inverse)
    mean_x = np.bincount(inverse, weights=xa) / counts
    mean_y = np.bincount(inverse, weights=ya) / counts
    r_within, _ = pearson(xa - mean_x[inverse], ya - mean_y[inverse])
    r_between, _ = pearson(mean_x, mean_y)
    return r_within, r_between


def bootstrap_r(
    x: ArrayLike,
    y: ArrayLike,
    groups: ArrayLike,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval for the pooled Pearson r, resampling whole groups.

    A cluster bootstrap: each replicate draws groups (matrices) with replacement and keeps
    all of their points, because the checkpoints of one matrix are correlated.

    Returns:
        ``(low, high)``; NaNs with fewer than 3 groups or ``n_boot=0``.
    """
    xa, ya, ga = _clean(x, y, groups)
    labels, inverse = np.unique(ga, return_inverse=True)
    n_groups = len(labels)
    if n_boot <= 0 or n_groups < 3 or _degenerate(xa, ya):
        return math.nan, math.nan
    members = [np.flatnonzero(inverse == g) for g in range(n_groups)]
    rng = np.random.default_rng(seed)
    rs = np.empty(n_boot)
    for i in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, n_groups, n_groups)])
        bx, by = xa[idx], ya[idx]
        # A replicate of identical points has no r; NaN, then ignored by nanpercentile.
        rs[i] = np.nan if _degenerate(bx, by) else np.corrcoef(bx, by)[0, 1]
    if np.isnan(rs).all():
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(rs, [tail, 100 - tail])
    return float(lo), float(hi)


# Up to this many groups, every permutation is enumerated (8! = 40320); above, random ones.
EXACT_GROUPS = 8


def permutation_r(x: ArrayLike, y: ArrayLike, groups: ArrayLike, *, n_perm: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of the pooled Pearson r, permuting whole groups (matrices).

    Each group is one matrix followed across checkpoints, its points in order (checkpoint
    1, 2, ...). Under the null hypothesis that a matrix's dM trajectory is unrelated to
    *which* matrix's dD trajectory it is paired with, every pairing of the groups' dM
    sequences with their dD sequences is equally likely. The test recomputes r for each
    pairing, keeping each sequence whole and aligned by position, so the dependence between
    the checkpoints of one matrix, and the growth over training that every matrix shares,
    are kept. With g groups there are g! pairings: all are enumerated up to
    :data:`EXACT_GROUPS` groups (6 matrices: 720, so the smallest possible p is 1/720), and
    ``n_perm`` random ones above that. Valid with few groups, unlike a bootstrap that
    resamples them.

    Returns:
        The share of pairings whose |r| is at least the observed |r| (the identity pairing
        included); NaN with fewer than 3 groups, groups of unequal size, or r undefined.
    """
    xa, ya, ga = _clean(x, y, groups)
    labels, inverse = np.unique(ga, return_inverse=True)
    n_groups = len(labels)
    if n_groups < 3 or _degenerate(xa, ya):
        return math.nan
    members = [np.flatnonzero(inverse == g) for g in range(n_groups)]  # each in its original order
    if len({len(m) for m in members}) != 1:
        return math.nan
    bx = np.stack([xa[m] for m in members])  # [group, position]
    by = np.stack([ya[m] for m in members])
    observed = abs(np.corrcoef(bx.ravel(), by.ravel())[0, 1])
    if n_groups <= EXACT_GROUPS:
        orders = np.array(list(itertools.permutations(range(n_groups))))
    else:
        rng = np.random.default_rng(seed)
        orders = np.vstack([np.arange(n_groups), [rng.permutation(n_groups) for _ in range(n_perm)]])
    # r of every pairing at once: x fixed, y's groups reordered; the sums of x, y, x^2, y^2 do
    # not change, only sum(x * y).
    xc, yc = bx - bx.mean(), by - by.mean()
    cross = xc @ yc.T  # [group of x, group of y]: sum over positions of x * y
    sxy = cross[np.arange(n_groups), orders].sum(axis=1)
    rs = sxy / math.sqrt(float((xc**2).sum()) * float((yc**2).sum()))
    return float(np.mean(np.abs(rs) >= observed * (1 - 1e-12)))


@dataclass(frozen=True)
class Correlation:
    """Everything the summary reports for one set of (dD, dM) points."""

    n: int
    pearson_r: float
    pearson_p: float
    spearman_rho: float
    slope: float
    intercept: float
    r_within: float
    r_between: float
    r_ci_low: float
    r_ci_high: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def correlate(x: ArrayLike, y: ArrayLike, groups: ArrayLike, *, n_boot: int = 2000, seed: int = 0) -> Correlation:
    """All summary statistics of dM (y) against dD (x), grouped by matrix."""
    xa, ya, ga = _clean(x, y, groups)
    r, p = pearson(xa, ya)
    slope, intercept = ols(xa, ya)
    r_w, r_b = within_between(xa, ya, ga)
    lo, hi = bootstrap_r(xa, ya, ga, n_boot=n_boot, seed=seed)
    return Correlation(
        n=len(xa),
        pearson_r=r,
        pearson_p=p,
        spearman_rho=spearman(xa, ya),
        slope=slope,
        intercept=intercept,
        r_within=r_w,
        r_between=r_b,
        r_ci_low=lo,
        r_ci_high=hi,
    )


def has_sign(r: float, sign: int) -> bool:
    """True if ``r`` is finite and strictly on the side of zero that ``sign`` (+1 or -1) names."""
    return math.isfinite(r) and r * sign > 0


def strength(r: float) -> str:
    """A plain-language reading of r: 'strong negative', 'weak positive', 'none'..."""
    if not math.isfinite(r):
        return "undefined"
    a = abs(r)
    if a < 0.1:
        return "none"
    word = "weak" if a < 0.3 else "moderate" if a < 0.6 else "strong"
    return f"{word} {'positive' if r > 0 else 'negative'}"
