"""PNG figures of the evaluate stage (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from pipeline.io import atomic_path
from pipeline.tracking.lookup import RunCurves


def _save(figure: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def accuracy_vs_flops(
    path: Path,
    exit_mflops: Sequence[float],
    exit_top1: Sequence[float],
    budget_mflops: Sequence[float],
    budget_top1: Sequence[float],
    budget_flat: Sequence[float],
    title: str,
) -> None:
    """Anytime (one point per exit) and budgeted-batch (raw and flat envelope) accuracy."""
    figure, (anytime, budgeted) = plt.subplots(1, 2, figsize=(11, 4))
    anytime.plot(exit_mflops, exit_top1, "o-")
    for index, (x, y) in enumerate(zip(exit_mflops, exit_top1, strict=True), start=1):
        anytime.annotate(str(index), (x, y), textcoords="offset points", xytext=(4, -10))
    anytime.set(title="anytime prediction", xlabel="MFLOPs", ylabel="test top-1 (%)")
    budgeted.set(title="budgeted batch", xlabel="average MFLOPs", ylabel="test top-1 (%)")
    if budget_mflops:
        order = sorted(range(len(budget_mflops)), key=budget_mflops.__getitem__)
        xs = [budget_mflops[i] for i in order]
        budgeted.plot(xs, [budget_top1[i] for i in order], ".", alpha=0.6, label="raw")
        budgeted.plot(xs, [budget_flat[i] for i in order], "-", label="flat envelope")
        budgeted.legend()
    else:  # data.val_size 0: no held-out split to calibrate thresholds on
        budgeted.text(0.5, 0.5, "not calibrated\n(no held-out split)", ha="center", va="center")
    for axes in (anytime, budgeted):
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    _save(figure, path)


def accuracy_vs_time(
    path: Path,
    panels: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    exit_top1: Sequence[float],
    budget_top1: Sequence[float],
    measured: Sequence[tuple[str, float, float]],
    title: str,
) -> None:
    """Test top-1 against ms per image, one panel per regime: each exit at its profiled cost,
    the p grid's flat envelope at the profile's predicted cost, and every time budget at the
    time early exit really took. `panels` holds (regime, per-exit ms, grid ms) rows;
    `measured` holds (regime, measured ms, early-exit top-1) per time budget."""
    figure, axes_row = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for axes, (regime, exit_ms, grid_ms) in zip(axes_row[0], panels, strict=True):
        axes.plot(exit_ms, exit_top1, "o-", label="every sample at exit k (profiled)")
        if grid_ms:
            order = sorted(range(len(grid_ms)), key=grid_ms.__getitem__)
            axes.plot(
                [grid_ms[i] for i in order],
                [budget_top1[i] for i in order],
                "-",
                label="budgeted, flat envelope (predicted)",
            )
        points = [(ms, top1) for r, ms, top1 in measured if r == regime]
        if points:
            axes.plot(*zip(*points, strict=True), "*", markersize=12, label="time budget, measured")
        axes.set(title=regime, xlabel="ms per image", ylabel="test top-1 (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(title)
    _save(figure, path)


def _draw_effective_samples(
    axes: plt.Axes, epochs: Sequence[int], per_exit: Sequence[Sequence[float]], title: str
) -> None:
    for index, fractions in enumerate(per_exit, start=1):
        axes.plot(epochs, fractions, "o-", label=f"exit {index}")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, even when there are two
    axes.set(xlabel="epoch", ylabel="effective sample fraction", title=title)
    axes.grid(alpha=0.3)
    axes.legend()


def effective_samples(path: Path, history: Sequence[dict]) -> None:
    """Fraction of each batch whose loss exceeds exit 1's 10th percentile, per exit and epoch."""
    figure, axes = plt.subplots(figsize=(6, 4))
    per_exit = list(zip(*(record["effective_samples"] for record in history), strict=True))
    epochs = [record["epoch"] for record in history]
    _draw_effective_samples(axes, epochs, per_exit, "effective training samples")
    _save(figure, path)


def effective_samples_figure(runs: Sequence[RunCurves]) -> plt.Figure:
    """The effective-sample diagnostic (paper Fig. 3) of several runs side by side, on one
    y scale: boosting keeps later exits training on more of each batch than joint training."""
    figure, panels = plt.subplots(
        1, len(runs), figsize=(5 * len(runs), 4), sharey=True, squeeze=False
    )
    for axes, run in zip(panels[0], runs, strict=True):
        _draw_effective_samples(axes, run.epochs, run.effective_samples, run.label)
    figure.suptitle("effective training samples")
    return figure


def compare_effective_samples(path: Path, runs: Sequence[RunCurves]) -> None:
    _save(effective_samples_figure(runs), path)


def compare_runs(path: Path, runs: Sequence[RunCurves]) -> None:
    """Several runs in one figure: accuracy against cost exit by exit, and budget by budget."""
    figure, (anytime, budgeted) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        (line,) = anytime.plot(run.exit_mflops, run.exit_top1, "o-", label=run.label)
        budgeted.plot(run.budget_mflops, run.budget_top1, "-", color=line.get_color())
    anytime.set(title="anytime prediction (per exit)", xlabel="MFLOPs", ylabel="test top-1 (%)")
    budgeted.set(
        title="budgeted batch (flat envelope)", xlabel="average MFLOPs", ylabel="test top-1 (%)"
    )
    for axes in (anytime, budgeted):
        axes.grid(alpha=0.3)
    figure.legend(loc="lower center", ncol=min(len(runs), 3), bbox_to_anchor=(0.5, -0.08))
    _save(figure, path)


def paper_overlay(path: Path, run: RunCurves, rows: Sequence, paper_label: str) -> None:
    """One run's curves with the published points (rows of pipeline.paper.compare_rows) on top."""
    figure, (anytime, budgeted) = plt.subplots(1, 2, figsize=(12, 4.5))
    anytime.plot(run.exit_mflops, run.exit_top1, "o-", label=run.label)
    budgeted.plot(run.budget_mflops, run.budget_top1, "-", label=run.label)
    exits = [r for r in rows if r.label.startswith("exit")]
    budgets = [r for r in rows if r.label.startswith("budget")]
    for axes, points in ((anytime, exits), (budgeted, budgets)):
        if points:
            xs, ys = [r.mflops for r in points], [r.paper for r in points]
            axes.plot(xs, ys, "s--", color="black", label=paper_label)
    anytime.set(title="anytime prediction (per exit)", xlabel="MFLOPs", ylabel="test top-1 (%)")
    budgeted.set(
        title="budgeted batch (flat envelope)", xlabel="average MFLOPs", ylabel="test top-1 (%)"
    )
    for axes in (anytime, budgeted):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    _save(figure, path)


def exit_curve(path: Path, mflops: Sequence[float], top1: Sequence[float], title: str) -> None:
    """Held-out top-1 of every exit against its cost."""
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(mflops, top1, "o-")
    axes.set(title=title, xlabel="MFLOPs", ylabel="validation top-1 (%)")
    axes.grid(alpha=0.3)
    _save(figure, path)


def _temperature(sampled: dict) -> float | None:
    """The trial's temperature as one number: t, the first exit's t, or the mean of t_k."""
    if "t" in sampled:
        return sampled["t"]
    if "t_first" in sampled:
        return sampled["t_first"]
    per_exit = [v for k, v in sampled.items() if k.startswith("t_")]
    return sum(per_exit) / len(per_exit) if per_exit else None


def search_summary(path: Path, trials: Sequence, metric: str) -> None:
    """The objective against the temperature, one point per trial, marked by how it ended."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    styles = {"finished": "o", "stopped_early": "x", "failed": "v"}
    for outcome, marker in styles.items():
        points = [
            (_temperature(t.sampled), t.score)
            for t in trials
            if t.outcome == outcome and t.score is not None and _temperature(t.sampled) is not None
        ]
        if points:
            axes.scatter(*zip(*points, strict=True), marker=marker, label=outcome.replace("_", " "))
    axes.set(title=f"{len(trials)} trials", xlabel="temperature t", ylabel=metric)
    axes.grid(alpha=0.3)
    if axes.collections:
        axes.legend()
    _save(figure, path)
