"""The compare command's effective-sample figure, built from real RunCurves records."""

from __future__ import annotations

import matplotlib.pyplot as plt

from pipeline.plots import compare_effective_samples, effective_samples_figure
from pipeline.tracking.lookup import RunCurves


def _run(label: str, effective: list[list[float]]) -> RunCurves:
    return RunCurves(
        label=label,
        run_id=label * 4,
        exit_mflops=[1.0, 2.0, 3.0],
        exit_top1=[80.0, 85.0, 90.0],
        budget_mflops=[1.5],
        budget_top1=[86.0],
        top1_at_budget={1.5: 86.0},
        epochs=[1, 2],
        effective_samples=effective,
    )


def test_effective_samples_of_each_run_side_by_side_on_one_scale(tmp_path):
    boost = _run("boostnet", [[0.9, 0.9], [0.6, 0.5], [0.5, 0.4]])
    base = _run("baseline", [[0.9, 0.9], [0.3, 0.2], [0.2, 0.1]])
    figure = effective_samples_figure([boost, base])
    panels = figure.axes
    assert [axes.get_title() for axes in panels] == ["boostnet", "baseline"]
    for axes, run in zip(panels, (boost, base), strict=True):
        lines = axes.get_lines()
        assert [list(line.get_ydata()) for line in lines] == run.effective_samples
        assert all(list(line.get_xdata()) == [1, 2] for line in lines)
        ticks = [t for t in axes.get_xticks() if 1 <= t <= 2]
        assert ticks and all(float(t).is_integer() for t in ticks)  # epochs, not 1.2, 1.4 ...
    assert panels[0].get_ylim() == panels[1].get_ylim()
    plt.close(figure)
    compare_effective_samples(tmp_path / "fig.png", [boost, base])
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
