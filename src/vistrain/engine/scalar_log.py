"""The scalar logger both engines write through: rank 0 hands each logged step to its writers.

Writers (``vistrain.engine.scalar_writers``) are chosen by name: ``metrics.jsonl`` and
TensorBoard event files by default, plus CSV, W&B and MLflow on request. Each logged scalar
becomes one JSON line ``{"tag", "value", "step", "epoch", "time"}`` and one TensorBoard
scalar. Writers are called only on logging steps, never per batch. Files are buffered and
flushed at least every ``flush_secs`` and on ``close`` (which the trainer calls even when
training fails), so a logged step costs no system call.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vistrain.common.distributed import is_rank_zero
from vistrain.engine.scalar_writers import ScalarWriter, check_logger_names, open_writers


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu())
    return float(value)


class ScalarLogger:
    """Writes scalars to the chosen writers (rank 0 only).

    Args:
        output_dir: Run folder.
        tensorboard: With ``loggers=None``: also write TensorBoard event files.
        purge_after_step: On resume, drop earlier records with a step above this one, so the
            files describe one consistent history (TensorBoard's ``purge_step`` likewise), and
            continue the earlier tracker runs.
        flush_secs: Longest time a logged scalar may stay in the process's buffers.
        loggers: Writer names (``scalar_writers.WRITER_NAMES``); None: ``jsonl`` and, when
            ``tensorboard``, ``tb``.

    Raises:
        ValueError: For an unknown writer name.
        ImportError: When a tracker's package is missing (naming the extra to install).
    """

    def __init__(
        self,
        output_dir: str,
        tensorboard: bool = True,
        purge_after_step: int | None = None,
        flush_secs: float = 1.0,
        loggers: Sequence[str] | None = None,
    ) -> None:
        self.output_dir = output_dir
        self.enabled = is_rank_zero()
        self.jsonl_path = os.path.join(output_dir, "metrics.jsonl")
        self.flush_secs = flush_secs
        self.names = check_logger_names(loggers) or (["jsonl", "tb"] if tensorboard else ["jsonl"])
        self._next_flush = 0.0
        self.writers: list[ScalarWriter] = []
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.writers = open_writers(self.names, output_dir, purge_after_step, flush_secs)

    def log(self, scalars: Mapping[str, Any], step: int, epoch: int) -> None:
        """Write every scalar under its tag at ``step``."""
        if not self.enabled or not scalars:
            return
        now = time.time()
        numbers = {tag: _to_float(value) for tag, value in scalars.items()}
        for writer in self.writers:
            writer.write(numbers, step, epoch, now)
        if time.monotonic() >= self._next_flush:
            self.flush()

    def flush(self) -> None:
        """Hand every writer's buffers over."""
        if not self.enabled:
            return
        for writer in self.writers:
            writer.flush()
        self._next_flush = time.monotonic() + self.flush_secs

    def close(self) -> None:
        """Flush and close every writer (each one even if another fails)."""
        if not self.enabled:
            return
        writers, self.writers = self.writers, []
        errors = []
        for writer in writers:
            try:
                writer.close()
            except Exception as err:  # close the others, then re-raise
                errors.append(err)
        if errors:
            raise errors[0]
