"""Record a few training steps with ``torch.profiler``: a browser trace and an operator table.

Where it sits in the loop (``W`` = ``warmup_steps``, ``N`` = ``profile_steps``)::

    on_train_batch_start   at the (W+1)-th step this process trains: start the profiler
    on_train_batch_end     after N recorded steps: stop it, write the trace, log the table
    on_fit_end             a run shorter than that: stop and write what was recorded

The warm-up skips the first steps, whose one-time costs (allocator growth, lazy init, cuDNN
autotuning) are not what a step costs. Every rank records its own steps and writes
``<save_prefix>/profile/trace_rank<r>.json``, a Chrome trace (open it in ``chrome://tracing``
or https://ui.perfetto.dev); rank 0 logs the top operators by self time.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from vistrain.common.checks import check_positive_int
from vistrain.common.distributed import get_rank
from vistrain.common.typing import DictData, MetricLogs
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.trainer_state import TrainerState
from vistrain.engine.loss_module import LossModule

logger = logging.getLogger(__name__)


class ProfilerCallback(Callback):
    """Profiles ``profile_steps`` training steps after ``warmup_steps`` (CPU, and CUDA if used).

    Args:
        *args: Passed to ``Callback``.
        save_prefix: Run folder; the trace goes to ``<save_prefix>/profile/``.
        profile_steps: Steps to record.
        warmup_steps: Steps to train first without recording.
        row_limit: Operators in the logged table.
        **kwargs: Passed to ``Callback``.

    Raises:
        TypeError: If a count is not an int.
        ValueError: If ``profile_steps`` or ``row_limit`` is below 1 or ``warmup_steps``
            below 0.
    """

    def __init__(
        self,
        *args: Any,
        save_prefix: str,
        profile_steps: int,
        warmup_steps: int = 5,
        row_limit: int = 15,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_positive_int("profile_steps", profile_steps)
        check_positive_int("warmup_steps", warmup_steps, {0: "no warm-up"})
        check_positive_int("row_limit", row_limit)
        self.output_dir = os.path.join(save_prefix, "profile")
        self.profile_steps = profile_steps
        self.warmup_steps = warmup_steps
        self.row_limit = row_limit
        self.trace_path: str | None = None
        self._seen = 0  # training steps this process has started
        self._recorded = 0
        self._profiler: profile | None = None
        self._done = False

    def on_train_batch_start(
        self,
        trainer_state: TrainerState,
        model: nn.Module,
        loss_module: LossModule,
        batch: DictData,
        batch_idx: int,
    ) -> None:
        """Start recording at the first step after the warm-up."""
        if self._done:
            return
        self._seen += 1
        if self._profiler is None and self._seen > self.warmup_steps:
            activities = [ProfilerActivity.CPU]
            if any(param.is_cuda for param in model.parameters()):
                activities.append(ProfilerActivity.CUDA)
            self._profiler = profile(activities=activities)
            self._profiler.start()

    def on_train_batch_end(
        self,
        trainer_state: TrainerState,
        model: nn.Module,
        loss_module: LossModule,
        outputs: DictData,
        batch: DictData,
        batch_idx: int,
    ) -> MetricLogs | None:
        """After ``profile_steps`` recorded steps: stop and write the results."""
        if self._profiler is not None:
            self._recorded += 1
            if self._recorded >= self.profile_steps:
                self._finish()
        return None

    def on_fit_end(self, trainer_state: TrainerState, model: nn.Module) -> None:
        """Write what was recorded when the run ended first."""
        self._finish()

    def _finish(self) -> None:
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            return
        self._done = True
        profiler.stop()
        os.makedirs(self.output_dir, exist_ok=True)
        self.trace_path = os.path.join(self.output_dir, f"trace_rank{get_rank()}.json")
        profiler.export_chrome_trace(self.trace_path)
        if get_rank() != 0:
            return
        has_cuda = torch.cuda.is_available() and any(
            event.device_type.name == "CUDA" for event in profiler.events()
        )
        sort_by = "self_cuda_time_total" if has_cuda else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=self.row_limit)
        logger.info(
            "Profiled %d step(s) after %d warm-up step(s); trace: %s\n%s",
            self._recorded,
            self.warmup_steps,
            self.trace_path,
            table,
        )
