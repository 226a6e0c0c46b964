"""`boostpipe tune` figures on this machine: wall time of a search, the MLflow runs it left, the
best objective against the params file's, and what Ray and MLflow cost each trial.

Run from the project root after `dvc repro prepare`, with the venv's bin on PATH:
    python benchmarks/tune_search.py            # the default search (tune.trials from params)
    python benchmarks/tune_search.py --trials 8

A trial's overhead is its MLflow run's wall time (the driver opens it when Tune starts the
trial and closes it when the trial ends) minus the time the trial spent training and scoring
(its reported `train_seconds` and `score_seconds`), divided by its training time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from mlflow import MlflowClient

from pipeline.config import load_params
from pipeline.tracking import tracking_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int)
    args = parser.parse_args()
    command = ["boostpipe", "tune"] + (["--trials", str(args.trials)] if args.trials else [])
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    print(result.stdout[-3000:])
    params = load_params("params.yaml")
    metric = params.tune.metric
    client = MlflowClient(tracking_uri(params))
    experiment = client.get_experiment_by_name(params.tracking.experiment).experiment_id
    (parent,) = client.search_runs(
        [experiment],
        filter_string="attributes.run_name LIKE 'tune-%'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    children = client.search_runs(
        [experiment],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        max_results=1000,
    )
    outcomes = [c.data.tags.get("tune.outcome") for c in children]
    print(f"{' '.join(command)}: {wall:.0f} s wall (target <= 600 s)")
    print(
        f"MLflow: parent {parent.info.run_id}, {len(children)} child runs "
        f"({outcomes.count('finished')} finished, {outcomes.count('stopped_early')} stopped "
        f"early, {outcomes.count('failed')} failed)"
    )
    best, default = (parent.data.metrics.get(f"{k}_{metric}") for k in ("best", "default"))
    print(f"{metric}: best {best:.2f}, params file's values {default:.2f}")
    ratios = []
    for child in children:
        work = sum(
            m.value
            for key in ("train_seconds", "score_seconds")
            for m in client.get_metric_history(child.info.run_id, key)
        )
        trained = sum(
            m.value for m in client.get_metric_history(child.info.run_id, "train_seconds")
        )
        if trained and child.info.end_time:
            wall_ms = child.info.end_time - child.info.start_time
            ratios.append((wall_ms / 1000 - work) / trained)
    print(
        f"Ray + MLflow overhead per trial (share of its training time): median "
        f"{100 * statistics.median(ratios):.1f}%, max {100 * max(ratios):.1f}% "
        f"over {len(ratios)} trials (target <= 10%)"
    )


if __name__ == "__main__":
    main()
