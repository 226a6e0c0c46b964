"""A real multi-node Ray cluster on this machine: two `ray start` nodes (two raylets with their own
CPUs), an `mlflow server`, and the train stage joining them through RAY_ADDRESS.

Ray and MLflow listen on 127.0.0.1 only, the nodes share one auth token, and each node is a
process group of its own, so a node can be lost for real (SIGKILL of all its processes) while
training runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, mlflow_server, needs_data, trained_run
from helpers.cluster import Driver, LoopbackCluster, cluster_project, is_loopback, loopback_cluster

from pipeline.config import load_params
from pipeline.io import read_json


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[LoopbackCluster, str, int]]:
    """A head and a worker node (one CPU each) and an `mlflow server` (its URI and process
    group), all on 127.0.0.1."""
    with (
        loopback_cluster(("head_node", 1), ("worker_node", 1)) as cluster,
        mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as (uri, server),
    ):
        yield cluster, uri, server.pid


def _logged_epochs(repo: Path, uri: str, history: list[dict]) -> None:
    """The run holds every epoch's metrics once, equal to the history's; it stays RUNNING
    after the train stage (evaluate finishes it)."""
    from mlflow import MlflowClient

    run = trained_run(uri, repo)
    client = MlflowClient(uri)
    assert run.info.status == "RUNNING"
    epochs = [r["epoch"] for r in history]
    for key, value in (
        ("val/top1_exit_4", lambda r: r["val_top1"][3]),
        ("train/loss_exit_1", lambda r: r["train_loss"][0]),
        ("val/mean_top1", lambda r: r["val_mean_top1"]),
        ("train/lr", lambda r: r["lr"]),
    ):
        logged = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in logged] == epochs, key
        assert [m.value for m in logged] == pytest.approx([value(r) for r in history]), key


@pytest.mark.slow
def test_a_local_train_stage_keeps_ray_on_loopback(tmp_path):
    """Without RAY_ADDRESS the stage starts its own Ray; it must set the loopback switch before
    anything imports Ray, or Ray listens on every interface. Importing the stage imports no
    Ray; running it (here it stops at once: no dataset in an empty folder) sets the switch
    before its first import of Ray."""
    check = (
        "import sys, stages.train; assert 'ray' not in sys.modules, 'importing the stage'\n"
        "try: stages.train.main()\n"
        "except FileNotFoundError: pass\n"
        "assert 'ray' in sys.modules, 'the stage stopped before importing ray'\n"
        "import ray._private.ray_constants as c\n"
        "assert not c.ENABLE_RAY_CLUSTER, 'ray was imported before rayenv.prepare_ray()'"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_stop_while_the_local_cluster_starts_leaves_nothing_behind(tmp_path):
    """SIGTERM (Ctrl-C alike) while `ray.init` is still starting the local cluster, as when
    `boostpipe study` stops a queued run the moment it starts: no Ray process and no session
    folder of the cluster remain. (Ray names the folder after the process that starts it.)"""
    import psutil
    from ray._common.utils import get_default_ray_temp_dir  # where the pipeline looks too

    driver = (
        "import time\n"
        "from pipeline.rayenv import prepare_ray\n"
        "prepare_ray()\n"
        "from pipeline.cluster import ray_session\n"
        "with ray_session():\n"
        "    time.sleep(300)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    process = subprocess.Popen(
        [sys.executable, "-c", driver], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}
    )
    folders = Path(get_default_ray_temp_dir())
    try:
        deadline = time.monotonic() + 120
        while not list(folders.glob(f"session_*_{process.pid}")):
            assert process.poll() is None and time.monotonic() < deadline, "no session began"
            time.sleep(0.05)
        started = psutil.Process(process.pid).children(recursive=True)
        process.terminate()
        process.wait(timeout=60)
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, alive
        assert not list(folders.glob(f"session_*_{process.pid}"))
    finally:
        process.kill()


@pytest.mark.slow
@needs_data
def test_ddp_on_two_nodes_survives_losing_one(stack, tmp_path):
    """DDP workers train on both nodes, on loopback. The worker node dies (SIGKILL to all its
    processes) after the first checkpoint. With 2 workers of 1 CPU and only the head's CPU
    left, the restart waits for capacity: a fresh node joins, as an autoscaler or operator
    would start one, and Ray Train (FailureConfig) restarts both workers from that checkpoint.
    Each epoch is trained, recorded and logged once."""
    cluster, uri, server = stack
    before = cluster.wait_for("head_node", "worker_node")
    repo = cluster_project(tmp_path / "repo", train_subset=4000, epochs=3)
    driver = Driver(repo, cluster, uri, server)
    try:
        driver.wait_for_checkpoint()
        cluster.kill("worker_node")
        killed_at = time.monotonic()
        cluster.start_node("worker_node", 1)
        output = driver.wait()
        print(f"finished {time.monotonic() - killed_at:.0f} s after the node was killed")
    finally:
        driver.stop()
    after = cluster.wait_for("head_node", "worker_node")
    assert after["worker_node"] != before["worker_node"]

    resumed = re.search(r"resuming after epoch (\d+)", output)
    assert resumed, output[-6000:]
    done = int(resumed.group(1))
    assert 1 <= done < 3
    history = read_json(repo / "outputs/train/history.json")["epochs"]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for record in history:
        worker = before["worker_node"] if record["epoch"] <= done else after["worker_node"]
        assert sorted(record["nodes"]) == sorted([before["head_node"], worker]), record
    _logged_epochs(repo, uri, history)
    assert "2 worker(s) on Ray node(s)" in output
    n_exits = load_params(repo / "params.yaml").model.n_exits
    assert len(history[0]["val_top1"]) == n_exits
    assert all(v > 15 for v in history[0]["val_top1"])  # 10: chance
    print("listening while the stage ran:", *sorted(driver.listeners), sep="\n  ")
    # torch.distributed's TCPStore (the DDP rendezvous Ray Train opens in rank 0, once per
    # attempt: twice here) listens on the wildcard address whatever MASTER_ADDR says; everything
    # else must stay on loopback. (A process's title changes as Ray hands it work: one socket
    # may be seen under two titles.)
    exposed: dict[tuple[str, int], list[str]] = {}
    for address, port, title in driver.listeners:
        if not is_loopback(address):
            exposed.setdefault((address, port), []).append(title)
    assert len(driver.listeners) > 10 and len(exposed) <= 2, exposed
    for titles in exposed.values():
        assert any("RayTrainWorker" in title for title in titles), exposed


@pytest.mark.slow
@needs_data
def test_a_tune_search_runs_on_the_cluster(stack, tmp_path):
    """`boostpipe tune` through RAY_ADDRESS: two one-CPU trials at once, on a cluster whose two
    nodes have one CPU each, so one trial runs on each node; every trial reaches the server."""
    from mlflow import MlflowClient

    cluster, uri, server = stack
    repo = cluster_project(tmp_path / "repo", train_subset=1000, epochs=1)
    for command in (
        ("dvc", "repro", "prepare"),
        ("boostpipe", "tune", "--max-concurrent", "2", "--no-confirm"),
    ):
        driver = Driver(repo, cluster, uri, server, command=command)
        try:
            output = driver.wait()
        finally:
            driver.stop()
    assert "2 trials: 2 finished" in output, output[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("boostpipe").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="attributes.run_name LIKE 'tune-%'")
    children = client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c.data.tags["tune.outcome"] == "finished" for c in children)
    exposed = [row for row in driver.listeners if not is_loopback(row[0])]
    assert not exposed, exposed  # no DDP here: nothing at all beyond loopback
