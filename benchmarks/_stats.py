"""Statistics the benchmarks share: ratios taken within a round, so that noise common to a round cancels."""

from __future__ import annotations

import statistics


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """Median and quartiles over rounds of the within-round ratio num / den."""
    ratios = sorted(a / b for a, b in zip(times[num], times[den], strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), q[0], q[2]


def rotated(items: list[str], round_index: int) -> list[str]:
    """``items`` starting at a different one each round, so that none always runs first."""
    k = round_index % len(items)
    return items[k:] + items[:k]
