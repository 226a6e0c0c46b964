"""Where Ray keeps what outlives a worker: Ray Train checkpoints and Ray Tune experiment state.

`ray.storage` (or `BOOSTPIPE_STORAGE`) is a local folder (the default, inside the project: fine
on one machine), a mount every node shares, or object storage (`s3://bucket/prefix`, and any URI
pyarrow reads). Ray takes it as `storage_path` plus a pyarrow filesystem (`storage_filesystem`),
as its docs describe for clusters; the same filesystem carries our own small files beside Ray's
(a worker's recorded error), so nothing a worker writes lands on one node's disk only.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.config import ConfigError, RayConfig

STORAGE_ENV = "BOOSTPIPE_STORAGE"  # wins over ray.storage, as RAY_ADDRESS does over a default
# Bounded waits on object storage: a wrong endpoint fails in seconds, not after the SDK's retries.
S3_DEFAULTS: dict[str, Any] = {"connect_timeout": 5.0, "request_timeout": 60.0}


@dataclass(frozen=True)
class Storage:
    """A folder on a pyarrow filesystem; picklable, so Ray workers get it with their config."""

    filesystem: pafs.FileSystem
    path: str  # inside `filesystem`: an absolute local path, or bucket/prefix
    uri: str  # as the user wrote it, for messages

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def child(self, name: str) -> Storage:
        return Storage(self.filesystem, self.join(name), f"{self.uri.rstrip('/')}/{name}")

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    def exists(self, name: str) -> bool:
        return self.filesystem.get_file_info(self.join(name)).type != pafs.FileType.NotFound

    def write_text(self, name: str, text: str) -> None:
        target = self.join(name)
        if self.is_local:  # object stores have no folders to make
            self.filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with self.filesystem.open_output_stream(target) as out:
            out.write(text.encode())

    def read_text(self, name: str) -> str:
        with self.filesystem.open_input_stream(self.join(name)) as source:
            return source.read().decode()

    def delete(self, name: str) -> None:
        """Remove a file or a folder below the storage, if it is there."""
        target = self.join(name)
        kind = self.filesystem.get_file_info(target).type
        if kind == pafs.FileType.Directory:
            self.filesystem.delete_dir(target)
        elif kind == pafs.FileType.File:
            self.filesystem.delete_file(target)


def open_storage(config: RayConfig, default: Path) -> Storage:
    """The storage `ray.storage` names (`default`, a project folder, when it names none),
    checked with a real write and read so a wrong bucket, endpoint or key fails in seconds,
    in one line, before any training."""
    uri = os.environ.get(STORAGE_ENV) or config.storage or str(default)
    key = STORAGE_ENV if os.environ.get(STORAGE_ENV) else "ray.storage"
    try:
        storage = _resolve(uri, config.storage_options)
        storage.filesystem.create_dir(storage.path, recursive=True)
        probe = f".probe-{uuid.uuid4().hex}"
        storage.write_text(probe, "ok")
        storage.read_text(probe)
        storage.delete(probe)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}: cannot write to {uri}: {first[:240]}") from None
    return storage


def _resolve(uri: str, options: dict[str, Any]) -> Storage:
    if "://" not in uri:
        return Storage(pafs.LocalFileSystem(), str(Path(uri).resolve()), uri)
    scheme, rest = uri.split("://", 1)
    if scheme == "s3":  # explicit, to bound the waits and take ray.storage_options
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        settings = {**S3_DEFAULTS, **({"endpoint_override": endpoint} if endpoint else {})}
        return Storage(pafs.S3FileSystem(**{**settings, **options}), rest.strip("/"), uri)
    if options:
        raise ValueError(f"ray.storage_options apply to s3:// storage only, not {scheme}://")
    filesystem, path = pafs.FileSystem.from_uri(uri)
    return Storage(filesystem, path, uri)


REACH_STORAGE = "set ray.storage / data.root to storage every node can reach"


def check_nodes_reach(
    storage: Storage, needs: dict[str, float], paths: dict[str, str], timeout: float = 60.0
) -> None:
    """Before Ray places workers: every other alive node that could host one (it holds `needs`)
    must read the storage (a probe file this driver wrote) and each of `paths` (local path ->
    what to do instead). A node that cannot would train into a folder of its own disk, or fail
    in every worker with a traceback; this fails in seconds, in one line naming the node and
    the path. (Ray must be running.)"""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    nodes = [
        node
        for node in ray.nodes()
        if node["Alive"]
        and node["NodeID"] != here
        and all(node["Resources"].get(kind, 0) >= amount for kind, amount in needs.items())
    ]
    if not nodes:
        return
    probe = f".probe-{uuid.uuid4().hex}"
    storage.write_text(probe, "ok")
    task = ray.remote(num_cpus=0, max_retries=0)(unreadable)
    try:
        pending = {
            task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(storage, probe, list(paths)): node
            for node in nodes
        }
        ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
        for ref in late:
            raise ConfigError(f"node {_label(pending[ref])} did not answer within {timeout:g} s")
        for ref in ready:
            missing = ray.get(ref)
            if missing:
                hint = paths.get(missing, REACH_STORAGE)
                raise ConfigError(
                    f"worker on node {_label(pending[ref])} cannot read {missing}: {hint}"
                )
    finally:
        storage.delete(probe)


def unreadable(storage: Storage, probe: str, paths: list[str]) -> str | None:
    """Run on a node: the storage, or the first of `paths`, that it cannot read, if any."""
    try:
        storage.read_text(probe)
    except OSError:
        return storage.path if storage.is_local else storage.uri
    return next((path for path in paths if not os.access(path, os.R_OK)), None)


def _label(node: dict[str, Any]) -> str:
    return f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})"
