"""The Ray cluster a stage or a search runs on: the local cluster's whole lifecycle (started on
loopback, signals, its processes and /tmp folder cleaned up after), or the one in RAY_ADDRESS
joined; and how many training workers of what kind the cluster holds."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import ray

from pipeline.config import ConfigError, Params
from pipeline.interrupts import as_ctrl_c
from pipeline.rayenv import check_prepared
from pipeline.verbosity import quiet_driver

AUTO_CPU_WORKERS = 2  # two 1-thread DDP workers beat one 2-thread worker on 2 cores


def require_resources(
    what: str, key: str, workers: int, per_worker: float, kind: str, have: float, extra: float = 0
) -> None:
    """A Ray job asking for more than the whole cluster has would wait forever: refuse it at
    once, naming the key that asked and what the cluster holds."""
    needed = workers * per_worker + extra
    if needed > have + 1e-9:
        raise ConfigError(
            f"{key}: {what} needs {needed:g} {kind}s ({workers} worker(s) x {per_worker:g}) "
            f"but the Ray cluster has {have:g}"
        )


@dataclass(frozen=True)
class Layout:
    """How a training run sits on the cluster: its number of workers, on GPUs or not."""

    workers: int
    use_gpu: bool


def worker_layout(params: Params, cluster: dict[str, float]) -> Layout:
    """Resolve `auto` against the cluster: one worker per GPU when it has GPUs, else the CPU
    layout; then refuse any layout the cluster cannot hold (training would hang in Ray)."""
    scaling = params.train.scaling
    gpus = cluster.get("GPU", 0.0)
    use_gpu = gpus > 0 if scaling.use_gpu == "auto" else bool(scaling.use_gpu)
    workers = scaling.workers
    if workers == "auto":
        fit_cpus = int(cluster.get("CPU", 0.0) // scaling.cpus_per_worker)
        workers = max(1, int(gpus) if use_gpu else min(AUTO_CPU_WORKERS, fit_cpus))
    key = "train.scaling.workers" if scaling.workers != "auto" else "train.scaling.use_gpu"
    if use_gpu:
        require_resources("training", key, workers, 1, "GPU", gpus)
    cpu_key = "train.scaling.cpus_per_worker" if scaling.workers == "auto" else key
    require_resources(
        "training", cpu_key, workers, scaling.cpus_per_worker, "CPU", cluster.get("CPU", 0.0)
    )
    return Layout(workers, use_gpu)


# Where Ray's state API (the placement-group cleaner's) finds the cluster. Without it the
# cleaner looks for "the" cluster on the machine and, while another command's local cluster
# runs, fails with a traceback ("Found multiple active Ray instances").
API_SERVER = "RAY_API_SERVER_ADDRESS"


def free_port() -> int:
    """A TCP port free on loopback now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def ray_session() -> Iterator[None]:
    """Ray for a stage or a search, until the block ends however it ends: SIGTERM stays Ctrl-C
    while Ray runs (`ray.init` would make it a bare exit), `ray.shutdown()` runs on an
    interruption too (so the cluster's processes go with us), and the session folder of a
    local cluster we started (under /tmp/ray) is removed after it stops."""
    kwargs = ray_init_kwargs()
    quiet_driver()  # after `import ray`, which sets its loggers' levels
    previous = signal.getsignal(signal.SIGTERM)
    api_server = os.environ.get(API_SERVER)
    if "dashboard_port" in kwargs:  # inherited by the cluster's processes, ours until the end
        os.environ[API_SERVER] = f"http://127.0.0.1:{kwargs['dashboard_port']}"
    main_thread = threading.current_thread() is threading.main_thread()
    session = None
    try:  # a stop while the cluster starts is cleaned up too (its processes, its folder)
        session = ray.init(**kwargs).address_info.get("session_dir")
        if main_thread:
            signal.signal(signal.SIGTERM, as_ctrl_c)
        yield
    finally:
        started = psutil.Process().children(recursive=True) if "address" not in kwargs else []
        ray.shutdown()
        _stop_leftovers(started)
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if "dashboard_port" in kwargs:
            os.environ.pop(API_SERVER, None)
            if api_server is not None:
                os.environ[API_SERVER] = api_server
        if "address" not in kwargs:  # never another cluster's folder
            for folder in [Path(session)] if session else _sessions_started_here():
                remove_session(folder)


def _sessions_started_here() -> list[Path]:
    """The folder of a local cluster whose start was stopped before `ray.init` returned it:
    Ray names a session after the process that starts the cluster."""
    from ray._common.utils import get_default_ray_temp_dir

    return sorted(Path(get_default_ray_temp_dir()).glob(f"session_*_{os.getpid()}"))


def _stop_leftovers(processes: list[psutil.Process], grace_s: float = 2.0) -> None:
    """After `ray.shutdown()`, the local cluster's processes that are still running (a busy
    Train worker can outlive its raylet for tens of seconds): SIGTERM, then SIGKILL after
    `grace_s`. Only processes this stage started, found by PID before the shutdown."""
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for process in alive:
        with suppress(psutil.Error):
            process.kill()


def remove_session(session: Path) -> None:
    """A stopped local cluster's session folder, and `session_latest` if it points there."""
    latest = session.parent / "session_latest"
    if latest.is_symlink() and latest.resolve() == session.resolve():
        latest.unlink(missing_ok=True)
    for _ in range(3):  # a process on its way out may still write a log file into it
        shutil.rmtree(session, ignore_errors=True)
        if not session.exists():
            return
        time.sleep(1.0)


def ray_init_kwargs() -> dict[str, Any]:
    """Join the cluster in RAY_ADDRESS, else start a local one that listens on loopback only
    (`rayenv.prepare_ray()` must have run before `import ray`)."""
    check_prepared()
    if os.environ.get("RAY_ADDRESS"):
        return {"address": os.environ["RAY_ADDRESS"]}
    # The Train controller polls its workers every 2 s by default; on short CPU runs that is
    # ~10 s of idle start-up and tear-down. Local clusters inherit this from the driver.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # No spot-instance preemption on one machine; Train's watcher for it logs an ERROR line
    # (its constructor arguments live in the object store) to the console on every run.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return {
        "num_cpus": os.cpu_count(),
        # Train's placement-group cleaner asks the dashboard's state API about the controller;
        # without it every check logs a failure. It listens on 127.0.0.1 only, on a port we
        # pick so that the cleaner can be told which cluster is ours (API_SERVER).
        "include_dashboard": True,
        "dashboard_port": free_port(),
        "configure_logging": False,
    }
