"""Small-sample statistics for comparisons over seeds: mean +- std and the 95 % paired t
interval, with Student's t from SciPy (exact at every number of seeds, unlike a table)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """The two-sided `confidence` quantile of Student's t with `df` degrees of freedom."""
    from scipy.stats import t  # SciPy takes a second to import: only when an interval is due

    return float(t.ppf(0.5 + confidence / 2, df))


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
