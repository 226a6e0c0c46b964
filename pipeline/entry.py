"""How a command or a DVC stage ends: bad input in one line and a non-zero exit, interruptions
as 128 + the signal. Apart from the CLI, so a stage imports only this, not every command."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from pipeline.config import ConfigError
from pipeline.errors import (
    CorruptFile,
    DatasetNotFound,
    NotWritable,
    TrackingUnavailable,
    describe_failure,
)
from pipeline.folders import DatasetError
from pipeline.locks import Busy
from pipeline.verbosity import quiet_driver, verbose

ONE_LINE_ERRORS = (
    DatasetNotFound,
    DatasetError,
    TrackingUnavailable,
    Busy,
    CorruptFile,
    NotWritable,
)


# What MLflow raises, itself or from its SQL and HTTP layers: a tracking store error.
TRACKING_MODULES = ("mlflow", "sqlalchemy", "requests", "urllib3")


def exits_on_config_error(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad params end the command with one line on stderr and exit code 2, no traceback;
    a missing dataset, a bad dataset folder, image or file, an unwritable output folder, a
    search another process runs, or a tracking store that fails likewise with exit code 1.
    BOOSTPIPE_VERBOSE=1 prints the traceback above the line."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ConfigError as exc:
            _fail(str(exc), 2)
        except ONE_LINE_ERRORS as exc:
            _fail(str(exc), 1)
        except Exception as exc:
            if not type(exc).__module__.startswith(TRACKING_MODULES):
                raise
            store = sys.modules["mlflow"].get_tracking_uri()
            _fail(f"tracking store {store}: {describe_failure(exc)}", 1)

    return wrapper


def _fail(message: str, code: int) -> None:
    if verbose():
        import traceback

        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def stage_main(command: Callable[..., Any]) -> Callable[..., Any]:
    """A DVC stage's entry: errors reported as by the commands; it stops as on Ctrl-C when
    its parent (DVC) goes away or sends SIGTERM, and an interruption exits 128 + the signal
    (130 for Ctrl-C) with one line instead of a traceback. The MLflow run the stage opened
    ends KILLED or FAILED with it."""
    from pipeline import interrupts, tracking
    from pipeline.io import checked_before_writing
    from pipeline.params_guard import ParamsGuard

    @wraps(command)
    def tracked(*args: Any, **kwargs: Any) -> Any:
        with tracking.status_of():
            return command(*args, **kwargs)

    reporting = exits_on_config_error(tracked)

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        interrupts.stop_with_parent()
        quiet_driver()
        spec = getattr(sys.modules[command.__module__], "__spec__", None)
        stage = spec.name if spec else command.__module__  # stages.x, also as __main__
        # Params edited while the stage runs: stop before writing, or dvc.lock would record them.
        guard = ParamsGuard(stage.rpartition(".")[2])
        try:
            with checked_before_writing(guard.check):
                return reporting(*args, **kwargs)
        except KeyboardInterrupt:
            code = interrupts.exit_code()
            click.echo(
                f"{stage}: interrupted by {signal.Signals(code - 128).name}; "
                "`dvc repro` runs it again (training resumes from its last checkpoint)",
                err=True,
            )
            sys.exit(code)

    return wrapper
