"""Faults at the level of one component, each against the real thing: a real SQLite MLflow store
in tmp (run statuses, a store that cannot be written), a real `mlflow server` on loopback that
the test stops (by PID), a closed port, and real truncated files."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, compose, mlflow_server, stop
from helpers.faults import read_only

from pipeline import tracking
from pipeline.cluster import free_port
from pipeline.io import (
    CorruptFile,
    NotWritable,
    check_archive,
    check_writable,
    load_arrays,
    load_checkpoint,
    read_json,
    replaced_together,
    save_arrays,
    write_json,
)


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """A real SQLite store in tmp, selected the way users select one (MLFLOW_TRACKING_URI)."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "store"
    folder.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    monkeypatch.setattr(tracking.SESSION, "opened", [])
    monkeypatch.setattr(tracking.SESSION, "failed", [])
    return folder


def _status(run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient().get_run(run_id).info.status


def _start(tmp_path: Path, previous: Path) -> str:
    return tracking.start_run(compose(), "abc", str(tmp_path), previous, "unit")


def test_run_status_follows_the_work(store, tmp_path):
    """RUNNING while it runs (a new run is not ended at once), KILLED on Ctrl-C, RUNNING again
    when resumed, FAILED on an error, FINISHED only when evaluate's logging completes."""
    from mlflow import MlflowClient

    previous = tmp_path / "run-marker"
    run_id = _start(tmp_path, previous)
    assert _status(run_id) == "RUNNING"
    first = MlflowClient().get_run(run_id).data.tags["boostpipe.attempt"]
    assert MlflowClient().get_run(run_id).inputs.dataset_inputs  # the data is logged as input

    with pytest.raises(KeyboardInterrupt), tracking.status_of():
        raise KeyboardInterrupt
    assert _status(run_id) == "KILLED"

    time.sleep(1.1)  # the attempt tag has one-second resolution
    assert _start(tmp_path, previous) == run_id  # the interrupted run is reopened
    assert _status(run_id) == "RUNNING"
    assert MlflowClient().get_run(run_id).data.tags["boostpipe.attempt"] != first

    with pytest.raises(ValueError), tracking.status_of():
        raise ValueError("bad")
    assert _status(run_id) == "FAILED"

    tracking.link_run(run_id, "train-abc")  # as the train stage does
    with tracking.status_of():  # calibrate: reopened, and still RUNNING after it
        assert tracking.resume_run(compose(), "train-abc") == run_id
        assert _status(run_id) == "RUNNING"
    assert _status(run_id) == "RUNNING"
    metrics = {"final_top1": 1.0, "mean_top1": 1.0, "budgets": {}, "time_budgets": {}}
    with tracking.status_of():  # evaluate
        tracking.resume_run(compose(), "train-abc")
        tracking.log_evaluation(run_id, metrics, [], [], [])
    assert _status(run_id) == "FINISHED"


def test_a_search_parent_is_killed_when_interrupted_and_finished_when_done(store, tmp_path):
    run_id = _start(tmp_path, tmp_path / "marker")
    with pytest.raises(KeyboardInterrupt), tracking.status_of(run_id, finish=True):
        raise KeyboardInterrupt
    assert _status(run_id) == "KILLED"
    with tracking.status_of(run_id, finish=True):
        pass
    assert _status(run_id) == "FINISHED"


PREFLIGHT = """
import sys
from pathlib import Path
from helpers import compose
from pipeline import tracking
try:
    tracking.start_run(compose(), "abc", ".", Path(sys.argv[1]), "unit")
except tracking.TrackingUnavailable as exc:
    sys.exit(str(exc))
"""


@contextlib.contextmanager
def locked(database: Path) -> Iterator[None]:
    """Another process's exclusive SQLite transaction on the store: no reads, no writes."""
    import sqlite3

    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["read-only", "read-only resumed", "locked resumed"])
def test_a_store_that_cannot_be_written_fails_before_work_in_one_line(store, tmp_path, fault):
    """The pre-flight writes (a tag), so a store that can be read but not written is caught for
    a resumed run too, in seconds, naming the store; so is a locked one. A fresh process, as a
    stage is; the run is left as it was."""
    previous = tmp_path / "marker"
    run_id = _start(tmp_path, previous)  # creates the database, experiment and a run
    resumed = fault.endswith("resumed")
    if not resumed:
        previous.unlink()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    database = store / "mlflow.db"
    with locked(database) if fault.startswith("locked") else read_only(database, store):
        start = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", PREFLIGHT, str(previous)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert time.monotonic() - start < 30
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"tracking store sqlite:///{database}: "), message
    assert "OperationalError" in message, message
    assert previous.exists() == resumed and (not resumed or previous.read_text() == run_id)
    assert _status(run_id) == "RUNNING"  # nothing changed


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra)
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "RAY_ADDRESS"):
        env.pop(key, None)
    return env


@pytest.mark.slow
def test_runs_and_compare_give_up_on_a_closed_port_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    uri = f"http://127.0.0.1:{free_port()}"
    for command in (["runs"], ["compare", "abcd1234"], ["ui"]):
        start = time.monotonic()
        result = subprocess.run(
            ["boostpipe", *command],
            cwd=tmp_path,
            env=_env(MLFLOW_TRACKING_URI=uri),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert time.monotonic() - start < 30, command
        assert result.returncode == 1, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{uri} is unreachable" in lines[0], result.stderr


@pytest.mark.slow
def test_a_server_that_stops_mid_run_costs_one_warning_within_60_s(tmp_path, monkeypatch):
    """A real `mlflow server` on loopback, stopped (by PID) after the run was opened: logging
    gives up within a stage's 60 s with one warning line, and later logging is not retried."""
    with mlflow_server(tmp_path) as (uri, server):
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setattr(tracking.SESSION, "failed", [])
        for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
            monkeypatch.delenv(key, raising=False)
        run_id = _start(tmp_path, tmp_path / "marker")
        assert _status(run_id) == "RUNNING"
        stop(server)
    start = time.monotonic()
    tracking.best_effort(lambda: tracking.log_metrics(run_id, [("m", 1.0, 1)]), "metrics")
    tracking.best_effort(lambda: tracking.log_metrics(run_id, [("m", 2.0, 2)]), "more")
    assert time.monotonic() - start < 60
    assert tracking.SESSION.failed == ["metrics"]  # the second call was not waited on


@pytest.mark.slow
def test_records_a_stopped_server_did_not_take_are_kept_and_sent_in_order(
    tmp_path, monkeypatch, capsys
):
    """A real `mlflow server` stopped after the run was opened: two records are kept in the
    outbox (one warning, within a stage's 60 s), and once the server is back on the same port
    and store they are sent, oldest first, and the outbox is empty."""
    from mlflow import MlflowClient

    from pipeline.tracking import outbox

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(outbox, "DELIVERY", outbox.Delivery())
    port, store = free_port(), tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    (tmp_path / "thresholds.json").write_text("{}")
    params = compose()
    with mlflow_server(store, port) as (uri, server):
        run_id = _start(tmp_path, tmp_path / "marker")
        stop(server)
    start = time.monotonic()
    for status in ("KILLED", "FINISHED"):  # the later must win: sent in order
        tracking.deliver(tracking.record(params, "k", run_id, "status", {"status": status}))
    tracking.deliver(
        tracking.record(params, "k", run_id, "artifacts", files=[tmp_path / "thresholds.json"])
    )
    assert time.monotonic() - start < 60
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "logging is delayed" in warnings[0], warnings
    kept = sorted(p.name for p in (tmp_path / ".boostpipe/outbox").glob("[0-9]*"))
    assert kept == ["000001-status", "000002-status", "000003-artifacts"]
    (tmp_path / "thresholds.json").unlink()  # the outbox holds its own copy
    assert not tracking.settle(0)  # still away: one line saying what is kept and how to send it
    assert "`boostpipe sync`" in capsys.readouterr().err
    with mlflow_server(store, port):
        assert tracking.settle(10)
        assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
        assert [a.path for a in MlflowClient(uri).list_artifacts(run_id)] == ["thresholds.json"]
    assert "MLflow caught up: sent 3 delayed record(s)" in capsys.readouterr().out
    assert not list((tmp_path / ".boostpipe/outbox").glob("[0-9]*"))


def test_stage_outputs_are_replaced_together_or_not_at_all(tmp_path):
    old = {name: tmp_path / name for name in ("a.json", "b.json")}
    for path in old.values():
        write_json(path, "old")
    with pytest.raises(OSError), replaced_together():
        write_json(old["a.json"], "new")
        assert read_json(old["a.json"]) == "old"  # not renamed before the block ends
        raise OSError(28, "No space left on device")
    assert [read_json(path) for path in old.values()] == ["old", "old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no temporaries
    with replaced_together():
        for path in old.values():
            write_json(path, "new")
    assert [read_json(path) for path in old.values()] == ["new", "new"]


def test_an_unwritable_output_folder_is_named_before_work(tmp_path):
    folder = tmp_path / "outputs" / "evaluate"
    folder.mkdir(parents=True)
    with read_only(folder), pytest.raises(NotWritable, match=f"{folder}/: cannot write there"):
        check_writable([tmp_path / "outputs" / "train", folder])
    assert (tmp_path / "outputs" / "train").is_dir()


def test_truncated_files_are_named_in_one_line(tmp_path):
    arrays = tmp_path / "prepared.npz"
    save_arrays(arrays, {"x": np.arange(100_000)})
    model = tmp_path / "model.pt"
    torch.save({"model": {"w": torch.zeros(50_000)}}, model)
    for path in (arrays, model):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    for check in (lambda: load_arrays(arrays), lambda: check_archive(arrays)):
        with pytest.raises(CorruptFile, match=r"prepared\.npz: .*dvc repro -s prepare -f") as exc:
            check()
        assert "\n" not in str(exc.value)
    with pytest.raises(CorruptFile, match=r"model\.pt: unreadable") as exc:
        load_checkpoint(model)
    assert "\n" not in str(exc.value)
    with zipfile.ZipFile(tmp_path / "flipped.npz", "w") as archive:  # intact size, bad CRC
        archive.writestr("x.npy", b"\x00" * 1000)
    data = bytearray((tmp_path / "flipped.npz").read_bytes())
    data[100] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(data))
    with pytest.raises(CorruptFile, match=r"flipped\.npz"):
        check_archive(tmp_path / "flipped.npz")


def test_search_logging_survives_a_dead_store(tmp_path, monkeypatch, capsys):
    """Trial logging against a closed port: one warning line, later hooks skip MLflow at once,
    and the search is told the store cannot count ended trials (None)."""
    from types import SimpleNamespace

    from pipeline.tune_callbacks import MlflowTrials

    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(tracking.SESSION, "failed", [])
    tracking.bound_waits("stage")
    trials = MlflowTrials(f"http://127.0.0.1:{free_port()}", "0", "f" * 32, 1, 4)
    trial = SimpleNamespace(trial_id="t1", config={}, last_result={"done": True}, error_file=None)
    start = time.monotonic()
    trials.on_trial_start(0, [trial], trial)
    trials.on_trial_result(0, [trial], trial, {"training_iteration": 1, "val_mean_top1": 50.0})
    trials.on_trial_complete(0, [trial], trial)
    assert trials.ended() is None
    assert time.monotonic() - start < 60
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "Connection refused" in warnings[0], warnings


@pytest.mark.slow
def test_an_mlflow_error_in_a_command_is_one_line_unless_verbose(store, tmp_path):
    """Whatever MLflow raises (here: SQLite busy under another process's lock, after SQLite's
    own busy wait) ends a command in one line naming the store, exit 1; BOOSTPIPE_VERBOSE=1
    adds the traceback."""
    _start(tmp_path, tmp_path / "marker")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    database = store / "mlflow.db"
    with locked(database):
        for verbose in ("0", "1"):
            result = subprocess.run(
                ["boostpipe", "runs"],
                cwd=tmp_path,
                env=_env(BOOSTPIPE_VERBOSE=verbose),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 1, result.stdout + result.stderr
            lines = result.stderr.strip().splitlines()
            assert lines[-1].startswith(f"error: tracking store sqlite:///{database}: "), lines
            assert "locked" in lines[-1]
            assert (len(lines) == 1) == (verbose == "0"), result.stderr
            assert ("Traceback" in result.stderr) == (verbose == "1")


def test_sigterm_after_training_is_an_interruption_not_a_silent_exit():
    """Ray Train installs a SIGINT handler in `fit()` that exits 0 once its run is gone; it must
    not outlive training, or a SIGTERM between training and the outputs ends the stage with exit
    0 and no message (what CI once saw)."""
    from pipeline import interrupts

    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at start-up
    previous_term = signal.signal(signal.SIGTERM, interrupts.as_ctrl_c)
    try:
        with interrupts.sigint_handler_restored():
            signal.signal(signal.SIGINT, lambda *_: sys.exit(0))  # as Ray Train's, run gone
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert interrupts.exit_code() == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def test_sigterm_swallowed_by_a_handler_inside_the_block_still_interrupts():
    """A SIGTERM as the last epoch ends: Ray Train's handler finds its run already over and
    returns, so `fit()` returns normally; the stage must still stop (CI saw it write nothing
    and print nothing, then finish as if never told to stop)."""
    from pipeline import interrupts

    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, interrupts.as_ctrl_c)
    calls: list[int] = []
    try:
        with pytest.raises(KeyboardInterrupt), interrupts.sigint_handler_restored():
            signal.signal(signal.SIGINT, lambda signum, _: calls.append(signum))  # returns
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler runs; nothing is raised inside the block
            assert calls == [signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with interrupts.sigint_handler_restored():  # a later block without signals ends quietly
            pass
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def test_a_stage_behind_a_shell_stops_when_the_process_that_ran_the_shell_dies(tmp_path):
    """DVC runs a stage through `$SHELL -c` (/bin/sh when SHELL is unset); dash stays between
    them and outlives a killed DVC, so the kernel's parent-death signal never comes. CI saw the
    stage train on to the end after DVC was killed. The stage watches the shell's parent too."""
    stage = tmp_path / "stage.py"
    stage.write_text(
        "import sys, time\n"
        "from pipeline.interrupts import stop_with_parent\n"
        "stop_with_parent()\n"
        "print('ready', flush=True)\n"
        "try:\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
    )
    out = tmp_path / "out.txt"
    shell = ["/bin/sh", "-c", f"{sys.executable} {stage} > {out}"]
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])", *shell],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while "ready" not in (out.read_text() if out.exists() else ""):
            assert time.monotonic() < deadline, "the stage never started"
            time.sleep(0.1)
        launcher.kill()  # as a process manager would, without a word to the shell
        launcher.wait()
        deadline = time.monotonic() + 10
        while "interrupted" not in out.read_text():
            assert time.monotonic() < deadline, "the stage went on after its launcher died"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
