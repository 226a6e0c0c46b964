"""`ray.storage`: resolved, checked with a real write before any work, and refused in one line
naming the key when it cannot be written (pipeline/storage.py)."""

from __future__ import annotations

import os
import time

import pytest
from helpers import compose

from pipeline.cluster import free_port
from pipeline.config import ConfigError, RayConfig
from pipeline.storage import STORAGE_ENV, open_storage


def test_the_default_is_the_project_folder_and_holds_files(tmp_path, monkeypatch):
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    storage = open_storage(RayConfig(), tmp_path / ".boostpipe/ray")
    assert storage.is_local and storage.path == str((tmp_path / ".boostpipe/ray").resolve())
    storage.write_text("run/note.txt", "kept")
    assert storage.exists("run/note.txt") and storage.read_text("run/note.txt") == "kept"
    child = storage.child("run")
    assert child.exists("note.txt")
    storage.delete("run")
    assert not storage.exists("run") and not (tmp_path / ".boostpipe/ray/run").exists()
    assert [p.name for p in (tmp_path / ".boostpipe/ray").iterdir()] == []  # the probe is gone


def test_the_environment_variable_wins_over_params(tmp_path, monkeypatch):
    monkeypatch.setenv(STORAGE_ENV, str(tmp_path / "shared"))
    storage = open_storage(RayConfig(storage=str(tmp_path / "in-params")), tmp_path / "default")
    assert storage.path == str(tmp_path / "shared")
    assert (tmp_path / "shared").is_dir() and not (tmp_path / "in-params").exists()


def test_a_dead_s3_endpoint_is_refused_in_seconds_naming_the_key(monkeypatch, tmp_path):
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"^ray.storage: cannot write to s3://bucket/runs: "):
        open_storage(RayConfig(storage="s3://bucket/runs"), tmp_path)
    print(f"refused after {time.monotonic() - started:.1f} s")


def test_a_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        target = blocker / "ray"  # below a file: no one can create it
    else:
        target = tmp_path / "locked" / "ray"
        target.parent.mkdir(mode=0o500)
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    with pytest.raises(ConfigError, match=rf"^ray.storage: cannot write to {target}"):
        open_storage(RayConfig(storage=str(target)), tmp_path)


@pytest.mark.parametrize("secret", ["access_key", "secret_key", "session_token"])
def test_credentials_in_params_are_refused(secret):
    with pytest.raises(ConfigError, match=rf"ray.storage_options.{secret}: credentials stay out"):
        compose(**{f"ray.storage_options.{secret}": "AKIA..."})
