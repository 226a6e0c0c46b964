"""Ray's process environment. Ray reads some settings once, when it is imported, so a command
that starts or joins a Ray cluster calls `prepare_ray()` before anything imports ray; nothing
in the library changes the environment on import."""

from __future__ import annotations

import os
from urllib.parse import urlparse

# Ray 2.60 starts (and addresses) a local cluster on the machine's routable address: it rewrites
# 127.0.0.1, so a driver can't even reach a cluster started on loopback, unless it treats the
# machine as single-node. Read at `import ray`; it keeps every Ray server we start on loopback
# (check with `ss -ltnp`).
SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _loopback() -> bool:
    """Whether the cluster is ours on this machine: none in RAY_ADDRESS, or one on loopback."""
    address = os.environ.get("RAY_ADDRESS", "").split("://")[-1]
    return urlparse("//" + address).hostname in (None, "127.0.0.1", "localhost")


def prepare_ray() -> None:
    """Set what Ray must read when it is imported (a value already set wins): call it first."""
    if _loopback():
        os.environ.setdefault(SINGLE_NODE, "0")


def check_prepared() -> None:
    """Refuse to start Ray when `prepare_ray()` came after `import ray`, or never: Ray would
    put a local cluster on the routable address. (A value set by hand is left to its owner.)"""
    if not _loopback() or os.environ.get(SINGLE_NODE, "0") != "0":
        return
    from ray._private import ray_constants  # where Ray keeps what it read on import

    if SINGLE_NODE not in os.environ or ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError("pipeline.rayenv.prepare_ray() must run before `import ray`")
