"""A real multi-node Ray cluster on this machine: two `ray start` nodes (two raylets with their own
CPUs), an `mlflow server`, and the train stage joining them through RAY_ADDRESS.

Ray and MLflow listen on 127.0.0.1 only, the nodes share one auth token, and each node is a
process group of its own, so a node can be lost for real (SIGKILL of all its processes) while
training runs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import ROOT, trained_run
from test_pipeline import _serving, _shrunk_copy

from pipeline.config import load_params
from pipeline.data import DEBIAN_FASHION_MNIST
from pipeline.io import read_json
from pipeline.cluster import free_port

needs_data = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist (make data)"
)

BIN = Path(sys.executable).parent

# On Linux Ray rewrites 127.0.0.1 (in --node-ip-address and in --address) into the machine's
# routable address and then listens on every interface. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 stops
# that (rayenv.prepare_ray() sets it for local clusters), but `ray start --address` then refuses
# to join a cluster at all. This is the real `ray` command with only that refusal lifted.
RAY = [
    sys.executable,
    "-c",
    "import sys, types, ray._private.ray_constants as c, ray.scripts.scripts as cli; "
    "cli.ray_constants = types.SimpleNamespace(**{**vars(c), 'ENABLE_RAY_CLUSTER': True}); "
    "sys.argv[0] = 'ray'; cli.main()",
]


class LoopbackCluster:
    """Ray nodes started with `ray start --block`, each in its own process group and temp dir,
    all on 127.0.0.1 and sharing one token. `env` is what a driver needs to join."""

    def __init__(self, **env: str) -> None:
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.token = secrets.token_hex(32)
        self.env = dict(
            os.environ,
            PATH=f"{BIN}:{os.environ['PATH']}",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            GLOO_SOCKET_IFNAME="lo",  # DDP's gloo pairs: else the address the hostname resolves to
            # Ray's own processes look for "the" cluster on the machine when they are given no
            # address (Train's placement-group cleaner does): with others running, name ours.
            RAY_ADDRESS=self.address,
            **env,
        )
        self.nodes: dict[str, subprocess.Popen] = {}  # resource name -> `ray start` process
        self.logs: dict[str, Path] = {}
        self.temp_dirs: list[Path] = []

    def start_node(self, name: str, cpus: int, hide: Path | None = None) -> None:
        """A node offering `cpus` CPUs and one unit of the custom resource `name`; the first is
        the head. Ray's socket paths must stay under 108 characters: short temp dirs in /tmp.
        `hide`: a folder this node cannot see, as on another machine. The node runs in a mount
        namespace of its own where an empty tmpfs covers that folder (`unshare`, as root)."""
        temp = Path(tempfile.mkdtemp(prefix="bpray-", dir="/tmp"))
        self.temp_dirs.append(temp)
        common = [
            *("--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", f"--temp-dir={temp}"),
            *(f"--resources={json.dumps({name: 1})}", "--object-store-memory=300000000", "--block"),
            f"--dashboard-agent-listen-port={free_port()}",  # fixed 52365 unless given
        ]
        if not self.nodes:
            role = [
                *("--head", f"--port={self.port}", "--include-dashboard=true"),
                *("--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"),
                f"--ray-client-server-port={free_port()}",  # fixed 10001 unless given
            ]
        else:
            role = [f"--address={self.address}"]
        self.logs[name] = temp / "node.log"
        hiding = []
        if hide is not None:
            cover = 'mount -t tmpfs -o size=1m,mode=0700 hidden "$0" && exec "$@"'
            hiding = ["unshare", "--mount", "--propagation", "private", "sh", "-c", cover, hide]
        with self.logs[name].open("w") as log:
            self.nodes[name] = subprocess.Popen(
                [*hiding, *RAY, "start", *role, *common],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive_nodes(self) -> dict[str, list[str]]:
        """Custom resource name -> ids of the alive nodes offering it (the dashboard's state API;
        a killed node stays alive there until its missed heartbeats mark it dead)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.dashboard_port}/api/v0/nodes?limit=100",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            rows = json.load(response)["data"]["result"]["result"]
        alive: dict[str, list[str]] = {}
        for row in rows:
            for resource in row["resources_total"]:
                if row["state"] == "ALIVE" and resource in self.nodes:
                    alive.setdefault(resource, []).append(row["node_id"])
        return alive

    def wait_for(self, *names: str, timeout: float = 120) -> dict[str, str]:
        """Until each named node is the one alive node offering its resource; name -> node id."""
        deadline = time.monotonic() + timeout
        while True:
            for name, process in self.nodes.items():
                assert process.poll() is None, f"ray node {name} exited: {self.log(name)}"
            with contextlib.suppress(OSError, KeyError, ValueError):
                alive = self.alive_nodes()
                if all(len(alive.get(name, [])) == 1 for name in names):
                    return {name: alive[name][0] for name in names}
            assert time.monotonic() < deadline, f"nodes {names} did not join"
            time.sleep(0.5)

    def log(self, name: str) -> str:
        return self.logs[name].read_text()[-3000:]

    def tree(self, name: str) -> list[psutil.Process]:
        """The node's processes: its process group, and the descendants that left it (Ray's
        worker processes, the Ray Train workers among them, each lead a group of their own)."""
        root = self.nodes[name].pid
        found: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            found.update((p.pid, p) for p in psutil.Process(root).children(recursive=True))
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(process.pid) == root:
                    found[process.pid] = process
        return list(found.values())

    def processes(self) -> list[psutil.Process]:
        return [p for name in self.nodes for p in self.tree(name)]

    def kill(self, name: str) -> None:
        """Lose a node as if its machine died: SIGKILL to all of its processes at once."""
        process, tree = self.nodes[name], self.tree(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        for child in tree:
            with contextlib.suppress(psutil.Error):
                child.kill()
        process.wait(timeout=30)

    def close(self) -> None:
        for name in reversed(self.nodes):
            self.kill(name)
        for temp in self.temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)


def listening(pids: set[int]) -> set[tuple[str, int, str]]:
    """(address, port, process title) of every TCP socket the given processes listen on."""
    found = set()
    for socket in psutil.net_connections(kind="tcp"):
        if socket.status == psutil.CONN_LISTEN and socket.pid in pids:
            with contextlib.suppress(psutil.Error):
                title = " ".join(psutil.Process(socket.pid).cmdline())[:40]
                found.add((socket.laddr.ip, socket.laddr.port, title))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, how Ray's gRPC servers bind
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


class Driver:
    """`dvc repro train` in `repo`, joined to the cluster, in a process group of its own; every
    poll records what the cluster's and the driver's processes listen on."""

    def __init__(
        self,
        repo: Path,
        cluster: LoopbackCluster,
        tracking_uri: str,
        *groups: int,
        command: tuple[str, ...] = ("dvc", "repro", "train"),
        **extra_env: str,
    ) -> None:
        self.repo, self.cluster = repo, cluster
        self.output = repo.parent / f"{repo.name}-dvc.log"
        env = dict(
            cluster.env,
            RAY_ADDRESS=cluster.address,
            MLFLOW_TRACKING_URI=tracking_uri,
            RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25",
            **extra_env,
        )
        with self.output.open("w") as out:
            self.process = subprocess.Popen(
                list(command),
                cwd=repo,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.groups = {self.process.pid, *groups}  # also watched: e.g. the tracking server
        self.listeners: set[tuple[str, int, str]] = set()

    def poll(self) -> int | None:
        pids = {p.pid for p in self.cluster.processes()}
        for process in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(process.pid) in self.groups:
                    pids.add(process.pid)
        self.listeners.update(listening(pids))
        return self.process.poll()

    def wait(self, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            assert time.monotonic() < deadline, f"dvc repro ran over {timeout} s"
            time.sleep(1)
        text = self.text()
        assert self.process.returncode == 0, text[-6000:]
        return text

    def text(self) -> str:
        return self.output.read_text()

    def wait_for_checkpoint(self, timeout: float = 300) -> None:
        """Until Ray Train has registered a checkpoint of the run (its snapshot names one)."""
        deadline = time.monotonic() + timeout
        snapshots = self.repo / ".boostpipe/ray"
        while not any(
            _names_a_checkpoint(path)
            for path in snapshots.glob("train-*/checkpoint_manager_snapshot.json")
        ):
            assert self.poll() is None, self.text()[-6000:]
            assert time.monotonic() < deadline, "no checkpoint was registered"
            time.sleep(0.2)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def _names_a_checkpoint(snapshot: Path) -> bool:
    try:
        return bool(json.loads(snapshot.read_text()).get("latest_checkpoint_result"))
    except (OSError, ValueError):  # being written
        return False


def project(root: Path, train_subset: int, epochs: int) -> Path:
    """The shrunk copy of this repository, training two one-CPU DDP workers."""
    repo = _shrunk_copy(root)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["train_subset"] = train_subset
    params["train"]["epochs"] = epochs
    params["train"]["scaling"].update(workers=2, cpus_per_worker=1, use_gpu=False)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


@contextlib.contextmanager
def loopback_cluster(
    *nodes: tuple[str, int], hide: dict[str, Path] | None = None, **env: str
) -> Iterator[LoopbackCluster]:
    """The nodes started (the first is the head) and joined, each named node unable to see its
    folder in `hide`; every process gone afterwards."""
    cluster = LoopbackCluster(**env)
    try:
        for name, cpus in nodes:
            cluster.start_node(name, cpus, (hide or {}).get(name))
        cluster.wait_for(*(name for name, _ in nodes))
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[LoopbackCluster, str, int]]:
    """A head and a worker node (one CPU each) and an `mlflow server` (its URI and process
    group), all on 127.0.0.1."""
    store = tmp_path_factory.mktemp("mlflow-server")
    uri = f"http://127.0.0.1:{free_port()}"
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--workers", "1"),
        *("--port", uri.rsplit(":", 1)[1], "--backend-store-uri", f"sqlite:///{store}/db.sqlite"),
        *("--artifacts-destination", str(store / "artifacts")),
    ]
    with (
        loopback_cluster(("head_node", 1), ("worker_node", 1)) as cluster,
        _serving(command, f"{uri}/health", store) as server,
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
        ("val_top1_exit_4", lambda r: r["val_top1"][3]),
        ("train_loss_exit_1", lambda r: r["train_loss"][0]),
        ("val_mean_top1", lambda r: r["val_mean_top1"]),
        ("lr", lambda r: r["lr"]),
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
@needs_data
def test_ddp_workers_train_on_two_nodes(stack, tmp_path):
    cluster, uri, server = stack
    nodes = cluster.wait_for("head_node", "worker_node")
    repo = project(tmp_path / "repo", train_subset=2000, epochs=1)
    driver = Driver(repo, cluster, uri, server)
    try:
        output = driver.wait()
    finally:
        driver.stop()
    history = read_json(repo / "outputs/train/history.json")
    (epoch,) = history["epochs"]
    assert sorted(epoch["nodes"]) == sorted([nodes["head_node"], nodes["worker_node"]])
    assert "2 worker(s) on Ray node(s)" in output
    n_exits = load_params(repo / "params.yaml").model.n_exits
    assert len(epoch["val_top1"]) == n_exits and all(
        v > 15 for v in epoch["val_top1"]
    )  # 10: chance
    _logged_epochs(repo, uri, history["epochs"])
    print("listening while the stage ran:", *sorted(driver.listeners), sep="\n  ")
    # torch.distributed's TCPStore (the DDP rendezvous Ray Train opens in rank 0) listens on the
    # wildcard address whatever MASTER_ADDR says; everything else must stay on loopback.
    # (A process's title changes as Ray hands it work: one socket may be seen under two titles.)
    exposed: dict[tuple[str, int], list[str]] = {}
    for address, port, title in driver.listeners:
        if not is_loopback(address):
            exposed.setdefault((address, port), []).append(title)
    assert len(driver.listeners) > 10 and len(exposed) <= 1, exposed
    for titles in exposed.values():
        assert any("RayTrainWorker" in title for title in titles), exposed


@pytest.mark.slow
@needs_data
def test_training_survives_losing_a_node(stack, tmp_path):
    """The worker node dies (SIGKILL to all its processes) after the first checkpoint. With 2
    workers of 1 CPU and only the head's CPU left, the restart waits for capacity: a fresh node
    joins, as an autoscaler or operator would start one, and Ray Train (FailureConfig) restarts
    both workers from that checkpoint. Each epoch is trained, recorded and logged once."""
    cluster, uri, _ = stack
    before = cluster.wait_for("head_node", "worker_node")
    repo = project(tmp_path / "repo", train_subset=4000, epochs=3)
    driver = Driver(repo, cluster, uri)
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


@pytest.mark.slow
@needs_data
def test_a_tune_search_runs_on_the_cluster(stack, tmp_path):
    """`boostpipe tune` through RAY_ADDRESS: two one-CPU trials at once, on a cluster whose two
    nodes have one CPU each, so one trial runs on each node; every trial reaches the server."""
    from mlflow import MlflowClient

    cluster, uri, server = stack
    repo = project(tmp_path / "repo", train_subset=1000, epochs=1)
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
