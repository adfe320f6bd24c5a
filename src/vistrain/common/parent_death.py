"""End a child process when its parent dies, however the parent dies (even ``kill -9``).

Two kinds of children must not outlive their parent: the ranks a launcher started (they would
train on, detached, to the last epoch) and DataLoader workers (a worker whose main process
was killed can block for ever flushing a batch into a pipe nobody reads). On Linux the kernel
does it: ``prctl(PR_SET_PDEATHSIG, sig)`` sends ``sig`` to this process when the thread that
started it exits. Elsewhere a daemon thread polls the parent's process id once a second.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


def _watch_parent(parent: int, sig: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), sig)


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Have ``sig`` sent to this process as soon as its parent process ends.

    Args:
        sig: The signal to receive (SIGKILL: nothing can delay the end).
        parent: The parent's process id as seen at start-up; when the parent is already gone
            by the time this runs (it died in between), ``sig`` is sent at once.
    """
    parent = os.getppid() if parent is None else parent
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the parent died before the kernel was told to watch it
        os.kill(os.getpid(), sig)
        return
    if not armed:
        threading.Thread(
            target=_watch_parent, args=(parent, int(sig)), name="vistrain-parent-watch", daemon=True
        ).start()


__all__ = ["die_with_parent"]
