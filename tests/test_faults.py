"""Faults on the real pipeline (real DVC, Ray, MLflow store, Fashion-MNIST, shrunk params): what
a process manager, a busy port or a killed parent does, and that nothing is lost, nothing is left
running (checked by PID) and each failure ends in one line and a non-zero exit."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import (
    ROOT,
    command_env,
    mlflow_server,
    needs_data,
    run,
    set_params,
    sha,
    shrunk_copy,
    stop,
    trained_run,
)
from helpers.faults import read_only
from helpers.shared import SharedRun

from pipeline.cluster import free_port
from pipeline.io import read_json
from pipeline.tracking.names import FINAL_TOP1


def _env() -> dict[str, str]:
    env = command_env()
    env.pop("SHELL", None)  # DVC then runs stages through /bin/sh, which stays in between (CI)
    return env


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return f"{process.pid} {' '.join(process.cmdline())[:160]}"
    return str(process.pid)


def _sessions(processes: list[psutil.Process]) -> set[Path]:
    """The Ray session folders named on these processes' command lines."""
    found = set()
    for process in processes:
        with contextlib.suppress(psutil.Error):
            for match in re.findall(r"(/[\w/.-]*/session_[\d_-]+)", " ".join(process.cmdline())):
                found.add(Path(match))
    return found


def _checksums(repo: Path) -> dict[str, str]:
    """Every output, the prepared data and dvc.lock: what a stopped stage must leave alone."""
    files = [repo / "dvc.lock", repo / "data/prepared.npz"]
    files += [path for path in (repo / "outputs").rglob("*") if path.is_file()]
    return {str(path.relative_to(repo)): sha(path) for path in files}


def _checkpointed(repo: Path) -> bool:
    """Ray Train has recorded a checkpoint of the run (a resume will find it). The checkpoint's
    folder appears earlier, while it is written: a kill then would leave nothing to resume."""
    for path in (repo / ".boostpipe/ray").glob("train-*/checkpoint_manager_snapshot.json"):
        with contextlib.suppress(ValueError):  # being written
            if json.loads(path.read_text()).get("latest_checkpoint_result"):
                return True
    return False


def _command(process: psutil.Process) -> str:
    """Its command line, or "" once it has exited (a zombie, or gone): the tree changes as
    we read it, with Ray's short-lived helpers among it."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


@needs_data
@pytest.mark.slow
def test_sigterm_to_dvc_alone_stops_training_and_its_ray_cluster(shared_copy, tmp_path):
    """`kill <dvc pid>` during training: the stage stops as on Ctrl-C (its parent's death, or
    its shell parent's parent's, signals it), Ray goes with it, no output is written, Ray's
    session folder is removed; Ctrl-C to the stage exits 130; kill -9 of the whole run changes
    nothing either; and the next `dvc repro` resumes from the checkpoint, in the same MLflow
    run."""
    repo = shared_copy  # prepared: `dvc repro` goes straight to training
    set_params(repo, **{"train.epochs": 3})
    log = (tmp_path / "repro.log").open("w")
    dvc = subprocess.Popen(
        ["dvc", "repro"], cwd=repo, env=_env(), start_new_session=True, stdout=log, stderr=log
    )
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 600
        while not _checkpointed(repo):
            assert dvc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        before = _checksums(repo)
        children = psutil.Process(dvc.pid).children(recursive=True)
        stage = [p for p in children if "stages.train" in _command(p)]
        assert stage, [_command(p) for p in children]
        sessions = _sessions(children)
        assert sessions and all(s.exists() for s in sessions)

        os.kill(dvc.pid, signal.SIGTERM)  # DVC alone, as a process manager would
        dvc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(p.pid) for p in children) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [_describe(p) for p in children if _alive(p.pid)]
        assert not left, f"still running 30 s after DVC was killed: {left}"
        assert not any(s.exists() for s in sessions), sessions
        assert "stages.train: interrupted by SIGTERM" in (tmp_path / "repro.log").read_text()
        assert _checksums(repo) == before
        (marker,) = (repo / ".boostpipe/ray").glob("*.mlflow-run")
        killed = marker.read_text()
        assert _status(repo, killed) == "KILLED"
    finally:
        for process in children:
            with contextlib.suppress(psutil.Error):
                process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(dvc.pid, signal.SIGKILL)
        log.close()

    # Ctrl-C to the stage alone while it trains again: exit 130 with one line, nothing written.
    stage_log = tmp_path / "stage.log"
    with stage_log.open("w") as out:
        train = subprocess.Popen(
            [sys.executable, "-m", "stages.train"],
            cwd=repo,
            env=_env(),
            start_new_session=True,
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 300
        while "resuming after epoch" not in stage_log.read_text():
            assert train.poll() is None and time.monotonic() < deadline, stage_log.read_text()
            time.sleep(0.2)
        os.kill(train.pid, signal.SIGINT)
        assert train.wait(timeout=60) == 130, stage_log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(train.pid, signal.SIGKILL)
    lines = stage_log.read_text().splitlines()
    assert "stages.train: interrupted by SIGINT; `dvc repro` runs" in "\n".join(lines[-5:])
    assert _checksums(repo) == before

    # kill -9 of everything (DVC, the stage, Ray) as it resumes: a crash, no handler runs.
    crash_log = tmp_path / "crash.log"
    with crash_log.open("w") as out:
        crash = subprocess.Popen(
            ["dvc", "repro"], cwd=repo, env=_env(), start_new_session=True, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 300
        while "resuming after epoch" not in crash_log.read_text():
            assert crash.poll() is None and time.monotonic() < deadline, crash_log.read_text()
            time.sleep(0.2)
        os.killpg(crash.pid, signal.SIGKILL)
        crash.wait()
        time.sleep(2)
    finally:
        for _ in range(3):  # Ray processes the run started and that outlived the kill
            with contextlib.suppress(ProcessLookupError):
                os.killpg(crash.pid, signal.SIGKILL)
    assert _checksums(repo) == before

    second = run(["dvc", "repro"], repo)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming after epoch" in second.stdout + second.stderr
    history = read_json(repo / "outputs/train/history.json")
    assert [record["epoch"] for record in history["epochs"]] == [1, 2, 3]
    assert trained_run(f"sqlite:///{repo / 'mlflow.db'}", repo).info.run_id == killed
    # Each epoch logged once across the interruption and the resume: epochs 2 and 3 as they
    # ended, epoch 1 (killed between its checkpoint and its logging) after training.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    logged = sorted(client.get_metric_history(killed, "val/mean_top1"), key=lambda m: m.step)
    assert [m.step for m in logged] == [1, 2, 3]
    assert logged[1].timestamp < logged[2].timestamp
    _check_run_status(repo, "FINISHED")  # the interrupted run, resumed and evaluated


def test_ui_fails_when_its_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
        result = subprocess.run(
            ["boostpipe", "ui", "--port", str(port)],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port} is in use" in lines[0], result.stderr
    assert "http://" not in result.stdout  # no URL banner for a server that never ran


@pytest.fixture
def finished(shared_run: SharedRun, shared_copy: Path) -> Path:
    """The shrunk pipeline run to the end (a copy of the session's), everything logged."""
    assert "warning:" not in shared_run.consoles["local"]  # everything logged
    _check_run_status(shared_copy, "FINISHED")
    return shared_copy


def _stage(repo: Path, name: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run one stage as DVC would, in its own session; returns the result and its wall time,
    after checking that no process of that session is left (by PID)."""
    start = time.monotonic()
    stage = subprocess.Popen(
        [sys.executable, "-m", f"stages.{name}"],
        cwd=repo,
        env={**_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out, err = stage.communicate(timeout=600)
    seconds = time.monotonic() - start
    left = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(process.pid) == stage.pid:
                left.append(_describe(process))
    assert not left, f"left running after stages.{name}: {left}"
    return subprocess.CompletedProcess(stage.args, stage.returncode, out, err), seconds


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    """Exit 1, no traceback, exactly one `error:` line and it is the last one."""
    text = result.stdout + result.stderr
    assert result.returncode == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], text[-3000:]
    return errors[0]


@needs_data
@pytest.mark.slow
def test_corrupt_inputs_fail_fast_in_one_line_and_change_nothing(finished):
    """A truncated prepared data file: train names it before any Ray retry (no three attempts
    of a deterministic failure), calibrate names it too; a truncated model.pt is named with the
    way to retrain. Outputs, dvc.lock and the MLflow run are left as they were."""
    repo = finished
    prepared, model = repo / "data/prepared.npz", repo / "outputs/train/model.pt"
    for path, stages, hint in (
        (prepared, ("train", "calibrate"), "run `dvc repro -s prepare -f`"),
        (model, ("calibrate", "evaluate"), "retrain it with `dvc repro -s train -f`"),
    ):
        good = path.read_bytes()
        path.write_bytes(good[: len(good) // 3])
        before = _checksums(repo)
        try:
            for name in stages:
                result, seconds = _stage(repo, name)
                line = _one_error_line(result)
                assert line.startswith(f"error: {path.relative_to(repo)}: unreadable"), line
                assert hint in line, line
                assert seconds < 60, (name, seconds)
                assert "Retrying" not in result.stdout + result.stderr
                assert _checksums(repo) == before
        finally:
            path.write_bytes(good)
    _check_run_status(repo, "FAILED")  # evaluate's last attempt failed


def _status(repo: Path, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_run(run_id).info.status


def _check_run_status(repo: Path, expected: str) -> None:
    """The status of the run that trained the outputs in `repo` (found by history.json's run)."""
    assert trained_run(f"sqlite:///{repo / 'mlflow.db'}", repo).info.status == expected


@needs_data
@pytest.mark.slow
def test_unwritable_outputs_and_a_dead_store(finished, tmp_path):
    """An output folder that cannot be written fails evaluate in one line before its work, and
    nothing changes; a tracking server that is gone (a closed port) costs evaluate two warning
    lines (logging is delayed; after tracking.catch_up_s, what is kept and how to send it),
    within 60 s, and its outputs are still written; a finished evaluate marks the run
    FINISHED."""
    repo = finished
    before = _checksums(repo)
    with read_only(repo / "outputs/evaluate"):
        result, seconds = _stage(repo, "evaluate")
    line = _one_error_line(result)
    assert line.startswith("error: outputs/evaluate/: cannot write there"), line
    assert _checksums(repo) == before

    result, healthy = _stage(repo, "evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    _check_run_status(repo, "FINISHED")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics = repo / "outputs/evaluate/metrics.json"
    metrics.unlink()
    set_params(repo, **{"tracking.catch_up_s": 5})
    result, seconds = _stage(repo, "evaluate", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "Connection refused" in warnings[0], warnings
    assert "logging is delayed" in warnings[0] and "did not answer within 5 s" in warnings[1]
    assert "Traceback" not in result.stdout + result.stderr
    assert metrics.exists()
    assert seconds < healthy + 60, (seconds, healthy)


def _kept(repo: Path) -> list[Path]:
    return sorted((repo / ".boostpipe/outbox").glob("[0-9]*"))


@needs_data
@pytest.mark.slow
def test_a_tracking_server_away_for_40_s_loses_nothing(tmp_path):
    """`dvc repro` against a real `mlflow server` on loopback that stops (by PID) once training
    has opened its run and comes back on the same port and store 40 s later, after the first
    epoch failed to reach it: every stage writes its outputs and exits 0, what the store could
    not take is sent when it answers again, and the run ends FINISHED with every epoch, the
    model, the thresholds and the evaluation; the console says once that logging was delayed
    and once that it caught up. Then an outage longer than `tracking.catch_up_s`: evaluate says
    what is kept and how to send it, and `boostpipe sync` sends it once the server is back."""
    from mlflow import MlflowClient

    repo = shrunk_copy(tmp_path / "repo")
    set_params(repo, **{"train.epochs": 3})
    log_path = tmp_path / "repro.log"
    store, port = tmp_path / "store", free_port()
    store.mkdir()
    env = {**_env(), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    with mlflow_server(store, port) as (uri, server), log_path.open("w") as log:
        dvc = subprocess.Popen(
            ["dvc", "repro"], cwd=repo, env=env, start_new_session=True, stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 600
            while not list((repo / ".boostpipe/ray").glob("*.mlflow-run")):
                assert dvc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
            stop(server)
            stopped = time.monotonic()
            while "logging is delayed" not in log_path.read_text():  # epoch 1 was not taken
                assert dvc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.5)
            time.sleep(max(0.0, 40 - (time.monotonic() - stopped)))
            with mlflow_server(store, port):
                assert dvc.wait(timeout=900) == 0, log_path.read_text()[-5000:]
                run_id = trained_run(uri, repo).info.run_id
                client = MlflowClient(uri)
                finished = client.get_run(run_id)
                epochs = client.get_metric_history(run_id, "val/mean_top1")
                artifacts = {a.path for a in client.list_artifacts(run_id)}
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(dvc.pid, signal.SIGKILL)
    output = log_path.read_text()
    assert "Traceback" not in output and "could not log" not in output, output[-5000:]
    # (said by the Ray worker logging epochs, or by a stage: Ray prefixes a worker's lines)
    delayed = [line for line in output.splitlines() if "logging is delayed" in line]
    assert len(delayed) == 1 and "warning: MLflow at" in delayed[0], delayed
    assert len([line for line in output.splitlines() if "MLflow caught up" in line]) == 1
    assert finished.info.status == "FINISHED"
    assert sorted(m.step for m in epochs) == [1, 2, 3]
    assert {"model.pt", "params.yaml", "thresholds.json", "metrics.json"} <= artifacts
    assert finished.outputs.model_outputs  # the logged model
    assert FINAL_TOP1 in finished.data.metrics
    assert _kept(repo) == []

    # Away for longer than evaluate waits: the outputs are written, the rest is kept, and
    # the console says what and how to send it.
    set_params(repo, **{"tracking.catch_up_s": 2})
    away = run(["dvc", "repro", "--force", "--single-item", "evaluate"], repo, **env)
    assert away.returncode == 0, away.stdout + away.stderr
    lines = [line for line in away.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 2 and "logging is delayed" in lines[0], lines
    assert "did not answer within 2 s" in lines[1] and "`boostpipe sync`" in lines[1]
    assert [path.name.split("-", 1)[1] for path in _kept(repo)] == ["evaluation"]
    with mlflow_server(store, port):
        synced = run(["boostpipe", "sync"], repo, **env)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        assert synced.stdout.strip().splitlines()[-1] == "sent 1 kept record(s)"
        assert _kept(repo) == []
        assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
