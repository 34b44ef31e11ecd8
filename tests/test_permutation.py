"""The permutation test of r over matrices: an independent brute-force oracle, its edge cases,
and the opt-in summary beside the default one (whose columns it leaves alone)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dora_analysis.stats import EXACT_GROUPS, permutation_r
from dora_analysis.summary import SUMMARY_COLUMNS, magnitude_direction, permutation_summary, summarize

from .test_plots import make_layers


def brute_force(x: np.ndarray, y: np.ndarray, n_groups: int) -> float:
    """Every pairing of the groups' y sequences with their x sequences, r by np.corrcoef."""
    xs, ys = x.reshape(n_groups, -1), y.reshape(n_groups, -1)
    observed = abs(np.corrcoef(x, y)[0, 1])
    hits = [
        abs(np.corrcoef(xs.ravel(), ys[list(p)].ravel())[0, 1]) >= observed * (1 - 1e-12) for p in itertools.permutations(range(n_groups))
    ]
    return float(np.mean(hits))


@pytest.mark.parametrize(("n_groups", "per", "coupling", "seed"), [(6, 4, -1.0, 0), (6, 4, 0.0, 1), (5, 3, 0.7, 2), (4, 6, 1.0, 3)])
def test_matches_brute_force_enumeration(n_groups: int, per: int, coupling: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    level = np.repeat(rng.normal(size=n_groups), per)
    x = level + 0.3 * rng.normal(size=n_groups * per)
    y = coupling * level + 0.5 * rng.normal(size=n_groups * per)
    groups = np.repeat([f"m{g}" for g in range(n_groups)], per)
    assert permutation_r(x, y, groups) == pytest.approx(brute_force(x, y, n_groups), abs=1e-12)


def test_p_is_a_share_of_the_pairings_and_counts_the_observed_one() -> None:
    groups = np.repeat(np.arange(6), 4)
    x = np.repeat(np.arange(6.0), 4) + np.tile(np.arange(4.0), 6) * 0.01
    p = permutation_r(x, -x, groups)  # a perfect negative relation: only pairings keeping |r| = 1
    assert p == pytest.approx(1 / math.factorial(6))  # the identity, the smallest p possible with 6 matrices
    assert 0 < permutation_r(x, np.random.default_rng(0).normal(size=24), groups) <= 1


def test_undefined_cases_are_nan() -> None:
    x = np.arange(8.0)
    assert math.isnan(permutation_r(x, x, [0, 0, 0, 0, 1, 1, 1, 1]))  # 2 groups
    assert math.isnan(permutation_r(x[:7], x[:7] ** 2, [0, 0, 0, 1, 1, 2, 2]))  # unequal sizes
    assert math.isnan(permutation_r(np.ones(6), x[:6], [0, 0, 1, 1, 2, 2]))  # constant x


def test_many_groups_sample_pairings_reproducibly() -> None:
    n_groups = EXACT_GROUPS + 2
    rng = np.random.default_rng(4)
    x = rng.normal(size=n_groups * 3)
    y = 0.2 * x + rng.normal(size=n_groups * 3)
    groups = np.repeat(np.arange(n_groups), 3)
    p = permutation_r(x, y, groups, n_perm=2000, seed=1)
    assert p == permutation_r(x, y, groups, n_perm=2000, seed=1) and 1 / 2001 <= p <= 1


def test_permutation_summary_is_opt_in_beside_the_default_summary() -> None:
    layers = make_layers()
    default = summarize(layers)
    assert list(default.columns) == SUMMARY_COLUMNS and "r_perm_p" not in default.columns
    perm = permutation_summary(layers)
    assert list(perm.columns) == ["run", "method", "kind", "n_matrices", "pearson_r", "r_perm_p"]
    assert perm[["run", "kind"]].equals(default[["run", "kind"]])
    np.testing.assert_allclose(perm["pearson_r"], default["pearson_r"], rtol=1e-12)
    assert perm["r_perm_p"].between(0, 1).all()
    assert (perm.loc[perm["kind"] == "all", "n_matrices"] == 8).all()  # 4 layers x (query, value)


def test_both_summaries_list_kinds_in_the_order_a_block_applies_them() -> None:
    """Rows arrive as checkpoint files list tensors, alphabetically; the summaries follow the block."""
    block = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    layers = make_layers(layers=3, kinds=tuple(sorted(block)))
    for table in (summarize(layers, n_boot=0), permutation_summary(layers)):
        for _, rows in table.groupby("run", sort=False):
            assert list(rows["kind"]) == [*block, "all"]
    growth = magnitude_direction(layers)
    assert list(growth["run"].drop_duplicates()) == list(layers["run"].drop_duplicates())
    for _, rows in growth.groupby("run", sort=False):
        assert list(rows["kind"]) == list(block)
