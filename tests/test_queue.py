"""DVC's experiment queue run with two jobs: seeds and sweeps the way DVC users run them."""

from __future__ import annotations

import json
import time

import pytest
from helpers import needs_data, processes_in, queue_statuses, run, shrunk_copy


@pytest.mark.slow
@needs_data
def test_two_queued_experiments_run_at_once_and_both_land(tmp_path):
    """Two experiments queued with `dvc exp run --queue -S seed=...` and run by `dvc queue
    start -j 2`: both succeed (the tracking store is created once, each has its own local Ray
    cluster), both show in `dvc exp show` with their metrics and in MLflow as FINISHED runs
    named after the experiments, and no process is left behind."""
    from mlflow import MlflowClient

    repo = shrunk_copy(tmp_path).resolve()
    names = ("seed1", "seed2")
    smaller = ("-S", "data.train_subset=300", "-S", "data.test_subset=200")
    for seed, name in enumerate(names, start=1):
        queue = ["dvc", "exp", "run", "--queue", "-n", name, "-S", f"seed={seed}", *smaller]
        queued = run(queue, repo)
        assert queued.returncode == 0, queued.stdout + queued.stderr
    started = run(["dvc", "queue", "start", "-j", "2"], repo)
    assert started.returncode == 0, started.stdout + started.stderr
    deadline = time.monotonic() + 900
    while any(status in {"Queued", "Running"} for status in queue_statuses(repo).values()):
        assert time.monotonic() < deadline, queue_statuses(repo)
        time.sleep(2)
    statuses = queue_statuses(repo)
    if set(statuses.values()) != {"Success"}:
        logs = {name: run(["dvc", "queue", "logs", name], repo).stdout[-3000:] for name in names}
        pytest.fail(f"{statuses}\n{logs}")
    assert sorted(statuses) == sorted(names)

    shown = run(["dvc", "exp", "show", "--json"], repo)
    assert shown.returncode == 0, shown.stderr
    experiments = {
        rev["name"]: rev["data"]["metrics"]
        for base in json.loads(shown.stdout)
        for experiment in base.get("experiments") or []
        for rev in experiment["revs"]
    }
    assert sorted(experiments) == sorted(names)
    for metrics in experiments.values():
        assert "final_top1" in metrics["outputs/evaluate/metrics.json"]["data"]

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("boostpipe").experiment_id])
    assert sorted(r.data.tags.get("dvc.experiment") for r in runs) == sorted(names)
    assert sorted(r.info.run_name for r in runs) == sorted(names)
    assert all(r.info.status == "FINISHED" for r in runs)

    deadline = time.monotonic() + 60  # DVC's queue workers stop once the queue is empty
    while (left := processes_in(repo)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, left
