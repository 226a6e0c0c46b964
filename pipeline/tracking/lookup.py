"""Reading runs back from MLflow: the run that trained a model, a run by reference, and its
accuracy curves.

`boostpipe runs` and `boostpipe compare` read what the pipeline logged (logs.py lays it out,
names.py names it, old names included): per-exit values with the exit index as the step, the
budgeted curve with the expected cost in kFLOPs as the step.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.paths import HISTORY
from pipeline.tracking.names import (
    BUDGET_TOP1_FLAT,
    EXIT_MFLOPS,
    EXIT_TOP1,
    metric_history,
    per_exit,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

# Links DVC outputs to their MLflow run: history.json's `run` (a hash of the params and the
# data), never a store path or run id, so outputs restored from DVC's run-cache, a remote or
# another clone find their run in whatever store the user has.
RUN_TAG = "boostpipe.run"


def find_training_run(client: MlflowClient, experiment_ids: list[str], key: str) -> Run | None:
    """The run that trained `key`: the newest finished one, else the newest; None if none."""
    runs = client.search_runs(
        experiment_ids,
        filter_string=f"tags.`{RUN_TAG}` = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    return next((r for r in runs if r.info.status == "FINISHED"), runs[0] if runs else None)


class RunNotFound(LookupError):
    """A reference that names no run; the message is one line naming it."""


@dataclass
class RunCurves:
    label: str
    run_id: str
    exit_mflops: list[float]
    exit_top1: list[float]
    budget_mflops: list[float]
    budget_top1: list[float]  # the flat (monotone) envelope, as the paper plots it
    top1_at_budget: dict[float, float]  # target MFLOPs of calibrate.budgets -> test top-1
    epochs: list[int]
    effective_samples: list[list[float]]  # per exit, per epoch: the paper's Fig. 3 diagnostic


def _by_step(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in metric_history(client, run_id, key))


# A FLOPs budget's test top-1 as `test/budget_1.5M_top1` logs it (flat, before the sections).
BUDGET_TOP1 = re.compile(r"(?:test/)?budget_([0-9.e+-]+)M_top1")


def curves(client: MlflowClient, run: Run) -> RunCurves:
    run_id = run.info.run_id
    exits = _by_step(client, run_id, EXIT_TOP1)
    costs = dict(_by_step(client, run_id, EXIT_MFLOPS))
    budget = _by_step(client, run_id, BUDGET_TOP1_FLAT)
    effective = [
        _by_step(client, run_id, per_exit("train/effective_samples", index))
        for index in range(1, len(exits) + 1)
    ]
    return RunCurves(
        label=f"{run.info.run_name} ({run_id[:8]})",
        run_id=run_id,
        exit_mflops=[costs.get(step, float("nan")) for step, _ in exits],
        exit_top1=[value for _, value in exits],
        budget_mflops=[step / 1000 for step, _ in budget],
        budget_top1=[value for _, value in budget],
        top1_at_budget=top1_at_budgets(run),
        epochs=[step for step, _ in effective[0]] if effective else [],
        effective_samples=[[value for _, value in history] for history in effective],
    )


def top1_at_budgets(run: Run) -> dict[float, float]:
    """Target MFLOPs of each calibrated budget -> its test top-1, under either name."""
    found = {
        float(match.group(1)): value
        for key, value in run.data.metrics.items()
        if (match := BUDGET_TOP1.fullmatch(key))
    }
    return dict(sorted(found.items()))


def _trained_at_revision(ref: str) -> str | None:
    """What a DVC experiment or git revision trained ("workspace": the working tree): the
    `run` of its history.json, which the MLflow run carries as a tag."""
    import dvc.api

    try:
        text = dvc.api.read(str(HISTORY), rev=None if ref == "workspace" else ref)
    except Exception:  # DVC raises many types for an unknown revision or a missing file
        return None
    return json.loads(text)["run"]


def find_run(client: MlflowClient, experiment_id: str, ref: str) -> Run:
    """A run id, a unique run-id prefix (as `boostpipe runs` prints), a run name (the newest
    run of that name), or a DVC experiment / git revision / `workspace`."""
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        return client.get_run(ref)
    recent = client.search_runs(
        [experiment_id], max_results=1000, order_by=["attributes.start_time DESC"]
    )
    is_prefix = re.fullmatch(r"[0-9a-f]{4,}", ref) is not None
    by_prefix = [r for r in recent if is_prefix and r.info.run_id.startswith(ref)]
    if len(by_prefix) > 1:
        raise RunNotFound(f"{ref}: matches {len(by_prefix)} runs; give more of the run id")
    named = [r for r in recent if r.info.run_name == ref]
    found = by_prefix or named
    if found:
        return found[0]
    key = _trained_at_revision(ref)
    if key is None:
        raise RunNotFound(f"{ref}: no MLflow run id, prefix or name, and no DVC experiment")
    run = find_training_run(client, [experiment_id], key)
    if run is None:
        raise RunNotFound(f"{ref}: trained {key}, but this MLflow store has no run of it")
    return run
