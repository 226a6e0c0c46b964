"""A study's answer: per exit and per calibrated budget, each variant's mean +- sd over seeds and
its paired difference from the first variant (same seed) with a 95 % t interval, a verdict, and
the seeds that would resolve the difference at this spread. Written as JSON, CSV and a plot."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.io import atomic_path
from pipeline.stats import paired_interval, std, t_quantile


@dataclass(frozen=True)
class RunResult:
    """One finished (variant, seed): its DVC experiment and the test top-1 it reached."""

    variant: str
    seed: int
    experiment: str
    top1: dict[str, float]  # row ("exit_1", "budget_1M5", ...) -> test top-1 %

    @classmethod
    def from_metrics(cls, variant: str, seed: int, experiment: str, metrics: dict) -> RunResult:
        top1 = dict(metrics["anytime"]["top1"])
        top1 |= {key: row["top1"] for key, row in (metrics.get("budgets") or {}).items()}
        return cls(variant, seed, experiment, top1)


@dataclass(frozen=True)
class Row:
    """One exit or budget: each variant's mean and sd, and each later variant's paired
    difference from the first (None below two seeds)."""

    name: str
    mean: dict[str, float]
    sd: dict[str, float]
    diff: dict[str, float]
    low: dict[str, float]
    high: dict[str, float]
    verdict: dict[str, str]
    seeds_needed: dict[str, int | None]


def seeds_to_resolve(diffs: Sequence[float], confidence: float = 0.95) -> int | None:
    """The fewest seeds whose 95 % interval would exclude 0 if the mean difference and its
    spread stayed as observed; None when the mean difference is 0 (no number resolves it)."""
    mean, spread = statistics.mean(diffs), std(diffs)
    if mean == 0:
        return None
    if spread == 0:
        return 2
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    n = max(2, math.ceil((z * spread / abs(mean)) ** 2))  # t > z: the answer is at least this
    while t_quantile(n - 1, confidence) * spread / math.sqrt(n) >= abs(mean):
        n += 1
    return n


def summarise(results: Sequence[RunResult], variants: Sequence[str]) -> list[Row]:
    """Rows in the runs' order (exits, then budgets); pairs are matched by seed."""
    by = {(r.variant, r.seed): r for r in results}
    seeds = sorted({r.seed for r in results if all((v, r.seed) in by for v in variants)})
    reference = variants[0]
    rows = []
    for name in results[0].top1:
        values = {v: [by[v, s].top1[name] for s in seeds] for v in variants}
        diff, low, high, verdict, needed = {}, {}, {}, {}, {}
        for variant in variants[1:]:
            interval = paired_interval(values[variant], values[reference])
            if interval is None:
                continue
            diff[variant], low[variant], high[variant] = interval.mean, interval.low, interval.high
            verdict[variant] = (
                "better"
                if interval.low > 0
                else "worse"
                if interval.high < 0
                else "not distinguishable"
            )
            pairs = [a - b for a, b in zip(values[variant], values[reference], strict=True)]
            needed[variant] = seeds_to_resolve(pairs)
        rows.append(
            Row(
                name,
                mean={v: statistics.mean(values[v]) for v in variants},
                sd={v: std(values[v]) for v in variants},
                diff=diff,
                low=low,
                high=high,
                verdict=verdict,
                seeds_needed=needed,
            )
        )
    return rows


def write(folder: Path, results: Sequence[RunResult], rows: Sequence[Row], about: dict) -> None:
    """runs.json/.csv (every run) and summary.json/.csv (every row), each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "runs.json") as path:
        path.write_text(json.dumps([asdict(r) for r in results], indent=2))
    with atomic_path(folder / "summary.json") as path:
        path.write_text(json.dumps({**about, "rows": [asdict(r) for r in rows]}, indent=2))
    names = list(results[0].top1)
    with atomic_path(folder / "runs.csv") as path, path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["variant", "seed", "experiment", *names])
        for r in results:
            out.writerow([r.variant, r.seed, r.experiment, *(r.top1[n] for n in names)])
    with atomic_path(folder / "summary.csv") as path, path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["row", "variant", "mean", "sd", "diff", "low", "high", "verdict", "seeds"])
        for row in rows:
            for v in row.mean:
                out.writerow(
                    [row.name, v, row.mean[v], row.sd[v], *_diff_cells(row, v)],
                )


def _diff_cells(row: Row, variant: str) -> list[Any]:
    if variant not in row.diff:
        return ["", "", "", "", ""]
    return [
        row.diff[variant],
        row.low[variant],
        row.high[variant],
        row.verdict[variant],
        row.seeds_needed[variant],
    ]


def table(rows: Sequence[Row], variants: Sequence[str], n_seeds: int) -> Any:
    """The console table (rich): a line per exit and budget."""
    from rich.table import Table

    reference = variants[0]
    out = Table(title=f"test top-1 %, mean ± sd over {n_seeds} seeds; vs {reference}, paired")
    out.add_column("")
    for v in variants:
        out.add_column(v, justify="right")
    for v in variants[1:]:
        out.add_column(f"{v} - {reference} (95 % CI)", justify="right")
        out.add_column("verdict")
    for row in rows:
        cells = [f"{row.mean[v]:.2f} ± {row.sd[v]:.2f}" for v in variants]
        for v in variants[1:]:
            if v not in row.diff:
                cells += ["-", "-"]
                continue
            needed = row.seeds_needed[v]
            verdict = row.verdict[v]
            if verdict == "not distinguishable" and needed:
                verdict += f" (~{needed} seeds would resolve it)"
            cells += [f"{row.diff[v]:+.2f} [{row.low[v]:+.2f}, {row.high[v]:+.2f}]", verdict]
        out.add_row(row.name, *cells)
    return out


def plot(path: Path, curves: dict[str, tuple[list[float], list[list[float]]]]) -> None:
    """Test top-1 against MFLOPs per exit, a line at each variant's mean and a band of ± sd:
    `curves` maps a variant to its exits' MFLOPs and, per seed, its exits' top-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for variant, (mflops, per_seed) in curves.items():
        by_exit = list(zip(*per_seed, strict=True))
        mean = [statistics.mean(values) for values in by_exit]
        spread = [std(values) for values in by_exit]
        axes.plot(mflops, mean, marker="o", label=f"{variant} (n={len(per_seed)})")
        axes.fill_between(
            mflops,
            [m - s for m, s in zip(mean, spread, strict=True)],
            [m + s for m, s in zip(mean, spread, strict=True)],
            alpha=0.25,
        )
    axes.set_xlabel("MFLOPs per image (exit)")
    axes.set_ylabel("test top-1 (%)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as target:
        figure.savefig(target, format="png", dpi=120)
    plt.close(figure)
