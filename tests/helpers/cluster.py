"""A real multi-node Ray cluster on this machine: `ray start` nodes (raylets with their own CPUs)
on 127.0.0.1 sharing one auth token, each node a process group of its own, so a node can be
lost for real (SIGKILL of all its processes) while training runs; and `dvc repro` joined to it
through RAY_ADDRESS."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
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

from helpers.project import ROOT, set_params, shrunk_copy
from pipeline.cluster import free_port, remove_session

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


def cluster_project(root: Path, train_subset: int, epochs: int) -> Path:
    """The shrunk copy of this repository, training two one-CPU DDP workers."""
    repo = shrunk_copy(root)
    set_params(
        repo,
        **{"data.train_subset": train_subset, "train.epochs": epochs},
        **{"train.scaling.workers": 2, "train.scaling.cpus_per_worker": 1},
        **{"train.scaling.use_gpu": False},
    )
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


@contextlib.contextmanager
def one_gpu_cluster() -> Iterator[dict[str, float]]:
    """A real local Ray cluster in this process that declares one logical GPU (no hardware
    needed), its workers importing from tests/ too; yields its resources. Its session folder
    under /tmp/ray goes with it, as the pipeline's own local clusters' do."""
    import ray

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)
        patch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
        info = ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, configure_logging=False)
        try:
            yield ray.cluster_resources()
        finally:
            ray.shutdown()
            remove_session(Path(info.address_info["session_dir"]))
