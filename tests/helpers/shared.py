"""The shrunk pipeline run to the end once per session and shared: by the tests that only read
its outputs, and through copies by the tests that change them. Under xdist both workers share
it: the first to ask builds it under a file lock in the session's common temp folder (as
pytest-xdist's docs recommend), the other waits and reuses it."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from helpers.project import run, shrunk_copy

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


def _repro(repo: Path) -> str:
    shrunk_copy(repo)
    result = run(["dvc", "repro"], repo)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shrunk copy of the repository after `dvc repro` (default params, shrunk data)."""
    return once_per_session(tmp_path_factory, "shared-run", _repro)


def console(folder: Path) -> str:
    """What building a session folder printed (for the shared run: its `dvc repro`)."""
    return (folder / DONE).read_text()


def copy_project(source: Path, target: Path) -> Path:
    """A copy of a project folder a test may change: files, git, DVC cache, and the MLflow store
    with its runs' artifact locations moved into the copy, so that the copy logs nothing into
    the source."""
    shutil.copytree(source, target, symlinks=True)
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
