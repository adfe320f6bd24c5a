"""The monitoring keys every built-in experiment takes (``--set KEY=VALUE``).

``MonitoringParams`` is a base of each experiment's ``Params``; its ``callbacks`` and
``trainer_kwargs`` add what the keys ask for to the experiment's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.early_stopping import EarlyStoppingCallback
from vistrain.engine.callbacks.profiler import ProfilerCallback
from vistrain.engine.scalar_writers import check_logger_names
from vistrain.engine.time_budget import parse_max_time


@dataclass
class MonitoringParams:
    """Run control and monitoring keys.

    Attributes:
        early_stop_patience: Stop after this many validations without improvement of the
            experiment's main metric (0 = never stop early).
        loggers: Scalar writers, comma separated (``jsonl,tb,csv,wandb,mlflow``); None: the
            default ``jsonl,tb``.
        profile_steps: Record this many training steps with ``torch.profiler`` after 5
            warm-up steps (0 = off); trace in ``<run>/profile/``.
        max_time: Training-time budget, seconds or ``DD:HH:MM:SS`` (None = none); the run
            stops with a checkpoint when it is spent.
    """

    early_stop_patience: int = 0
    loggers: str | None = None
    profile_steps: int = 0
    max_time: str | None = None

    def validate_monitoring(self) -> None:
        """Raise ValueError naming a monitoring key no run can use."""
        for name in ("early_stop_patience", "profile_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 = off)")
        check_logger_names(self.loggers)
        parse_max_time(self.max_time)

    def monitoring_callbacks(self, output_dir: str, monitor: str, mode: str) -> list[Callback]:
        """Early stopping on ``monitor`` and the profiler, as the keys ask."""
        callbacks: list[Callback] = []
        if self.early_stop_patience > 0:
            callbacks.append(
                EarlyStoppingCallback(
                    monitor=monitor,
                    mode=mode,
                    patience=self.early_stop_patience,
                    save_prefix=output_dir,
                )
            )
        if self.profile_steps > 0:
            callbacks.append(
                ProfilerCallback(save_prefix=output_dir, profile_steps=self.profile_steps)
            )
        return callbacks

    def monitoring_trainer_kwargs(self) -> dict[str, Any]:
        """``max_time`` and ``loggers`` for the Trainer, only those that are set."""
        kwargs: dict[str, Any] = {}
        if self.max_time is not None:
            kwargs["max_time"] = parse_max_time(self.max_time)
        if self.loggers is not None:
            kwargs["loggers"] = check_logger_names(self.loggers)
        return kwargs
