"""MLflow tracking: one run per trained model, filled in by train, calibrate and evaluate.

- `store`: which store, reached with bounded waits, and the experiment;
- `runs`: a run's lifecycle and status, and best-effort logging beside a stage's work;
- `logs`: per-epoch metrics (live from the workers), the evaluation, artifacts;
- `outbox`: records kept on disk while the store is away, sent once it answers;
- `export`: the logged model and the registry;
- `lookup`: runs read back (the run that trained a model, a run by reference, its curves).

The names callers use are gathered here; importing the package only defines them.
"""

from pipeline.errors import TrackingUnavailable
from pipeline.tracking.export import log_model, log_training, register
from pipeline.tracking.logs import (
    EpochLogger,
    epoch_metrics,
    log_artifacts,
    log_evaluation,
    log_metrics,
)
from pipeline.tracking.lookup import RUN_TAG, find_training_run
from pipeline.tracking.outbox import deliver, outbox_folder, send_kept, settle
from pipeline.tracking.runs import (
    SESSION,
    TrackingSession,
    best_effort,
    flatten,
    link_run,
    record,
    resume_run,
    start_run,
    status_of,
    training_run,
)
from pipeline.tracking.store import (
    bound_waits,
    check_server,
    connect,
    current_uri,
    local_store,
    project_root,
    reach,
    tracking_uri,
)

__all__ = [
    "RUN_TAG",
    "SESSION",
    "EpochLogger",
    "TrackingSession",
    "TrackingUnavailable",
    "best_effort",
    "bound_waits",
    "check_server",
    "connect",
    "current_uri",
    "deliver",
    "epoch_metrics",
    "find_training_run",
    "flatten",
    "link_run",
    "local_store",
    "log_artifacts",
    "log_evaluation",
    "log_metrics",
    "log_model",
    "log_training",
    "outbox_folder",
    "project_root",
    "reach",
    "record",
    "register",
    "resume_run",
    "send_kept",
    "settle",
    "start_run",
    "status_of",
    "tracking_uri",
    "training_run",
]
