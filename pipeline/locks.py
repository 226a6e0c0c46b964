"""Exclusive ownership of a folder between processes: an fcntl lock on a file beside it.

The kernel drops the lock when its holder exits (kill -9 included), so a crashed owner never
leaves a stale lock behind; the file's text only says who holds it, for the refusal message.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Busy(RuntimeError):
    """Another live process holds the lock; the message is one line naming it."""


@contextmanager
def _opened(path: Path) -> Iterator[int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, timeout_s: float) -> bool:
    """Lock `fd`, waiting up to `timeout_s` (0: not at all); False if another holder kept it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold `path` locked for the block, or raise Busy at once naming the holder (PID, start)."""
    with _opened(path) as fd:
        if not _lock(fd, 0):
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            raise Busy(f"{what} is already running ({holder}); wait for it or stop it")
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()}, started {started}".encode(), 0)
        yield


@contextmanager
def waited(path: Path, what: str, timeout_s: float) -> Iterator[None]:
    """Hold `path` locked for the block, waiting up to `timeout_s` for another holder to let go
    (a short critical section, such as creating a store); then raise Busy naming it."""
    with _opened(path) as fd:
        if not _lock(fd, timeout_s):
            raise Busy(f"{what} stayed locked for {timeout_s:g} s ({path})")
        yield
