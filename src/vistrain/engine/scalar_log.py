"""Scalar writers: ``metrics.jsonl`` and TensorBoard event files, written by rank 0 only.

Each logged scalar becomes one JSON line ``{"tag", "value", "step", "epoch", "time"}`` and
one TensorBoard scalar. Writers are called only on logging steps, never per batch. Both
files are buffered and flushed at least every ``flush_secs`` and on ``close`` (which the
trainer calls even when training fails), so a logged step costs no system call.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from vistrain.common.distributed import is_rank_zero
from vistrain.engine.checkpoint_io import write_bytes_atomic
from vistrain.engine.event_file import ScalarEventWriter


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu())
    return float(value)


def _json_number(value: float) -> str:
    """A float as ``json.dumps`` writes it (``NaN`` and ``Infinity`` included), without it."""
    return repr(value) if math.isfinite(value) else json.dumps(value)


class ScalarLogger:
    """Writes scalars to ``<output_dir>/metrics.jsonl`` and TensorBoard (rank 0 only).

    Args:
        output_dir: Run folder.
        tensorboard: Also write TensorBoard event files.
        purge_after_step: On resume, drop earlier records with a step above this one, so the
            files describe one consistent history (TensorBoard's ``purge_step`` likewise).
        flush_secs: Longest time a logged scalar may stay in the process's buffers.
    """

    def __init__(
        self,
        output_dir: str,
        tensorboard: bool = True,
        purge_after_step: int | None = None,
        flush_secs: float = 1.0,
    ) -> None:
        self.output_dir = output_dir
        self.enabled = is_rank_zero()
        self.jsonl_path = os.path.join(output_dir, "metrics.jsonl")
        self.flush_secs = flush_secs
        self._next_flush = 0.0
        self._tag_json: dict[str, str] = {}
        self._tb: ScalarEventWriter | None = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if purge_after_step is not None:
            self._purge_jsonl(purge_after_step)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            purge = None if purge_after_step is None else purge_after_step + 1
            self._tb = ScalarEventWriter(output_dir, purge_step=purge, flush_secs=flush_secs)

    def _purge_jsonl(self, max_step: int) -> None:
        if not os.path.exists(self.jsonl_path):
            return
        with open(self.jsonl_path, encoding="utf-8") as handle:
            lines = handle.readlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash
            if int(record.get("step", 0)) <= max_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        write_bytes_atomic("".join(kept).encode("utf-8"), self.jsonl_path)

    def log(self, scalars: Mapping[str, Any], step: int, epoch: int) -> None:
        """Write every scalar under its tag at ``step``."""
        if not self.enabled or not scalars:
            return
        now = time.time()
        numbers = {tag: _to_float(value) for tag, value in scalars.items()}
        tail = f', "step": {int(step)}, "epoch": {int(epoch)}, "time": {_json_number(now)}}}\n'
        self._jsonl.write(
            "".join(
                f'{{"tag": {self._json_tag(tag)}, "value": {_json_number(number)}{tail}'
                for tag, number in numbers.items()
            )
        )
        if self._tb is not None:
            self._tb.add_scalars(numbers, step, now)
        if time.monotonic() >= self._next_flush:  # the event writer keeps its own timer
            self._jsonl.flush()
            self._next_flush = time.monotonic() + self.flush_secs

    def _json_tag(self, tag: str) -> str:
        """The tag as a JSON string, escaped once per tag rather than once per record."""
        text = self._tag_json.get(tag)
        if text is None:
            text = self._tag_json[tag] = json.dumps(tag)
        return text

    def flush(self) -> None:
        """Hand both files' buffers to the operating system."""
        if not self.enabled:
            return
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()
        self._next_flush = time.monotonic() + self.flush_secs

    def close(self) -> None:
        """Flush and close the files."""
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
