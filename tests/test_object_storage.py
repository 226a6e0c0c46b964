"""A cluster without a shared filesystem: two Ray nodes on 127.0.0.1, the second in a mount
namespace where the test's folder (the project, its data, its `.boostpipe`) is covered by an
empty tmpfs, as on another machine; a real S3 server (moto's, on 127.0.0.1) holds what Ray
keeps. Training needs two one-CPU workers and each node has one CPU, so one worker always runs
on the node that cannot see the project."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from helpers import mlflow_server, needs_data, s3_server, set_params
from helpers.cluster import Driver, cluster_project, loopback_cluster

from pipeline.io import read_json

pytestmark = [  # what the cluster needs; each test's own line says it is slow
    needs_data,
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare"),
]

BUCKET = "boostpipe"


def _can_hide() -> bool:
    """Whether this user may cover a folder in a private mount namespace (root may)."""
    check = ["unshare", "--mount", "sh", "-c", "mount -t tmpfs none /mnt"]
    return subprocess.run(check, capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 with one bucket; the AWS variables every node and driver
    gets, as a cluster's nodes get their credentials from their environment."""
    with s3_server(tmp_path_factory.mktemp("s3"), BUCKET) as env:
        yield env


def _bucket(env: dict[str, str], **options) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        endpoint_override=env["AWS_ENDPOINT_URL"],
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        region=env["AWS_DEFAULT_REGION"],
        **options,
    )


@pytest.fixture(scope="module")
def hidden(tmp_path_factory) -> Path:
    """Where the tests put their projects: a folder the worker node cannot see."""
    return tmp_path_factory.mktemp("hidden")


@pytest.fixture(scope="module")
def hidden_cluster(s3, hidden):
    """A head node (sees everything) and a worker node that cannot see `hidden`."""
    if not _can_hide():
        pytest.skip("cannot make a private mount namespace here (needs root)")
    with loopback_cluster(
        ("head_node", 1), ("worker_node", 1), hide={"worker_node": hidden}, **s3
    ) as cluster:
        yield cluster


def _set_storage(repo: Path, storage: str | None) -> None:
    set_params(repo, **{"ray.storage": storage})
    subprocess.run(["git", "commit", "-qam", "storage"], cwd=repo, check=True)


def _snapshots(bucket: pafs.S3FileSystem, prefix: str) -> dict[str, dict]:
    """Ray Train's checkpoint-manager snapshots under the prefix, by run folder."""
    found = {}
    selector = pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
    for info in bucket.get_file_info(selector):
        if info.base_name == "checkpoint_manager_snapshot.json":
            with bucket.open_input_stream(info.path) as source:
                found[info.path.rsplit("/", 2)[-2]] = json.loads(source.read())
    return found


@pytest.mark.slow
def test_a_search_keeps_its_state_in_s3_and_resumes_after_ctrl_c(
    hidden_cluster, s3, tracking_server, hidden, tmp_path
):
    """`boostpipe tune` on the same cluster with `ray.storage: s3://...`: Ctrl-C after two of
    four trials, and `--resume` restores the search from the bucket and runs the other two."""
    from mlflow import MlflowClient

    cluster = hidden_cluster
    cluster.wait_for("head_node", "worker_node")
    repo = cluster_project(hidden / "search", train_subset=1200, epochs=1)
    set_params(
        repo,
        **{"ray.storage": f"s3://{BUCKET}/searches"},
        **{"data.val_size": 300, "data.test_subset": 100},
        **{"tune.trials": 4, "tune.epochs": 1, "tune.train_subset": 300},
        **{"tune.val_subset": 200, "tune.scheduler": "fifo"},
        **{"tune.confirm": {"top_k": 0, "seeds": 2}},
    )
    env = {**cluster.env, **s3, "MLFLOW_TRACKING_URI": tracking_server}
    subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=repo, env=env, check=True)
    client = MlflowClient(tracking_server)

    def ended() -> list:
        experiment = client.get_experiment_by_name("boostpipe")
        if experiment is None:
            return []
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        return [r for r in runs if "tune.outcome" in r.data.tags]

    log = tmp_path / "tune.log"
    with log.open("w") as out:
        driver = subprocess.Popen(
            ["boostpipe", "tune"],
            cwd=repo,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while len(ended()) < 2:
            assert driver.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no trial ended"
            time.sleep(1)
        os.kill(driver.pid, signal.SIGINT)  # Ctrl-C: Tune saves its state (to S3) and returns
        assert driver.wait(timeout=120) == 130, log.read_text()[-4000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    bucket = _bucket(s3)
    stored = bucket.get_file_info(pafs.FileSelector(f"{BUCKET}/searches", recursive=True))
    assert any(info.base_name == "tuner.pkl" for info in stored)
    assert not list((repo / ".boostpipe/tune").glob("tune-*/tuner.pkl"))  # nothing on our disk

    result = subprocess.run(
        ["boostpipe", "tune", "--resume"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trials = ended()
    assert len(trials) == 4 and all(r.data.tags["tune.outcome"] == "finished" for r in trials)
    assert "Traceback" not in result.stdout + result.stderr


def _checkpointed(bucket: pafs.S3FileSystem) -> bool:
    return any(s.get("latest_checkpoint_result") for s in _snapshots(bucket, "runs").values())


@pytest.mark.slow
def test_training_checkpoints_to_s3_and_resumes_on_a_node_that_cannot_see_the_project(
    hidden_cluster, s3, tracking_server, hidden
):
    """`dvc repro train` with `ray.storage: s3://...`: one worker on the node that cannot see the
    project, checkpoints in the bucket and none on the project's disk; the whole `dvc repro` is
    killed (SIGKILL) after a checkpoint, and the next one resumes from the bucket."""
    cluster = hidden_cluster
    nodes = cluster.wait_for("head_node", "worker_node")
    repo = cluster_project(hidden / "resumed", train_subset=2500, epochs=2)
    _set_storage(repo, f"s3://{BUCKET}/runs")
    bucket = _bucket(s3)
    driver = Driver(repo, cluster, tracking_server, **s3)
    try:
        deadline = time.monotonic() + 300
        while not _checkpointed(bucket):
            assert driver.poll() is None, driver.text()[-6000:]
            assert time.monotonic() < deadline, "no checkpoint reached the bucket"
            time.sleep(0.5)
        (run,) = _snapshots(bucket, "runs")
        stored = bucket.get_file_info(pafs.FileSelector(f"{BUCKET}/runs/{run}", recursive=True))
        assert any("checkpoint_" in info.path for info in stored)
        assert not list((repo / ".boostpipe/ray").glob("train-*/checkpoint_*"))
        driver.stop()  # the whole `dvc repro`, as a lost login or a dead driver machine would
        first = driver.text()

        again = Driver(repo, cluster, tracking_server, **s3)
        try:
            output = again.wait()
        finally:
            again.stop()
    finally:
        driver.stop()
    resumed = re.search(r"resuming after epoch (\d+)", output)
    assert resumed, first[-3000:] + output[-6000:]
    history = read_json(repo / "outputs/train/history.json")["epochs"]
    assert [r["epoch"] for r in history] == [1, 2]
    for record in history:
        assert sorted(record["nodes"]) == sorted(nodes.values()), record
    assert _snapshots(bucket, "runs") == {}  # a finished run's checkpoints are cleared
    assert "Traceback" not in output


@pytest.mark.slow
def test_local_storage_on_such_a_cluster_stops_at_once_naming_the_node_and_path(
    hidden_cluster, tracking_server, hidden
):
    """The same cluster with the default storage (a folder in the project): the run stops before
    any training with one line naming the node and the folder it cannot read."""
    cluster = hidden_cluster
    nodes = cluster.wait_for("head_node", "worker_node")
    repo = cluster_project(hidden / "local", train_subset=2000, epochs=1)
    started = time.monotonic()
    driver = Driver(repo, cluster, tracking_server)
    try:
        deadline = time.monotonic() + 300
        while driver.poll() is None:
            assert time.monotonic() < deadline, "the run did not stop"
            time.sleep(0.5)
    finally:
        driver.stop()
    output = driver.text()
    print(f"stopped {time.monotonic() - started:.0f} s after `dvc repro` started")
    assert driver.process.returncode != 0
    storage = (repo / ".boostpipe/ray").resolve()
    line = (
        f"worker on node 127.0.0.1 ({nodes['worker_node'][:8]}) cannot read {storage}: "
        "set ray.storage / data.root to storage every node can reach"
    )
    assert line in output, output[-4000:]
    assert "Traceback" not in output and "epoch 1" not in output, output[-4000:]
    assert not (repo / "outputs/train/model.pt").exists()


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> Iterator[str]:
    """An `mlflow server` on 127.0.0.1, where rank 0 logs each epoch from whichever node."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as (uri, _):
        yield uri
