"""The ``vistrain`` logger: one configuration per process, plain lines, optional log file.

``setup_logger`` configures the ``"vistrain"`` logger once per process: rank 0 logs at INFO,
the other ranks only WARNING and above, each line plain text with a time stamp, to standard
output and optionally to a log file (rank 0 only writes files).

The console handler looks ``sys.stdout`` up at every write instead of holding the stream it
saw at setup, so while a live progress bar (``vistrain.common.progress``) redirects standard
output, log lines pass through it and are printed above the bar instead of tearing it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from vistrain.common.distributed import get_rank

LOGGER_NAME = "vistrain"
"""Name of the package logger; modules log to ``vistrain.<module>`` children of it."""

_HANDLER_MARK = "_vistrain_handler"


def get_logger(name: str | None = None) -> logging.Logger:
    """The ``vistrain`` logger, or its child ``vistrain.<name>``."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


def silence_stdout() -> None:
    """Point standard output at the null device after its reader went away (``| head``).

    Without this every later write, and Python's last flush at exit, raises another
    ``BrokenPipeError``; the logger would print a "Logging error" traceback per line.
    """
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class _CurrentStdout:
    """A stream that writes to whatever ``sys.stdout`` is at the time of the write.

    When the reader of standard output goes away (``vistrain fit | head``), the console
    falls silent and the run goes on; ``log.txt`` still gets every line.
    """

    def write(self, text: str) -> int:
        try:
            return sys.stdout.write(text)
        except BrokenPipeError:
            silence_stdout()
            return len(text)

    def flush(self) -> None:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            silence_stdout()


def _level_number(level: int | str) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(
            f"Unknown log level {level!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL."
        )
    return number


def setup_logger(
    level: int | str | None = None, log_file: str | os.PathLike[str] | None = None
) -> logging.Logger:
    """Configure the ``vistrain`` logger for this process (calling it again reconfigures).

    Args:
        level: Level on rank 0 (default INFO). Other ranks log at WARNING or above,
            whichever is higher, so N processes do not print every line N times.
        log_file: Also append the lines to this file (rank 0 only; its folder is created).

    Returns:
        The configured ``vistrain`` logger. It does not propagate to the root logger, so
        lines are not printed twice when an application configured logging as well.

    Raises:
        ValueError: If ``level`` is not a known level name.
    """
    rank = get_rank()
    number = logging.INFO if level is None else _level_number(level)
    if rank != 0:
        number = max(number, logging.WARNING)
    logger = get_logger()
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            logger.removeHandler(handler)
            handler.close()
    prefix = "" if rank == 0 else f" [rank {rank}]"
    formatter = logging.Formatter(
        f"[%(asctime)s %(levelname)s]{prefix} %(message)s", datefmt="%Y-%m-%d %H:%M:%S"
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(_CurrentStdout())]
    if log_file is not None and rank == 0:
        folder = os.path.dirname(os.fspath(log_file))
        if folder:
            os.makedirs(folder, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        setattr(handler, _HANDLER_MARK, True)
        logger.addHandler(handler)
    logger.setLevel(number)
    logger.propagate = False
    return logger


def ensure_logger() -> logging.Logger:
    """Make sure ``vistrain`` log lines go somewhere, without overriding a user's setup.

    If neither the ``vistrain`` logger nor any ancestor has a handler, this calls
    ``setup_logger()``. If only the level is unset, it is set to INFO on rank 0 and WARNING
    elsewhere.
    """
    logger = get_logger()
    if not logger.hasHandlers():
        return setup_logger()
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO if get_rank() == 0 else logging.WARNING)
    return logger
