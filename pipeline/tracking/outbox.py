"""What the store did not take while it was away, kept on disk and sent once it answers again.

A tracking server that restarts, or a network that drops for a minute, must not cost a run its
record. Each record a stage means to send (the trained model and its epochs, the thresholds, the
evaluation, a status) is sent after everything kept before it, oldest first; when the store
fails, the record goes to .boostpipe/outbox/ in the project root: a folder per record with the
files themselves and `record.json` (which store, which run, what). The next attempt sends it:
the stage's next record, the next stage, or `boostpipe sync`. The console says once that logging
is delayed and once that it caught up.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.errors import describe_failure
from pipeline.locks import waited
from pipeline.tracking.store import bound_waits, project_root

RECORD = "record.json"
RETRY_EVERY_S = 5.0
SEND_LOCK_WAIT_S = 120  # another stage sending the outbox (`dvc queue start -j 2`)


@dataclass(frozen=True)
class Record:
    """One thing to send to run `run_id` (or, when it was not known, to the run that trained
    `key`) of experiment `experiment` in the store at `uri`: `what` names its sender, `details`
    are its JSON arguments and `files` the files it logs."""

    uri: str
    experiment: str
    key: str
    run_id: str | None
    what: str
    details: dict[str, Any] = field(default_factory=dict)
    files: tuple[Path, ...] = ()

    def file(self, name: str) -> Path:
        return next(path for path in self.files if path.name == name)


# What sends each kind of record: `module:function(run_id, record)`, imported when a record of
# that kind is sent, so that a process imports only what it sends (the training record rebuilds
# the net; the stages that never log must not depend on the models).
SENDERS = {
    "status": "pipeline.tracking.runs:send_status",
    "artifacts": "pipeline.tracking.logs:send_artifacts",
    "evaluation": "pipeline.tracking.logs:send_evaluation",
    "registry": "pipeline.tracking.export:send_registry",
    "training": "pipeline.training_record:send_training",
}


def _sender(what: str) -> Callable[[str, Record], None]:
    module, function = SENDERS[what].split(":")
    return getattr(importlib.import_module(module), function)


# Present while an outage is under way, so that the processes it spans (the Ray worker logging
# epochs, then each stage) say once that logging is delayed and once that it caught up.
DELAYED = ".delayed"


@dataclass
class Delivery:
    """Why this process logs nothing at all: a store that answers but lacks the run (nothing
    to send later)."""

    off: str | None = None


DELIVERY = Delivery()


def outbox_folder() -> Path:
    return project_root() / paths.OUTBOX


def kept() -> list[tuple[Path, Record]]:
    """The kept records, oldest first, each with its folder."""
    found = []
    for folder in sorted(outbox_folder().glob("[0-9]*")):
        row = json.loads((folder / RECORD).read_text())
        files = tuple(sorted(p for p in folder.iterdir() if p.name != RECORD))
        found.append((folder, Record(**{**row, "files": files})))
    return found


def keep(record: Record) -> None:
    """Write `record` (and copies of its files) to the outbox, whole or not at all."""
    root = outbox_folder()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".record-", dir=root))
    for path in record.files:
        shutil.copy2(path, staging / path.name)
    row = {k: v for k, v in record.__dict__.items() if k != "files"}
    (staging / RECORD).write_text(json.dumps(row))
    while True:  # numbered after the newest: another process may take a number first
        number = 1 + max((int(p.name.split("-")[0]) for p in root.glob("[0-9]*")), default=0)
        try:
            os.rename(staging, root / f"{number:06d}-{record.what}")
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                shutil.rmtree(staging, ignore_errors=True)
                raise


def _send(record: Record) -> None:
    import mlflow
    from mlflow import MlflowClient

    from pipeline.tracking.lookup import find_training_run

    bound_waits("stage")
    mlflow.set_tracking_uri(record.uri)
    run_id = record.run_id
    if run_id is None:
        client = MlflowClient()
        experiment = client.get_experiment_by_name(record.experiment)
        run = experiment and find_training_run(client, [experiment.experiment_id], record.key)
        if not run:
            raise LookupError(f"{record.uri} has no run that trained {record.key}")
        run_id = run.info.run_id
    _sender(record.what)(run_id, record)


def send_kept() -> int:
    """Send every kept record, oldest first, removing each once the store took it; stops at
    the first that fails (raising its error). Returns how many were sent."""
    if not any(outbox_folder().glob("[0-9]*")):
        return 0
    sent = 0
    with waited(outbox_folder() / ".sending.lock", "the MLflow outbox", SEND_LOCK_WAIT_S):
        for folder, record in kept():
            _send(record)
            shutil.rmtree(folder)
            sent += 1
    return sent


def _sent(count: int, then: str | None = None) -> str:
    """What a catch-up sent, in words: the kept records, then the one at hand."""
    delayed = [f"{count} delayed record(s) from {paths.OUTBOX}"] if count or not then else []
    return ", then ".join(delayed + ([then] if then else []))


def caught_up(what: str, root: Path | None = None) -> None:
    """Once nothing is kept any more after an outage: say so, once (`what` was just sent)."""
    root = root or outbox_folder()
    if (root / DELAYED).exists() and not any(root.glob("[0-9]*")):
        with suppress(FileNotFoundError):  # another process said it first
            (root / DELAYED).unlink()
            print(f"MLflow caught up: sent {what}")


def announce_delay(
    uri: str, what: str, exc: BaseException, root: Path | None = None, kept_in: str = ""
) -> None:
    """Say once, when an outage begins, that logging is delayed (and where what waits is
    kept: the outbox, unless `kept_in` says otherwise); not again in each process while it
    lasts."""
    root = root or outbox_folder()
    kept_in = kept_in or f"kept in {paths.OUTBOX}"
    with suppress(OSError):
        root.mkdir(parents=True, exist_ok=True)
        os.close(os.open(root / DELAYED, os.O_CREAT | os.O_EXCL))
        print(
            f"warning: MLflow at {uri} did not take {what} ({describe_failure(exc)}); logging "
            f"is delayed: {kept_in} and sent when the store answers again",
            file=sys.stderr,
        )


def deliver(record: Record) -> None:
    """Send `record` after everything kept before it; when the store fails, keep it."""
    if DELIVERY.off:
        return
    try:
        sent = send_kept()
        _send(record)
    except Exception as exc:
        announce_delay(record.uri, record.what, exc)
        try:
            keep(record)
        except OSError as error:  # nowhere to keep it either: the stage's outputs still stand
            print(
                f"warning: could not keep {record.what} in {paths.OUTBOX} ({error}); "
                "going on without it",
                file=sys.stderr,
            )
        return
    caught_up(_sent(sent, record.what))


def settle(wait_s: float) -> bool:
    """Send what is kept, retrying for up to `wait_s` while the store does not answer. If some
    is still kept then, say what and how to send it later. True when nothing is left."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            caught_up(_sent(send_kept()))
            return True
        except Exception as exc:
            if time.monotonic() + RETRY_EVERY_S > deadline:
                left = kept()
                what = ", ".join(f"{r.what} of {r.run_id or r.key}" for _, r in left)
                print(
                    f"warning: MLflow did not answer within {wait_s:g} s "
                    f"({describe_failure(exc)}); kept in {paths.OUTBOX}: {what}; "
                    "`boostpipe sync` sends them once it answers",
                    file=sys.stderr,
                )
                return False
            time.sleep(RETRY_EVERY_S)


def run_of(key: str) -> str | None:
    """The run id a kept record gives for the run that trained `key`, if any."""
    return next((r.run_id for _, r in kept() if r.key == key and r.run_id), None)


def files_of(files: Iterable[Path]) -> tuple[Path, ...]:
    return tuple(path for path in files if path.exists())
