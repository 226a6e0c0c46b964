"""Params edited while a stage runs: the stage stops before writing, naming the key, so that DVC
never records params the outputs were not made with."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import command_env, needs_data, set_params, sha

from pipeline.config import ConfigError
from pipeline.io import atomic_path, checked_before_writing, replaced_together
from pipeline.params_guard import ParamsGuard, declared_params

DVC_YAML = """
stages:
  train:
    cmd: python -m stages.train
    params:
      - train.lr
      - model
      - params.yaml:
          - seed
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text(
        "seed: 0\ntrain: {lr: 0.1, loader_workers: 1}\nmodel: {n_blocks: 5}\n"
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_declared_params_are_read_from_dvc_yaml(project):
    assert declared_params("train") == ["train.lr", "model", "seed"]
    assert declared_params("not-a-stage") == []


def test_an_edited_key_stops_the_writes_and_names_it(project):
    guard = ParamsGuard("train")
    set_params(project, **{"train.loader_workers": 2})  # not declared: no effect
    guard.check()
    set_params(project, **{"model.n_blocks": 3})
    with pytest.raises(ConfigError) as raised:
        guard.check()
    message = str(raised.value)
    assert "model changed from {n_blocks: 5} to {n_blocks: 3} while stage train ran" in message
    assert "nothing was written" in message


def test_nothing_is_written_when_the_check_fails(project):
    (project / "old.json").write_text("old")
    guard = ParamsGuard("train")
    set_params(project, **{"train.lr": 0.05})
    with checked_before_writing(guard.check):
        with (
            pytest.raises(ConfigError, match=r"train\.lr changed from 0\.1 to 0\.05"),
            atomic_path(project / "old.json") as tmp,
        ):
            tmp.write_text("new")
        with pytest.raises(ConfigError), replaced_together():
            for name in ("old.json", "other.json"):
                with atomic_path(project / name) as tmp:
                    tmp.write_text("new")
    assert (project / "old.json").read_text() == "old"
    assert sorted(p.name for p in project.iterdir()) == ["dvc.yaml", "old.json", "params.yaml"]


@needs_data
@pytest.mark.slow
def test_dvc_records_nothing_for_a_stage_whose_params_changed_while_it_ran(shared_copy, tmp_path):
    """train.lr edited during training: train fails in one line naming the key and writes no
    output (DVC removed the old ones before running it), dvc.lock stays as it was, and DVC
    still sees train as changed."""
    repo = shared_copy
    set_params(repo, **{"train.lr": 0.05})
    lock = sha(repo / "dvc.lock")
    log = tmp_path / "repro.log"
    with log.open("w") as out:
        dvc = subprocess.Popen(
            ["dvc", "repro", "train"],
            cwd=repo,
            env=command_env(),
            start_new_session=True,
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 300
        while not list((repo / ".boostpipe/ray").glob("train-*")):  # training has begun
            assert dvc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        set_params(repo, **{"train.lr": 0.02})
        assert dvc.wait(timeout=600) != 0, log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(dvc.pid, signal.SIGKILL)
    errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, log.read_text()
    assert "train.lr changed from 0.05 to 0.02 while stage train ran" in errors[0]
    assert sha(repo / "dvc.lock") == lock
    assert sorted(p.name for p in (repo / "outputs/train").iterdir()) == [".gitignore"]
    status = subprocess.run(
        ["dvc", "status", "train"], cwd=repo, env=command_env(), capture_output=True, text=True
    )
    assert "changed deps" in status.stdout and "train.lr" in status.stdout, status.stdout
