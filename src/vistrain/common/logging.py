"""The ``vistrain`` logger and the progress display.

Two pieces of output plumbing every run shares:

* ``setup_logger`` configures the ``"vistrain"`` logger once per process: rank 0 logs at
  INFO, the other ranks only WARNING and above, each line plain text with a time stamp, to
  standard output and optionally to a log file (rank 0 only writes files).
* ``create_progress_display`` picks how progress is shown. On an interactive terminal
  (``sys.stdout.isatty()`` and ``TERM`` is not ``dumb``) a live ``rich`` progress bar sits at
  the bottom and log lines scroll above it. Anywhere else (a file, a pipe, a CI log) there is
  no live display at all: progress reaches the reader only as the plain log lines, without
  carriage returns or ANSI escape codes. ``VISTRAIN_PROGRESS=plain|rich|auto`` overrides the
  choice.

The console handler looks ``sys.stdout`` up at every write instead of holding the stream it
saw at setup, so while the live bar redirects standard output, log lines pass through it and
are printed above the bar instead of tearing it.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import IO, Any

from vistrain.common.distributed import get_rank

LOGGER_NAME = "vistrain"
"""Name of the package logger; modules log to ``vistrain.<module>`` children of it."""

PROGRESS_ENV = "VISTRAIN_PROGRESS"
"""Environment variable that forces the progress display: ``plain``, ``rich`` or ``auto``."""

_PROGRESS_MODES = ("auto", "plain", "rich")
_HANDLER_MARK = "_vistrain_handler"


def get_logger(name: str | None = None) -> logging.Logger:
    """The ``vistrain`` logger, or its child ``vistrain.<name>``."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


class _CurrentStdout:
    """A stream that writes to whatever ``sys.stdout`` is at the time of the write."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


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


def progress_mode(stream: IO[str] | None = None) -> str:
    """``"rich"`` or ``"plain"``: the progress display for ``stream`` (default stdout).

    ``VISTRAIN_PROGRESS`` (``plain``, ``rich`` or ``auto``) wins over detection; ``auto``
    (the default) chooses ``rich`` only for an interactive terminal whose ``TERM`` is not
    ``dumb``.

    Raises:
        ValueError: If ``VISTRAIN_PROGRESS`` holds another value.
    """
    mode = os.environ.get(PROGRESS_ENV, "auto").strip().lower() or "auto"
    if mode not in _PROGRESS_MODES:
        raise ValueError(
            f"{PROGRESS_ENV}={os.environ[PROGRESS_ENV]!r} is not valid; use one of "
            f"{', '.join(_PROGRESS_MODES)}."
        )
    if mode != "auto":
        return mode
    stream = sys.stdout if stream is None else stream
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError):
        interactive = False
    if interactive and os.environ.get("TERM", "") != "dumb":
        return "rich"
    return "plain"


class ProgressDisplay:
    """Plain progress: no live display; progress is told by the log lines alone.

    This base class is also the display of non-zero ranks. Subclasses draw live progress.
    Tasks are named by a key (``"train"``, ``"test"``); methods take the key.
    """

    live = False
    """True when the display draws by itself and wants ``update_task`` calls between logs."""

    def start_task(self, key: str, description: str, total: int | None, completed: int = 0) -> None:
        """Show a task (or restart the one with this key) at ``completed`` of ``total``."""

    def update_task(
        self, key: str, completed: int, info: str | None = None, redraw: bool = False
    ) -> None:
        """Move a task to ``completed``; ``info`` replaces the text shown beside it.

        ``redraw`` draws at once instead of at the next periodic refresh (use it before
        logging a line, which repeats the last drawn bar under it).
        """

    def end_task(self, key: str) -> None:
        """Remove a task; a live display that shows no task any more stops drawing."""

    def close(self) -> None:
        """Stop drawing and give the terminal back."""


class RichProgressDisplay(ProgressDisplay):
    """A live ``rich`` progress bar at the bottom of the terminal.

    While it draws, ``rich`` redirects standard output, and lines logged through
    ``setup_logger``'s handler are printed above the bar. It stops drawing when its last
    task ends, on ``close()`` and at interpreter exit (which restores the cursor).

    Args:
        force_terminal: Draw even if standard output is not a terminal (``VISTRAIN_PROGRESS=rich``).
        refresh_per_second: How often the bar is redrawn (by rich's own thread).
    """

    live = True

    def __init__(self, force_terminal: bool = False, refresh_per_second: float = 4.0) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(force_terminal=True) if force_terminal else Console()
        self._progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            refresh_per_second=refresh_per_second,
        )
        self._tasks: dict[str, Any] = {}
        self._started = False
        self._atexit_registered = False

    def _ensure_started(self) -> None:
        if not self._started:
            self._progress.start()
            self._started = True
            if not self._atexit_registered:
                atexit.register(self.close)
                self._atexit_registered = True

    def start_task(self, key: str, description: str, total: int | None, completed: int = 0) -> None:
        """Show a task (or restart the one with this key) at ``completed`` of ``total``."""
        self._ensure_started()
        task_id = self._tasks.get(key)
        if task_id is None:
            self._tasks[key] = self._progress.add_task(
                description, total=total, completed=completed, info=""
            )
        else:
            self._progress.reset(
                task_id, total=total, completed=completed, description=description, info=""
            )

    def update_task(
        self, key: str, completed: int, info: str | None = None, redraw: bool = False
    ) -> None:
        """Move a task to ``completed``; ``info`` replaces the text shown beside it.

        ``redraw`` draws at once instead of at the next periodic refresh (use it before
        logging a line, which repeats the last drawn bar under it).
        """
        task_id = self._tasks.get(key)
        if task_id is None:
            return
        if info is None:
            self._progress.update(task_id, completed=completed, refresh=redraw)
        else:
            self._progress.update(task_id, completed=completed, info=info, refresh=redraw)

    def end_task(self, key: str) -> None:
        """Remove a task; with no task left the bar stops drawing."""
        task_id = self._tasks.pop(key, None)
        if task_id is not None:
            self._progress.remove_task(task_id)
        if not self._tasks:
            self.close()

    def close(self) -> None:
        """Stop drawing and give the terminal back (safe to call more than once)."""
        if self._started:
            self._started = False
            self._progress.stop()
            for task_id in self._tasks.values():
                self._progress.remove_task(task_id)
            self._tasks.clear()


def create_progress_display(mode: str | None = None) -> ProgressDisplay:
    """The progress display for this process.

    Args:
        mode: ``"plain"``, ``"rich"`` or ``"auto"``; None reads ``VISTRAIN_PROGRESS``
            and detects the terminal (see ``progress_mode``).

    Returns:
        A ``RichProgressDisplay`` on rank 0 when the mode is rich, otherwise the plain
        ``ProgressDisplay`` (which draws nothing).

    Raises:
        ValueError: If ``mode`` is not one of the modes above.
    """
    if mode is not None and mode not in _PROGRESS_MODES:
        raise ValueError(f"mode={mode!r} is not valid; use one of {', '.join(_PROGRESS_MODES)}.")
    if get_rank() != 0:
        return ProgressDisplay()
    if mode is None or mode == "auto":
        chosen = progress_mode()
        forced = os.environ.get(PROGRESS_ENV, "auto").strip().lower() == "rich"
    else:
        chosen = mode
        forced = mode == "rich"
    if chosen == "rich":
        return RichProgressDisplay(force_terminal=forced)
    return ProgressDisplay()
