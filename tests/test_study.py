"""`boostpipe study`: variants x seeds as DVC queue experiments, summarised with paired t
intervals. The statistics are checked against SciPy directly; the command end to end on real
DVC, Ray and MLflow, through an interruption and a resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import command_env, needs_data, processes_in, queue_statuses, run, shrunk_copy
from scipy import stats

from pipeline.study_report import RunResult, seeds_to_resolve, summarise


def _scipy_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    half = stats.t.ppf(0.975, n - 1) * stats.tstd(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def test_the_summary_is_scipys_paired_t_interval_with_a_verdict():
    a = [80.0, 81.0, 79.5, 80.5]
    b = [78.0, 80.5, 79.0, 78.5]
    flat = [70.0, 70.0, 70.0, 70.0]
    results = [
        RunResult(variant, seed, f"s-{variant}-s{seed}", {"exit_1": values[seed], "exit_2": 70.0})
        for variant, values in (("a", a), ("b", b), ("c", flat))
        for seed in range(4)
    ]
    (row, same), variants = summarise(results, ["a", "b", "c"]), ["a", "b", "c"]
    assert row.mean["a"] == pytest.approx(80.25) and row.sd["b"] == pytest.approx(stats.tstd(b))
    mean, low, high = _scipy_interval(b, a)
    assert (row.diff["b"], row.low["b"], row.high["b"]) == pytest.approx((mean, low, high))
    assert row.verdict["b"] == ("worse" if high < 0 else "not distinguishable")
    assert row.verdict["c"] == "worse"  # 10 points below at every seed
    assert same.verdict["b"] == "not distinguishable" and same.seeds_needed["b"] is None
    assert list(same.mean) == variants


def test_seeds_to_resolve_is_the_first_n_whose_interval_excludes_zero():
    diffs = [1.0, -0.5, 1.5, 0.2]
    n = seeds_to_resolve(diffs)
    mean, spread = sum(diffs) / 4, stats.tstd(diffs)
    assert stats.t.ppf(0.975, n - 1) * spread / math.sqrt(n) < mean
    assert stats.t.ppf(0.975, n - 2) * spread / math.sqrt(n - 1) >= mean


@needs_data
@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("t=boost.nonsense=1", "boost.nonsense"),
        ("t=nowhere.key=1", "nowhere"),
        ("t=boost.temperature", "'boost.temperature' is not key=value"),
        ("bad name=boost.temperature=1", "--variant 'bad name"),
    ],
)
def test_a_bad_variant_fails_in_one_line_before_anything_is_queued(tmp_path, variant, expected):
    repo = shrunk_copy(tmp_path)
    result = run([sys.executable, "-m", "pipeline", "study", "--variant", variant], repo)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert queue_statuses(repo) == {}
    assert not (repo / "outputs/study").exists()


@pytest.mark.slow
@needs_data
def test_a_study_interrupted_and_resumed_runs_each_seed_once_with_scipys_intervals(tmp_path):
    """`boostpipe study --seeds 2` on shrunk data (BoostNet against the baseline, 4 DVC queue
    experiments): one at a time, Ctrl-C once a run has finished (the run after it is killed
    as it starts, not as it ends); then the same command, 2 at a time. The resume queues only
    the missing runs; the summary's intervals are SciPy's on the runs' recorded metrics; the
    MLflow parent holds every run as a child; nothing is left running. It is also the test of
    DVC's parallel queue (`dvc exp run --queue -S seed=...` run by `dvc queue start -j 2`):
    experiments succeed beside another, with their metrics in `dvc exp show` and a FINISHED
    MLflow run named after each, each with a local Ray cluster of its own."""
    from mlflow import MlflowClient

    repo = shrunk_copy(tmp_path).resolve()
    command = [
        *(sys.executable, "-m", "pipeline", "study", "--seeds", "2", "--name", "t"),
        *("--set", "train.epochs=1", "--set", "data.train_subset=300"),
    ]
    names = [f"t-{v}-s{s}" for v in ("boostnet", "baseline") for s in (0, 1)]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        [*command, "--jobs", "1"],
        cwd=repo,
        env=command_env(),
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    deadline = time.monotonic() + 900
    while "Success" not in queue_statuses(repo).values():
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, queue_statuses(repo)
        time.sleep(2)
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in its terminal
    assert first.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()
    statuses = queue_statuses(repo)
    assert "Running" not in statuses.values() and "Queued" not in statuses.values(), statuses
    done_before = sorted(n for n, status in statuses.items() if status == "Success")

    second = run([*command, "--jobs", "2"], repo)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{len(done_before)} of 4 runs finished earlier" in second.stdout, second.stdout

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    recorded = {
        rev["name"]: rev["data"]["metrics"]["outputs/evaluate/metrics.json"]["data"]
        for base in shown
        for experiment in base.get("experiments") or []
        for rev in experiment["revs"]
    }
    assert sorted(recorded) == sorted(names)
    folder = repo / "outputs/study/t"
    summary = json.loads((folder / "summary.json").read_text())
    rows = {row["name"]: row for row in summary["rows"]}
    for row_name, row in rows.items():

        def top1(variant: str, name: str = row_name) -> list[float]:
            return [_top1(recorded[f"t-{variant}-s{seed}"], name) for seed in (0, 1)]

        mean, low, high = _scipy_interval(top1("baseline"), top1("boostnet"))
        got = (row["diff"]["baseline"], row["low"]["baseline"], row["high"]["baseline"])
        assert got == pytest.approx((mean, low, high)), row_name
    assert {f"exit_{k}" for k in range(1, 6)} <= set(rows)
    assert (folder / "accuracy_vs_cost.png").read_bytes()[:4] == b"\x89PNG"
    assert len((folder / "runs.csv").read_text().splitlines()) == 1 + 4

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("boostpipe").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.`boostpipe.study` = 't'")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["baseline_vs_boostnet/exit_5_low"] == pytest.approx(
        rows["exit_5"]["low"]["baseline"]
    )
    children = client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(r.data.tags["dvc.experiment"] for r in children) == sorted(names)
    assert sorted(r.info.run_name for r in children) == sorted(names)  # named as in DVC
    assert all(r.info.status == "FINISHED" for r in children)
    for name in done_before:  # never trained twice
        assert len([r for r in children if r.info.run_name == name]) == 1

    deadline = time.monotonic() + 60  # DVC's queue workers stop once the queue is empty
    while (left := processes_in(repo)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, left


def _top1(metrics: dict, row: str) -> float:
    if row.startswith("exit_"):
        return metrics["anytime"]["top1"][row]
    return metrics["budgets"][row]["top1"]


def test_seeds_to_resolve_a_tiny_difference_is_large_and_found_at_once():
    diffs = [0.001, -0.5, 0.5, 0.002]
    n = seeds_to_resolve(diffs)
    mean, spread = sum(diffs) / 4, stats.tstd(diffs)
    assert n > 10_000
    assert stats.t.ppf(0.975, n - 1) * spread / math.sqrt(n) < mean
    assert stats.t.ppf(0.975, n - 2) * spread / math.sqrt(n - 1) >= mean
