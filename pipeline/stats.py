"""Small-sample statistics for comparisons over seeds: mean +- std and the 95 % paired t
interval, without SciPy (the t quantiles for the few degrees of freedom a study has)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# Two-sided 95 % quantiles of Student's t, by degrees of freedom (df > 30: the normal's 1.96).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
        17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}  # fmt: skip


def t_quantile(df: int) -> float:
    if df > 30:
        return 1.96
    return T975[max(d for d in T975 if d <= df)]  # a lower df is the conservative side


def std(values: Sequence[float]) -> float:
    """The sample standard deviation; 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int  # pairs


def paired_interval(a: Sequence[float], b: Sequence[float]) -> Interval | None:
    """The mean of a - b (paired: same seed) with its 95 % t interval; None below two pairs,
    where no interval exists."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if len(diffs) < 2:
        return None
    mean = statistics.mean(diffs)
    half = t_quantile(len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return Interval(mean, mean - half, mean + half, len(diffs))
