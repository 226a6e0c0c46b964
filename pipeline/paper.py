"""The published BoostNet numbers (paper_results.yaml, which names its source) and how a finished
run compares with them: per exit (anytime) and per budget (budgeted batch classification)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
import yaml

from pipeline.tracking.lookup import RunCurves


class NoPaperNumbers(LookupError):
    """No published numbers for a setting or a run; the message is one line saying why."""


@cache
def published() -> dict[str, Any]:
    return yaml.safe_load(resources.files("pipeline").joinpath("paper_results.yaml").read_text())


def _data_key(setting: str) -> str:
    """Separately trained budgeted models (`...-budgeted-2`) share their setting's envelope."""
    return re.sub(r"-\d+$", "", setting)


def settings() -> list[str]:
    data = published()
    return sorted({*data["anytime_top1"], *data["budgeted_top1"]})


def guess_setting(run_params: dict[str, str], n_exits: int) -> str:
    """The setting whose dataset, architecture and exit count (and `base`) the run has."""
    dataset = run_params.get("data.dataset", "?")
    for setting, want in published()["match"].items():
        have = {
            "dataset": dataset,
            "arch": run_params.get("model.arch"),
            "n_exits": n_exits,
            "base": int(run_params.get("model.base", 0)),
        }
        if all(have[key] == value for key, value in want.items()):
            return setting
    if dataset not in {m["dataset"] for m in published()["match"].values()}:
        raise NoPaperNumbers(f"no published numbers exist for {dataset}")
    raise NoPaperNumbers(
        f"no published setting matches this run ({dataset}, {run_params.get('model.arch')}, "
        f"{n_exits} exits); name one with --paper: {', '.join(settings())}"
    )


@dataclass
class Row:
    label: str
    mflops: float
    ours: float | None
    paper: float

    @property
    def difference(self) -> float | None:
        return None if self.ours is None else self.ours - self.paper


def compare_rows(run: RunCurves, setting: str, boosted: bool, arch: str) -> list[Row]:
    """Our test top-1 beside the published one, exit by exit, then budget by budget (ours at a
    published budget: the calibrated budget itself, else the flat envelope interpolated)."""
    key = _data_key(setting)
    data = published()
    if key not in data["anytime_top1"] and key not in data["budgeted_top1"]:
        raise NoPaperNumbers(f"--paper: unknown setting {setting}; known: {', '.join(settings())}")
    rows = []
    anytime = data["anytime_top1"].get(key, {})
    if anytime:
        curve = anytime["boostnet" if boosted else arch]
        if len(curve) != len(run.exit_top1):
            raise NoPaperNumbers(
                f"{setting} has {len(curve)} exits but the run has {len(run.exit_top1)}"
            )
        for index, (paper, ours) in enumerate(zip(curve, run.exit_top1, strict=True)):
            rows.append(Row(f"exit {index + 1}", run.exit_mflops[index], ours, paper))
    for point in data["budgeted_top1"].get(key, []):
        mflops = point["flops"] / 1e6
        ours = run.top1_at_budget.get(mflops)
        if (
            ours is None
            and run.budget_mflops
            and (min(run.budget_mflops) <= mflops <= max(run.budget_mflops))
        ):
            order = np.argsort(run.budget_mflops)
            xs, ys = np.asarray(run.budget_mflops)[order], np.asarray(run.budget_top1)[order]
            ours = float(np.interp(mflops, xs, ys))
        paper = point["boostnet" if boosted else "baseline"]
        rows.append(Row(f"budget {mflops:g} MFLOPs", mflops, ours, paper))
    return rows
