"""The failures a command reports in one line (no traceback), kept free of torch, Ray and MLflow
so that the entry points (`boostpipe --help`, a stage's error path) load in a fraction of a
second."""

from __future__ import annotations

import re


class DatasetNotFound(FileNotFoundError):
    """No location held the dataset; the message names every place looked in."""


class CorruptFile(ValueError):
    """An input file that cannot be read back (truncated, overwritten); the message is one line
    naming it and how to make it again."""


class NotWritable(OSError):
    """An output folder the stage cannot write; raised before the stage's work starts."""


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached; the message is one line naming it."""


def describe_failure(exc: BaseException) -> str:
    """An MLflow failure as a short phrase: the cause of a failed HTTP request, else the first
    line of the innermost error (a database's own message, not its wrappers')."""
    text = str(exc).strip()
    cause = re.search(r"(\[Errno -?\d+\] [^'\")]+|Read timed out|Connection aborted)", text)
    if "Max retries exceeded" in text or (cause and "API request" in text):
        return f"no answer ({cause.group(1) if cause else 'after retries'})"
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__
    lines = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {lines[0][:200]}" if lines else exc.__class__.__name__
