"""A pausable wall-clock timer on ``time.perf_counter``.

The logging callback keeps one for training and one for testing. Training time must not
include validation, so the training timer is paused while the model is evaluated and resumed
at the next training batch. Pausing a paused timer or resuming a running one does nothing,
so repeated validations (or a test run before any training) can never leave it in a bad state.
"""

from __future__ import annotations

import time


class Timer:
    """Measures running time in seconds, excluding the time it spent paused.

    Example::

        timer = Timer()          # starts running
        ...                      # work, counted
        timer.pause()
        ...                      # validation, not counted
        timer.resume()
        seconds = timer.elapsed()

    Args:
        start: Start running immediately (True) or wait for ``start()``/``resume()``.
    """

    def __init__(self, start: bool = True) -> None:
        self._accumulated = 0.0
        self._started_at: float | None = None
        if start:
            self.start()

    @property
    def running(self) -> bool:
        """True while the timer counts time."""
        return self._started_at is not None

    def start(self) -> None:
        """Reset to zero and start counting."""
        self._accumulated = 0.0
        self._started_at = time.perf_counter()

    def reset(self) -> None:
        """Reset to zero and stop counting (``resume()`` or ``start()`` starts again)."""
        self._accumulated = 0.0
        self._started_at = None

    def pause(self) -> None:
        """Stop counting, keeping the time so far. Does nothing if already paused."""
        if self._started_at is not None:
            self._accumulated += time.perf_counter() - self._started_at
            self._started_at = None

    def resume(self) -> None:
        """Continue counting from the time so far. Does nothing if already running."""
        if self._started_at is None:
            self._started_at = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds counted so far (excluding paused time)."""
        if self._started_at is None:
            return self._accumulated
        return self._accumulated + (time.perf_counter() - self._started_at)
