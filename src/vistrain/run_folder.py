"""One run per folder: refuse to train into a folder that holds a run, and lock it while training.

Two mistakes lose finished work: starting ``vistrain fit --output-dir D`` again without
``--resume`` (the new run would replace ``last.ckpt`` and ``best.ckpt``, prune the old periodic
checkpoints and interleave a second history into ``metrics.jsonl``), and starting a second
process on a folder that a live run is writing. :func:`check_new_run_folder` refuses the first
before anything is written; :class:`RunFolderLock` refuses the second.

The lock is an advisory ``fcntl.flock`` on ``D/.vistrain.lock``: the operating system drops it
when its holder dies, however it dies (even ``kill -9``), so a lock left behind by a dead process
is taken over at the next start (the file still names that process, and the takeover is
reported). The file records the holder's process id and host so that the refusal can say who
holds it.

A holder removes the file before it unlocks it, so a starter can open the old file, lose the
race to the removal and then lock a file that no longer has the name (while a third process
creates and locks a new one under it): both would hold "the" lock. So a lock only counts once
the locked file is still the one at the path; otherwise the starter lets go and tries the path
again (the usual check of lock files that are removed on release).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from types import TracebackType

logger = logging.getLogger("vistrain")

LOCK_NAME = ".vistrain.lock"
"""Name of the lock file inside a run folder."""

HELD_LOCK_ENV = "VISTRAIN_RUN_LOCK_HELD"
"""Set by the launcher for the processes it starts: the folder's lock is held by the launcher."""

RUN_MARKERS = ("metrics.jsonl", "checkpoints/last.ckpt", "checkpoints/best.ckpt")
"""Files whose presence means a folder holds a run (with any ``checkpoints/*.ckpt``)."""

_LOCK_ATTEMPTS = 100
"""How often a start retries a lock file that was removed under it before it gives up."""


class RunFolderError(ValueError):
    """The run folder cannot be used for this run; the message says why and what to do."""


def existing_run_files(output_dir: str | os.PathLike[str]) -> list[str]:
    """The files of ``output_dir`` that show it already holds a run, relative to it.

    Args:
        output_dir: The run folder.

    Returns:
        Sorted relative paths of ``metrics.jsonl`` and the checkpoint files found; empty for a
        missing or fresh folder.
    """
    root = Path(output_dir)
    found = {name for name in RUN_MARKERS if (root / name).is_file()}
    ckpt_dir = root / "checkpoints"
    if ckpt_dir.is_dir():
        found.update(f"checkpoints/{p.name}" for p in ckpt_dir.glob("*.ckpt") if p.is_file())
    return sorted(found)


def check_new_run_folder(output_dir: str | os.PathLike[str]) -> None:
    """Refuse to start a new run in a folder that already holds one.

    Args:
        output_dir: The folder ``vistrain fit`` would write into without ``--resume``.

    Raises:
        RunFolderError: ``output_dir`` holds checkpoints or a ``metrics.jsonl``; the message
            names what was found and offers ``--resume`` or a new folder.
    """
    found = existing_run_files(output_dir)
    if not found:
        return
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    raise RunFolderError(
        f"--output-dir {os.fspath(output_dir)!r} already holds a run ({shown}); continue it with "
        "--resume, or pass a new --output-dir"
    )


class RunFolderLock:
    """Exclusive lock on a run folder for the lifetime of one training process.

    Use as a context manager around the run. Entering creates the folder if needed and takes the
    lock or raises :class:`RunFolderError` naming the live process that holds it. A lock file
    left by a process that died is taken over with a warning. Leaving releases the lock
    and removes the file.
    """

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock; see the class docstring.

        Raises:
            RunFolderError: A live process holds the lock (the message names it), or the lock
                file was replaced under this process on every one of ``_LOCK_ATTEMPTS`` tries.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_LOCK_ATTEMPTS):
            fd = self._lock_file()
            if _is_file_at(fd, self.path):
                break
            os.close(fd)  # locked a file its holder had just removed: lock the path's file
        else:
            raise RunFolderError(
                f"could not lock run folder {os.fspath(self.path.parent)!r}: its lock file was "
                f"replaced {_LOCK_ATTEMPTS} times while locking it; retry, or pass another "
                "--output-dir"
            )
        previous = _read_holder(fd)
        if previous != "an unknown process":
            logger.warning("Took over the lock of %s, which is no longer running.", previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def _lock_file(self) -> int:
        """Open (or create) the lock file and lock it without waiting; return the open fd.

        Raises:
            RunFolderError: Another process holds the lock; the message names it.
        """
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderError(
                f"run folder {os.fspath(self.path.parent)!r} is in use by {holder}; wait for it "
                "to finish or pass another --output-dir"
            ) from None
        return fd

    def release(self) -> None:
        """Remove the lock file, then release the lock (idempotent).

        The file goes first, while it is still locked: a process that opened it meanwhile finds
        it gone once it gets the lock, and retries (see :meth:`acquire`).
        """
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunFolderLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _is_file_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is the file that ``path`` names now (not a removed one)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)


def _read_holder(fd: int) -> str:
    """Describe the process recorded in an open lock file: ``process PID on HOST``."""
    text = os.pread(fd, 256, 0).decode(errors="replace").split()
    if len(text) >= 2 and text[0].isdigit():
        return f"process {text[0]} on {text[1]}"
    return "an unknown process"


__all__ = [
    "HELD_LOCK_ENV",
    "LOCK_NAME",
    "RunFolderError",
    "RunFolderLock",
    "check_new_run_folder",
    "existing_run_files",
]
