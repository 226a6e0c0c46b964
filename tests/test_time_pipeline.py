"""Budgets in milliseconds end to end through DVC: the session's shrunk run, time budgets set
between the exits' costs its profile measured, and `dvc repro` re-running calibrate and
evaluate only (the profile and the model stay). Real DVC, real timing, a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import needs_data, run, set_params, trained_run
from helpers.shared import SharedRun, copy_project

from pipeline.io import read_json
from pipeline.profiling import BATCH_1, BATCH_N, PARAM_KEYS, ExitProfile
from pipeline.reports import time_budget_key

pytestmark = [needs_data, pytest.mark.slow]


@pytest.fixture(scope="module")
def project(shared_run: SharedRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_project(shared_run.local, tmp_path_factory.mktemp("time") / "repo")


def _budgets(profile: ExitProfile) -> dict[str, list[float | str]]:
    """Two budgets per regime, a third and two thirds of the way between exit 1 and the last:
    batch-1 in ms, batch-N as shares of the last exit's cost (as params.yaml states them).
    Unrounded: on a busy machine the two may lie close enough that rounding leaves the range;
    one budget where a busy machine measured no exit above the first."""
    thirds = (1 / 3, 2 / 3)
    ms = {
        r: list(dict.fromkeys(c[0] + f * (c[-1] - c[0]) for f in thirds))
        for r, c in profile.ms.items()
    }
    last = profile.ms[BATCH_N][-1]
    return {BATCH_1: ms[BATCH_1], BATCH_N: [f"{100 * b / last:.6g}%" for b in ms[BATCH_N]]}


def test_time_budgets_are_calibrated_timed_and_logged(project):
    profile = ExitProfile.from_json(read_json(project / "outputs/profile/exit_costs.json"))
    budgets = _budgets(profile)
    set_params(project, **{f"calibrate.budgets_ms.{PARAM_KEYS[r]}": b for r, b in budgets.items()})
    result = run(["dvc", "repro"], project)
    assert result.returncode == 0, result.stdout + result.stderr
    ran = {line.split("'")[1] for line in result.stdout.splitlines() if "Running stage" in line}
    assert ran == {"calibrate", "evaluate"}

    calibration = read_json(project / "outputs/calibrate/thresholds.json")
    rows = calibration["time_budgets"]
    assert [(r["currency"], r["stated"]) for r in rows] == [
        (regime, b) for regime in (BATCH_1, BATCH_N) for b in budgets[regime]
    ]
    last = profile.ms[BATCH_N][-1]
    for row in rows:  # a share resolves against the last exit; met on the held-out split
        stated = row["stated"]
        ms = float(stated[:-1]) / 100 * last if isinstance(stated, str) else stated
        assert row["budget"] == pytest.approx(ms)
        assert row["expected_ms"][row["currency"]] <= row["budget"]
    assert all(set(p["expected_ms"]) == {BATCH_1, BATCH_N} for p in calibration["grid"])

    metrics = read_json(project / "outputs/evaluate/metrics.json")
    keys = [time_budget_key(b, regime) for regime in (BATCH_1, BATCH_N) for b in budgets[regime]]
    assert list(metrics["time_budgets"]) == keys
    assert all("pct" in key for key in keys if key.startswith(BATCH_N))
    for key, row in metrics["time_budgets"].items():
        assert row["regime"] == key.split("_")[0]
        assert row["measured_ms"] > 0 and row["target_ms"] > 0
        assert row["measured_over_target"] == pytest.approx(row["measured_ms"] / row["target_ms"])
    for row in metrics["budgets"].values():
        assert row["predicted_ms"] > 0 and row["measured_ms"] > 0
    curve = read_json(project / "outputs/evaluate/budget_curve.json")
    assert all(r["ms_batch_1"] > 0 and r["ms_batch_n"] > 0 for r in curve)
    png = (project / "outputs/evaluate/accuracy_vs_time.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    client_run = trained_run(f"sqlite:///{project / 'mlflow.db'}", project)
    logged = client_run.data.metrics
    assert all(f"test/time_{key}_measured_ms" in logged for key in keys)


def test_a_time_budget_beyond_the_last_exit_stops_calibrate_in_one_line(project):
    profile = ExitProfile.from_json(read_json(project / "outputs/profile/exit_costs.json"))
    too_slow = round(2 * profile.ms[BATCH_N][-1] + 1, 1)
    set_params(project, **{"calibrate.budgets_ms.batch_n": [too_slow]})
    result = run(["dvc", "repro", "calibrate"], project)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "calibrate.budgets_ms.batch_n" in errors[0] and "above the last exit" in errors[0]
