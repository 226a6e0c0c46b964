"""What reaches the console: our progress, results and warnings that matter. Libraries' routine
lines (Ray Train logs every report and checkpoint of every worker, MLflow its database setup)
stay off it unless `BOOSTPIPE_VERBOSE=1`, which also prints tracebacks above one-line errors."""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "BOOSTPIPE_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def library_log_level() -> str:
    """For Ray's `LoggingConfig` (the job's processes and Ray Train's own loggers)."""
    return "INFO" if verbose() else "WARNING"


def quiet_worker() -> None:
    """In a Ray Train worker: no library INFO records (Ray Train logs each report through a
    logger named after its source file, outside the level Ray's config sets). Our progress lines
    are console prints, not log records, so they still show."""
    if not verbose():
        logging.disable(logging.INFO)


def quiet_driver() -> None:
    """In a stage or command: MLflow's INFO lines (database creation and migration) and Ray's
    driver-side notices (that the local cluster uses token authentication, on every start) off;
    errors still show."""
    if not verbose():
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("ray").setLevel(logging.ERROR)
