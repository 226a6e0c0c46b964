"""A study in MLflow: one parent run per study name, the training run of each of its DVC
experiments as a child (MLflow's `mlflow.parentRunId` tag, so the UI nests and compares them),
and the summary as the parent's metrics and artifacts."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pipeline.config import Params
from pipeline.tracking.logs import log_artifacts, log_metrics
from pipeline.tracking.store import connect

STUDY_TAG = "boostpipe.study"
PARENT_TAG = "mlflow.parentRunId"


def study_parent(params: Params, name: str, settings: dict[str, str]) -> str:
    """The study's parent run, RUNNING: the one an earlier attempt made, else a new one."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    experiment_id = connect(params)
    client = MlflowClient()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{name}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment_id, run_name=f"study-{name}", tags={STUDY_TAG: name})
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in settings.items()])
    return run.info.run_id


def adopt(params: Params, parent: str, experiments: Iterable[str]) -> dict[str, str]:
    """Make the training run of each DVC experiment a child of `parent`; returns experiment ->
    run id for those the store has (a run restored from DVC's run-cache is found by what it
    trained, as `boostpipe compare` finds it)."""
    from mlflow import MlflowClient

    from pipeline.tracking.lookup import RunNotFound, find_run

    experiment_id = connect(params)
    client = MlflowClient()
    children = {}
    for name in experiments:
        try:
            run = find_run(client, experiment_id, name)
        except RunNotFound:
            continue
        client.set_tag(run.info.run_id, PARENT_TAG, parent)
        children[name] = run.info.run_id
    return children


def log_study(parent: str, metrics: dict[str, float], files: list[Path]) -> None:
    """The summary on the parent, which is then FINISHED."""
    from mlflow import MlflowClient

    log_metrics(parent, ((key, value, 0) for key, value in metrics.items()))
    log_artifacts(parent, files)
    MlflowClient().set_terminated(parent, "FINISHED")
