"""A run's lifecycle: opened (or reopened after an interruption) with a real write, found again
by later stages, and its status following the work (`status_of`): RUNNING while a stage or
search runs, KILLED when interrupted, FAILED on an error, FINISHED once evaluate (or the
search) completes. Logging beside a stage's work is best effort: it never costs the stage its
outputs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.errors import TrackingUnavailable, describe_failure
from pipeline.paths import OUTBOX
from pipeline.tracking.lookup import RUN_TAG, find_training_run
from pipeline.tracking.outbox import (
    DELIVERY,
    Record,
    announce_delay,
    caught_up,
    files_of,
    run_of,
    send_kept,
)
from pipeline.tracking.store import connect, tracking_uri


@dataclass
class TrackingSession:
    """What this process did with the store, in one place: the runs it opened and has not
    ended (newest last), and what `best_effort` could not log (after one failure it stops)."""

    opened: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def forget(self, run_id: str | None) -> None:
        """`run_id` has ended once: an enclosing block does not end it again."""
        if run_id in self.opened:
            self.opened.remove(run_id)


SESSION = TrackingSession()  # this process's


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"boost": {"temperature": [0.5]}} -> {"boost.temperature": "[0.5]"}."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except OSError:
        return ""


def run_tags(fingerprint: str, device: str) -> dict[str, str]:
    """MLflow's own source tags (its UI shows them) and ours: uncommitted changes, the data."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_TYPE

    tags = {
        MLFLOW_GIT_COMMIT: _git("rev-parse", "HEAD"),
        MLFLOW_GIT_BRANCH: _git("rev-parse", "--abbrev-ref", "HEAD"),
        MLFLOW_SOURCE_TYPE: "LOCAL",
        "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "data.fingerprint": fingerprint,
        "host": socket.gethostname(),
        "device": device,
    }
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        tags["dvc.experiment"] = experiment
    return tags


def run_title(params: Params) -> str:
    """What the UI lists: the DVC experiment's name when there is one, else what was trained."""
    variant = "boostnet" if params.boost.enabled else "baseline"
    default = f"{variant}-{params.data.dataset}-seed{params.seed}"
    return os.environ.get("DVC_EXP_NAME") or default


def start_run(
    params: Params, fingerprint: str, source: str, previous: Path, name: str | None = None
) -> str:
    """A new run with the whole config as params, or the run an interrupted attempt left in
    `previous` (so a resumed training or search stays one run), marked RUNNING. Both end with a
    real write (tag `boostpipe.attempt`, the attempt's start), so a store that reads but cannot
    write (read-only, locked) fails here in one line, before any training."""
    from mlflow import MlflowClient

    experiment_id = connect(params)
    client = MlflowClient()
    try:
        if previous.exists():
            run_id = previous.read_text().strip()
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = _create_run(client, experiment_id, params, fingerprint, source, name)
        client.set_tag(run_id, "boostpipe.attempt", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    except Exception as exc:
        import mlflow

        raise TrackingUnavailable(
            f"tracking store {mlflow.get_tracking_uri()}: cannot write ({describe_failure(exc)})"
        ) from None
    previous.parent.mkdir(parents=True, exist_ok=True)
    previous.write_text(run_id)
    SESSION.opened.append(run_id)
    return run_id


def _create_run(
    client: Any, experiment_id: str, params: Params, fingerprint: str, source: str, name: str | None
) -> str:
    """A RUNNING run with every param, and the training, held-out and test splits as its
    inputs (MLflow's dataset contexts training, validation and testing)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag, Param
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    run = client.create_run(
        experiment_id, run_name=name or run_title(params), tags=run_tags(fingerprint, "pending")
    )
    run_id = run.info.run_id
    flat = flatten(params.model_dump(mode="json"))
    client.log_batch(run_id, params=[Param(k, v) for k, v in flat.items()])
    # MLflow registers its local-file source class twice, so resolving a local path warns that
    # it "can be interpreted in multiple ways" (the same class, twice) on every run.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
        origin = resolve_dataset_source(source)
    splits = {"train": "training", "val": "validation", "test": "testing"}
    if not params.data.val_size:
        del splits["val"]  # nothing held out
    inputs = [
        DatasetInput(
            MetaDataset(
                origin, name=f"{params.data.dataset}/{split}", digest=fingerprint
            )._to_mlflow_entity(),
            tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)],
        )
        for split, context in splits.items()
    ]
    client.log_inputs(run_id, inputs)
    return run_id


@contextmanager
def status_of(run_id: str | None = None, finish: bool = False) -> Iterator[None]:
    """The run's status follows the block: KILLED when it is interrupted (Ctrl-C, SIGTERM),
    FAILED when it raises, FINISHED when it completes and `finish`, else still RUNNING.
    Without `run_id`: the run this process opened, if any (every stage runs in such a block;
    evaluate's logging finishes the run). A failing store costs one warning line."""

    def end(status: str) -> None:
        target = run_id or (SESSION.opened[-1] if SESSION.opened else None)
        if target is not None:
            best_effort(lambda: terminate(target, status), "the run's status")
        SESSION.forget(target)

    try:
        yield
    except KeyboardInterrupt:
        end("KILLED")
        raise
    except Exception:
        end("FAILED")
        raise
    if finish:
        end("FINISHED")


def terminate(run_id: str, status: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, status)


def finish_run(run_id: str) -> None:
    """The run is FINISHED (its last stage logged): the stage's `status_of` leaves it so."""
    terminate(run_id, "FINISHED")
    SESSION.forget(run_id)


def link_run(run_id: str, key: str) -> None:
    """Tag the run with what it trained (see lookup.RUN_TAG), so later stages find it."""
    from mlflow import MlflowClient

    MlflowClient().set_tag(run_id, RUN_TAG, key)


class NoSuchRun(TrackingUnavailable):
    """The store answers but holds no run that trained the model."""


def training_run(params: Params, key: str) -> str:
    """The id of the run that trained `key` in the configured store (calibrate and evaluate
    log into it); a store without it raises one line saying so."""
    import mlflow
    from mlflow import MlflowClient

    experiment_id = connect(params)
    run = find_training_run(MlflowClient(), [experiment_id], key)
    if run is None:
        raise NoSuchRun(
            f"{mlflow.get_tracking_uri()} has no run that trained {key} (trained against "
            "another store?); `dvc repro --force train` trains and logs it here"
        )
    return run.info.run_id


def resume_run(params: Params, key: str) -> str | None:
    """The run that trained `key` in the configured store, marked RUNNING again while a later
    stage logs into it (calibrate, evaluate), after the records kept while the store was away
    have been sent. When the store does not answer: the run a kept record names, else None
    (the stage's records then name `key`, and go to the outbox too)."""
    from mlflow import MlflowClient

    try:
        sent = send_kept()
        run_id = training_run(params, key)
    except NoSuchRun as exc:  # the store answers but lacks the run: nothing to send later
        DELIVERY.off = str(exc)
        _warn("the training run", exc)
        return None
    except Exception as exc:
        announce_delay(tracking_uri(params), "the run's lookup", exc)
        return run_of(key)
    if sent:
        caught_up(f"{sent} delayed record(s) from {OUTBOX}")
    SESSION.opened.append(run_id)
    best_effort(lambda: MlflowClient().update_run(run_id, status="RUNNING"), "the run's status")
    return run_id


def record(
    params: Params,
    key: str,
    run_id: str | None,
    what: str,
    details: dict[str, Any] | None = None,
    files: list[Path] | None = None,
) -> Record:
    """A record for the run that trained `key` (`run_id` when known) in the configured store:
    its sender `what` (see outbox.SENDERS), JSON `details` and the files of `files` that exist."""
    return Record(
        tracking_uri(params),
        params.tracking.experiment,
        key,
        run_id,
        what,
        details or {},
        files_of(files or []),
    )


def send_status(run_id: str, record: Record) -> None:
    terminate(run_id, record.details["status"])


def best_effort(action: Callable[[], None], what: str) -> None:
    """Tracking beside a stage's work: a failure is one warning line, never fatal, and later
    calls are skipped (a dead server is not waited on again, nor reported twice)."""
    if SESSION.failed:
        return
    try:
        action()
    except Exception as exc:
        _warn(what, exc)


def _warn(what: str, exc: Exception) -> None:
    SESSION.failed.append(what)
    print(
        f"warning: could not log {what} to MLflow ({describe_failure(exc)}); going on without it",
        file=sys.stderr,
    )
