"""Stopping a stage the same way whatever stopped it: Ctrl-C, SIGTERM, or its parent going away.

DVC runs each stage as a child process. If DVC itself is killed (a process manager, `kill
<pid>`), a stage left alone would keep training under PID 1 and later write outputs behind DVC's
back. So a stage asks the kernel for SIGTERM when its parent dies (Linux `PR_SET_PDEATHSIG`),
and watches the process above a shell parent (DVC runs stages through `$SHELL -c`, and dash
stays in between and outlives DVC). SIGTERM is handled as Ctrl-C: the stage unwinds (Ray shut
down on the way, checkpoints kept, no outputs written) and exits 128 + the signal number.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import psutil

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# Shells that may stand between DVC and a stage: `$SHELL -c cmd`, or /bin/sh when SHELL is unset.
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "fish", "ksh"})

_received: list[int] = []


def as_ctrl_c(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM handler that does what Ctrl-C does at this moment: whatever SIGINT handler
    is installed (Ray Tune's saves the search), else KeyboardInterrupt."""
    _received.append(signum)
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def stop_with_parent() -> None:
    """SIGTERM is Ctrl-C from now on, and arrives when the parent process dies, or the shell
    parent's own parent (Linux)."""
    signal.signal(signal.SIGTERM, as_ctrl_c)
    sigterm_when_parent_dies()
    sigterm_when_launcher_dies()


def sigterm_when_launcher_dies() -> None:
    """When the parent is a shell, SIGTERM once the shell's parent (DVC) exits: the kernel
    only watches the direct parent, and a shell waiting on us does not die with DVC."""
    parent = psutil.Process().parent()
    if parent is None or parent.name() not in SHELLS:
        return
    launcher = parent.parent()
    if launcher is None or launcher.pid == 1:
        return
    threading.Thread(target=_sigterm_after, args=(launcher.pid,), daemon=True).start()


def _sigterm_after(pid: int) -> None:
    """Wait for process `pid` to exit (a pidfd: no polling), then SIGTERM this process."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pass  # already gone
    except (AttributeError, OSError):  # no pidfd here (old kernel): poll instead
        while psutil.pid_exists(pid):
            time.sleep(1.0)
    else:
        select.select([pidfd], [], [])
        os.close(pidfd)
    os.kill(os.getpid(), signal.SIGTERM)


def sigterm_when_parent_dies() -> None:
    """Ask the kernel for SIGTERM when the parent process dies (Linux; elsewhere nothing). Also
    a `preexec_fn` for servers we start, so they never outlive us."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # not allowed here: the process still stops on SIGTERM and Ctrl-C
    if os.getppid() == 1:  # the parent was gone before we asked
        os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def sigint_handler_restored() -> Iterator[None]:
    """SIGINT's handler as it was before the block, and a SIGTERM during the block never lost.

    Ray Train installs a handler in `fit()` that aborts the run it started and never removes
    it: a Ctrl-C or SIGTERM after training would call it, find the run gone and exit 0
    silently. And when a SIGTERM lands as the last epoch ends, that handler finds the run
    already over and returns, so `fit()` returns as if nothing happened: the block then ends
    as an interruption, not with outputs written by a stage that was told to stop."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread handles signals (Tune runs trainers in threads)
        return
    previous = signal.getsignal(signal.SIGINT)
    received = len(_received)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if len(_received) > received:
        raise KeyboardInterrupt


def exit_code() -> int:
    """After an interruption: 128 + the signal that caused it (130 for Ctrl-C)."""
    return 128 + (_received[-1] if _received else signal.SIGINT)
