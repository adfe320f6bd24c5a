"""Scalar writers: ``metrics.jsonl`` and TensorBoard event files, written by rank 0 only.

Each logged scalar becomes one JSON line ``{"tag", "value", "step", "epoch", "time"}`` and
one TensorBoard scalar. Writers are called only on logging steps, never per batch.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from vistrain.common.distributed import is_rank_zero


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu())
    return float(value)


class ScalarLogger:
    """Writes scalars to ``<output_dir>/metrics.jsonl`` and TensorBoard (rank 0 only).

    Args:
        output_dir: Run folder.
        tensorboard: Also write TensorBoard event files.
        purge_after_step: On resume, drop earlier records with a step above this one, so the
            files describe one consistent history (TensorBoard's ``purge_step`` likewise).
    """

    def __init__(
        self, output_dir: str, tensorboard: bool = True, purge_after_step: int | None = None
    ) -> None:
        self.output_dir = output_dir
        self.enabled = is_rank_zero()
        self.jsonl_path = os.path.join(output_dir, "metrics.jsonl")
        self._tb: Any = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if purge_after_step is not None:
            self._purge_jsonl(purge_after_step)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if purge_after_step is None else purge_after_step + 1
            self._tb = SummaryWriter(log_dir=output_dir, purge_step=purge)

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
        tmp = self.jsonl_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
        os.replace(tmp, self.jsonl_path)

    def log(self, scalars: Mapping[str, Any], step: int, epoch: int) -> None:
        """Write every scalar under its tag at ``step``."""
        if not self.enabled or not scalars:
            return
        now = time.time()
        for tag, value in scalars.items():
            number = _to_float(value)
            record = {"tag": tag, "value": number, "step": step, "epoch": epoch, "time": now}
            self._jsonl.write(json.dumps(record) + "\n")
            if self._tb is not None:
                self._tb.add_scalar(tag, number, global_step=step, walltime=now)
        self._jsonl.flush()

    def close(self) -> None:
        """Flush and close the files."""
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
