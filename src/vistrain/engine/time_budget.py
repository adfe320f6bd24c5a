"""The training-time budget of ``Trainer(max_time=...)``: time spent, summed over resumes.

Only time inside ``fit`` counts (training and its validations), never the time a job waited
between an interruption and its resume: each checkpoint stores the seconds spent so far
(``train_time_s``) and a resumed run starts counting from there. The budget is checked at step
boundaries; in a distributed run rank 0's clock decides and the decision is broadcast, only on
log steps and epoch ends, so ranks stop at the same step and other steps cost no collective.
"""

from __future__ import annotations

import math
import time

import torch

from vistrain.common.distributed import broadcast, is_distributed


def parse_max_time(value: float | str | None) -> float | None:
    """``max_time`` in seconds: a number of seconds or ``"DD:HH:MM:SS"`` / ``"HH:MM:SS"``.

    Raises:
        TypeError: If it is neither a number, a string nor None.
        ValueError: If it is not positive or the string is not of that form.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"max_time must be seconds or 'DD:HH:MM:SS', got {value!r}.")
    seconds: float
    if isinstance(value, str):
        parts = value.split(":")
        try:
            numbers = [float(part) for part in parts]
        except ValueError:
            numbers = []
        if not 1 <= len(numbers) <= 4:
            raise ValueError(
                f"max_time={value!r} is not a duration; use seconds or 'DD:HH:MM:SS' "
                "(e.g. '00:12:00:00' for 12 hours)."
            )
        seconds = 0.0
        for number, unit in zip(reversed(numbers), (1, 60, 3600, 86400)):
            seconds += number * unit
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"max_time={value!r} must be a positive duration (or None: no limit).")
    return seconds


class TimeBudget:
    """Counts the training seconds of this and earlier segments against ``max_seconds``.

    Args:
        max_seconds: The budget, None for no limit (the time is still counted, so a
            later resume with a budget knows what was spent).
    """

    def __init__(self, max_seconds: float | None) -> None:
        self.max_seconds = max_seconds
        self._spent_before = 0.0
        self._started_at: float | None = None

    def start(self, spent_before: float = 0.0) -> None:
        """Start counting this segment, after ``spent_before`` seconds of earlier ones."""
        self._spent_before = float(spent_before)
        self._started_at = time.monotonic()

    def stop(self) -> None:
        """End this segment (its time stays counted)."""
        self._spent_before = self.spent()
        self._started_at = None

    def spent(self) -> float:
        """Training seconds spent so far, earlier segments included."""
        if self._started_at is None:
            return self._spent_before
        return self._spent_before + time.monotonic() - self._started_at

    def exhausted(self, sync: bool) -> bool:
        """Whether the budget is spent; ``sync`` (collective) makes rank 0's answer everyone's.

        Without ``sync`` in a distributed run it answers False, so ranks only ever decide
        together.
        """
        if self.max_seconds is None:
            return False
        if not is_distributed():
            return self.spent() >= self.max_seconds
        if not sync:
            return False
        flag = torch.tensor([1 if self.spent() >= self.max_seconds else 0], dtype=torch.int32)
        return bool(broadcast(flag).item())
