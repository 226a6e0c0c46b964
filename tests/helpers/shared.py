"""The shrunk pipeline run to the end once per session and shared: by the tests that only read
its outputs, and through copies by the tests that change them. Under xdist both workers share
it: the first to ask builds it under a file lock in the session's common temp folder (as
pytest-xdist's docs recommend), the other waits and reuses it."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from helpers.project import run, shrunk_copy
from helpers.servers import mlflow_server

DONE = ".built"


def _session_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every worker of this session sees: above the workers' own under xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once_per_session(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], str]
) -> Path:
    """The folder `name`, filled by `build` (which returns its log) once per session: by
    whichever worker asks first, while the other waits on the lock and then reuses it."""
    folder = _session_folder(tmp_path_factory)
    target = folder / name
    with FileLock(folder / f"{name}.lock"):
        if not (target / DONE).exists():
            shutil.rmtree(target, ignore_errors=True)  # a build that failed in another worker
            target.mkdir()
            (target / DONE).write_text(build(target))
    return target


@dataclass
class SharedRun:
    """Two shrunk pipelines `dvc repro`-ed at the same time, as two users' runs on one machine:
    `local` with the default store (SQLite in the project), `served` against a real `mlflow
    server` on 127.0.0.1 with its store in `store` (stopped since; start one on it to read);
    `consoles` holds what each printed."""

    local: Path
    served: Path
    store: Path

    @property
    def consoles(self) -> dict[str, str]:
        return {name: (self.local.parent / f"{name}.log").read_text() for name in NAMES}


NAMES = ("local", "served")


def _two_at_once(folder: Path) -> str:
    shared = SharedRun(folder / "local", folder / "served", folder / "store")
    shared.store.mkdir()
    with mlflow_server(shared.store) as (uri, _), ThreadPoolExecutor(2) as pool:
        env = {"local": {}, "served": {"MLFLOW_TRACKING_URI": uri}}
        runs = {
            name: pool.submit(run, ["dvc", "repro"], shrunk_copy(folder / name), **env[name])
            for name in NAMES
        }
        results = {name: future.result() for name, future in runs.items()}
    for name, result in results.items():
        assert result.returncode == 0, result.stdout + result.stderr
        (folder / f"{name}.log").write_text(result.stdout + result.stderr)
    return ""


def shared_run_of(tmp_path_factory: pytest.TempPathFactory) -> SharedRun:
    """The session's two shrunk pipelines (default params, shrunk data), run to the end."""
    folder = once_per_session(tmp_path_factory, "shared-run", _two_at_once)
    return SharedRun(folder / "local", folder / "served", folder / "store")


def _dvc_scratch(folder: str, names: list[str]) -> list[str]:
    return ["tmp"] if folder.endswith("/.dvc") else []


def copy_project(source: Path, target: Path) -> Path:
    """A copy of a project folder a test may change: files, git, DVC cache, and the MLflow store
    with its runs' artifact locations moved into the copy, so that the copy logs nothing into
    the source."""
    # DVC's scratch (locks, indexes) may change under a command another test runs in `source`.
    shutil.copytree(source, target, symlinks=True, ignore=_dvc_scratch)
    database = target / "mlflow.db"
    if database.exists():
        old, new = f"{source}/", f"{target}/"
        with sqlite3.connect(database) as db:
            tables = [
                row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            for table in tables:
                for column in db.execute(f'PRAGMA table_info("{table}")').fetchall():
                    if column[2].upper().startswith(("VARCHAR", "TEXT")):
                        db.execute(
                            f'UPDATE "{table}" SET "{column[1]}" = replace("{column[1]}", ?, ?) '
                            f'WHERE instr("{column[1]}", ?) > 0',
                            (old, new, old),
                        )
    return target
