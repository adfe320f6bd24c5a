"""How progress is shown: a live bar on a terminal, nothing but log lines elsewhere.

``create_progress_display`` picks the display. On an interactive terminal
(``sys.stdout.isatty()`` and ``TERM`` is not ``dumb``) a live ``rich`` bar sits at the bottom
and log lines scroll above it. Anywhere else (a file, a pipe, a CI log) there is no live display
at all: progress reaches the reader only as the plain log lines, without carriage returns or
ANSI escape codes. ``VISTRAIN_PROGRESS=plain|rich|auto`` overrides the choice.

The live bar keeps to the terminal's width: one row per task with the description, the bar
(it takes the width that is left), ``k/N``, the elapsed time and the ETA, and the task's
metrics on a line of their own below it, cut with an ellipsis where the terminal ends, so
metrics never push the bar out. The display is transient: when it stops, its last frame is
erased instead of lingering below the run's final output.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Iterable
from typing import IO, Any

from vistrain.common.distributed import get_rank

PROGRESS_ENV = "VISTRAIN_PROGRESS"
"""Environment variable that forces the progress display: ``plain``, ``rich`` or ``auto``."""

_PROGRESS_MODES = ("auto", "plain", "rich")


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
        self,
        key: str,
        completed: int,
        eta: str | None = None,
        metrics: str | None = None,
        redraw: bool = False,
    ) -> None:
        """Move a task to ``completed``.

        Args:
            key: The task.
            completed: Units done.
            eta: Replaces the ETA text (``H:MM:SS`` or ``?``) when given.
            metrics: Replaces the metrics line shown under the task when given.
            redraw: Draw at once instead of at the next periodic refresh (use it before
                logging a line, which repeats the last drawn bar under it).
        """

    def end_task(self, key: str) -> None:
        """Remove a task; a live display that shows no task any more stops drawing."""

    def close(self) -> None:
        """Stop drawing and give the terminal back."""


def _bar_with_metrics_class() -> type[Any]:
    """A ``rich`` ``Progress`` that renders each task's metrics on a line below the bars."""
    from rich.progress import Progress
    from rich.text import Text

    class BarWithMetrics(Progress):
        def get_renderables(self) -> Iterable[Any]:
            yield self.make_tasks_table(self.tasks)
            for task in self.tasks:
                metrics = task.fields.get("metrics", "")
                if task.visible and metrics:
                    yield Text(f"  {metrics}", no_wrap=True, overflow="ellipsis")

    return BarWithMetrics


class RichProgressDisplay(ProgressDisplay):
    """A live ``rich`` progress bar at the bottom of the terminal.

    Each task is one row, ``Epoch 3 ━━━━━━━━━━━━━━━━━━━━ 40/120 0:00:19 ETA 0:07:38``, sized to
    the terminal (the bar takes what the other columns leave); its metrics are a second line,
    cut at the terminal's edge. While it draws, ``rich`` redirects standard output, and lines
    logged through ``setup_logger``'s handler are printed above the bar. It stops drawing and
    erases itself when its last task ends, on ``close()`` and at interpreter exit (which
    restores the cursor).

    Args:
        force_terminal: Draw even if standard output is not a terminal (``VISTRAIN_PROGRESS=rich``).
        refresh_per_second: How often the bar is redrawn (by rich's own thread).
    """

    live = True

    def __init__(self, force_terminal: bool = False, refresh_per_second: float = 4.0) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.table import Column

        console = Console(force_terminal=True) if force_terminal else Console()
        self._progress = _bar_with_metrics_class()(
            TextColumn("{task.description}", markup=False, table_column=Column(no_wrap=True)),
            BarColumn(bar_width=None, table_column=Column(ratio=1, no_wrap=True)),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TimeElapsedColumn(table_column=Column(no_wrap=True)),
            TextColumn("ETA {task.fields[eta]}", markup=False, table_column=Column(no_wrap=True)),
            console=console,
            refresh_per_second=refresh_per_second,
            expand=True,
            transient=True,
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
        fields = {"eta": "?", "metrics": ""}
        if task_id is None:
            self._tasks[key] = self._progress.add_task(
                description, total=total, completed=completed, **fields
            )
        else:
            self._progress.reset(
                task_id, total=total, completed=completed, description=description, **fields
            )

    def update_task(
        self,
        key: str,
        completed: int,
        eta: str | None = None,
        metrics: str | None = None,
        redraw: bool = False,
    ) -> None:
        """Move a task to ``completed``; ``eta`` and ``metrics`` replace their texts when given.

        ``redraw`` draws at once instead of at the next periodic refresh (use it before
        logging a line, which repeats the last drawn bar under it).
        """
        task_id = self._tasks.get(key)
        if task_id is None:
            return
        fields = {}
        if eta is not None:
            fields["eta"] = eta
        if metrics is not None:
            fields["metrics"] = metrics
        self._progress.update(task_id, completed=completed, refresh=redraw, **fields)

    def end_task(self, key: str) -> None:
        """Remove a task; with no task left the bar stops drawing."""
        task_id = self._tasks.pop(key, None)
        if task_id is not None:
            self._progress.remove_task(task_id)
        if not self._tasks:
            self.close()

    def close(self) -> None:
        """Stop drawing, erase the bar and give the terminal back (safe to call more than once)."""
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
