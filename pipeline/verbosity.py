"""What reaches the console: our progress, results and warnings that matter. Libraries' routine
lines (Ray Train logs every report and checkpoint of every worker, MLflow its database setup)
stay off it unless `BOOSTPIPE_VERBOSE=1`, which also prints tracebacks above one-line errors."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

VERBOSE_ENV = "BOOSTPIPE_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def library_log_level() -> str:
    """For Ray's `LoggingConfig` (the job's processes and Ray Train's own loggers). Errors
    only: Train's warnings are about its own plumbing (on a busy machine its controller prints
    "Failed to send resource request ... safe to ignore" with a traceback), and a failure that
    matters ends `fit()` with an exception we report."""
    return "INFO" if verbose() else "ERROR"


def quiet_worker() -> None:
    """In a Ray Train worker or Tune trial: no library INFO records (Ray Train logs each report
    through a logger named after its source file, outside the level Ray's config sets), and no
    traceback when Ray's stop lands in a finalizer. Our progress lines are console prints, not
    log records, so they still show."""
    if not verbose():
        logging.disable(logging.INFO)
        sys.unraisablehook = _quiet_stop


def _quiet_stop(unraisable: sys.UnraisableHookArgs) -> None:
    """Ray stops an actor by raising SystemExit in it; raised inside a weakref callback or a
    `__del__`, the interpreter would print it as an "Exception ignored" traceback, which Ray
    forwards to the console. Every other such exception is printed as before."""
    if not isinstance(unraisable.exc_value, SystemExit | KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def quiet_driver() -> None:
    """In a stage or command: MLflow's INFO lines (database creation and migration) and Ray's
    driver-side notices (that the local cluster uses token authentication, on every start) off;
    errors still show."""
    if not verbose():
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("ray").setLevel(logging.ERROR)


_console: list[TextIO] = []  # the real stdout while `chatter_to` redirects it


def console_file() -> TextIO:
    """Where our own live output goes: the console, even while Ray's chatter is redirected."""
    return _console[-1] if _console else sys.stdout


@contextlib.contextmanager
def chatter_to(path: Path) -> Iterator[None]:
    """Ray Tune's progress report (it prints to stdout) and Ray's log records from INFO up go
    to `path` (appended) for the block instead of the console, where they would interleave
    with our live table; with `BOOSTPIPE_VERBOSE=1` they stay on the console."""
    if verbose():
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    ray_logger = logging.getLogger("ray")
    saved = ray_logger.level, ray_logger.handlers[:]
    real = sys.stdout
    with path.open("a") as log, contextlib.redirect_stdout(log):
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ray_logger.handlers = [handler]
        ray_logger.setLevel(logging.INFO)
        _console.append(real)
        try:
            yield
        finally:
            _console.pop()
            ray_logger.setLevel(saved[0])
            ray_logger.handlers = saved[1]
