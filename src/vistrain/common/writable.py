"""Check, before a run starts, that a folder it will write into can take files.

A run that fails at its first checkpoint, after an epoch of training, because the folder is
read-only, a file, or on a full disk, loses that epoch. ``check_writable_folder`` finds these
cases at start by writing (and removing) a small probe file, and leaves nothing behind: a
folder that does not exist yet is probed through its nearest existing parent and not created.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil

MIN_FREE_BYTES = 64 * 1024 * 1024
"""Free space below which a run is refused at start (a checkpoint of a small model fits)."""

_PROBE_BYTES = b"vistrain write probe\n"


class NotWritableError(ValueError):
    """A folder a run must write into cannot take files; the message says why and what to do."""


def _nearest_existing(path: str) -> str:
    """``path`` or the closest of its parents that exists."""
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _reason(err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return "the disk is full"
    if err.errno == errno.EROFS:
        return "it is on a read-only file system"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "it is not writable (permission denied)"
    return err.strerror or str(err)


def check_writable_folder(
    folder: str | os.PathLike[str], what: str, hint: str, min_free_bytes: int = MIN_FREE_BYTES
) -> None:
    """Refuse ``folder`` unless files can be written into it (or into the parent that will hold it).

    Args:
        folder: The folder the run will write into; it need not exist yet.
        what: How the user names it, e.g. ``"--output-dir 'runs/a'"``.
        hint: What to do instead, e.g. ``"pass another --output-dir"``.
        min_free_bytes: Refuse a disk with less free space than this.

    Raises:
        NotWritableError: If ``folder`` (or a parent on its path) is a file, is read-only, or
            its disk is full; one line that names it and says what to do.
    """
    path = os.path.abspath(os.fspath(folder))
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"is under the file {existing!r}"
        raise NotWritableError(f"{what} {where}, not a folder; {hint}")
    probe = os.path.join(existing, f".vistrain-write-probe-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(probe, "wb") as handle:
            handle.write(_PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        shown = "" if existing == path else f" (its parent {existing!r})"
        raise NotWritableError(f"{what}{shown} cannot be written: {_reason(err)}; {hint}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    free = shutil.disk_usage(existing).free
    if free < min_free_bytes:
        raise NotWritableError(
            f"{what} is on a disk with only {free / 2**20:.1f} MiB free (a run needs at least "
            f"{min_free_bytes / 2**20:.0f} MiB); free some space or {hint}"
        )


__all__ = ["MIN_FREE_BYTES", "NotWritableError", "check_writable_folder"]
