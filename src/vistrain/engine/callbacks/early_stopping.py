"""Stop training when a validation metric has stopped improving.

Where it sits in the loop::

    on_validation_end    value = val_logs[monitor]
                         better than best by more than min_delta -> best = value, wait = 0
                         else wait += 1; wait >= patience -> train_module.request_stop(...)
                         (rank 0's best and wait are broadcast: every rank stops at once)
    after the loop       the engine saves a final checkpoint holding best and wait

The counters are part of every checkpoint (``state_dict``), so a resumed run neither forgets
its patience nor restarts it -- the bugs users of other trainers hit when the early-stopping
state was left out of checkpoints (Lightning issue #1463, transformers issue #28544).

A periodic checkpoint is written *before* the validation of its step (the epoch end saves,
then validates), so its counters lag that validation. With ``save_prefix`` set, rank 0 also
keeps the counters after each validation in ``<save_prefix>/early_stopping.json``; a run
resumed from the checkpoint of exactly that step adopts them at its first epoch start.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from torch import nn

from vistrain.common.checks import check_choice, check_positive_int
from vistrain.common.distributed import broadcast, get_rank
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.trainer_state import TrainerState
from vistrain.engine.checkpoint_io import write_bytes_atomic
from vistrain.engine.loss_module import LossModule

RECORD_NAME = "early_stopping.json"


class EarlyStoppingCallback(Callback):
    """Stops training after ``patience`` validations without improvement of ``monitor``.

    Args:
        *args: Passed to ``Callback``.
        monitor: Key of the validation logs (as the evaluator returns it, e.g. ``"Det/AP"``).
        mode: ``"min"`` or ``"max"``: whether a lower or a higher value is better.
        patience: Validations without improvement before training stops.
        min_delta: Smallest change that counts as an improvement (>= 0).
        save_prefix: Run folder for ``early_stopping.json`` (see the module docstring);
            None keeps the counters in checkpoints only.
        **kwargs: Passed to ``Callback``.

    Raises:
        TypeError: If ``monitor`` is not a string or ``patience`` not an int.
        ValueError: For an empty ``monitor``, ``patience`` below 1, a negative or non-finite
            ``min_delta`` or a ``mode`` other than ``"min"``/``"max"``.
    """

    def __init__(
        self,
        *args: Any,
        monitor: str,
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        save_prefix: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be a validation log key (str), got {monitor!r}.")
        if not monitor:
            raise ValueError("monitor must name a validation log key, e.g. monitor='Det/AP'.")
        check_choice("mode", mode, ("min", "max"))
        check_positive_int("patience", patience)
        if (
            isinstance(min_delta, bool)
            or not isinstance(min_delta, (int, float))
            or not math.isfinite(min_delta)
            or min_delta < 0
        ):
            raise ValueError(f"min_delta={min_delta!r} must be a finite number >= 0.")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.record_path = None if save_prefix is None else os.path.join(save_prefix, RECORD_NAME)
        self.best: float | None = None
        self.wait = 0
        self.last_step: int | None = None  # global step of the last counted validation
        self._check_record = False

    # ------------------------------------------------------------------ decisions
    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best by more than ``min_delta`` (NaN never does)."""
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_validation_end(self, trainer_state: TrainerState, model: nn.Module) -> None:
        """Count this validation; ask the engine to stop once patience runs out (collective).

        Raises:
            ValueError: If ``monitor`` is not among the validation logs (naming those).
        """
        val_logs = trainer_state.get("val_logs") or {}
        if self.monitor not in val_logs:
            raise ValueError(
                f"EarlyStoppingCallback: monitor={self.monitor!r} is not in the validation logs "
                f"(available: {sorted(val_logs)}); pass one of those keys."
            )
        step = trainer_state["global_step"]
        if step != self.last_step:  # the same weights validated twice count once
            value = float(val_logs[self.monitor])
            if self.improves(value):
                self.best, self.wait = value, 0
            else:
                self.wait += 1
            self.last_step = step
        # Rank 0's counters decide for all: every rank stops at the same step.
        self.best, self.wait = broadcast((self.best, self.wait))
        self._write_record()
        if self.wait >= self.patience:
            trainer_state["train_module"].request_stop(
                f"early stopping: {self.monitor} has not improved for {self.wait} "
                f"validation(s) (best {self.best}, patience {self.patience})"
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Best value, wait count and the step they were counted at."""
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "wait": self.wait,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters (those of another ``monitor`` / ``mode`` are ignored)."""
        if state_dict.get("monitor") != self.monitor or state_dict.get("mode") != self.mode:
            return
        best = state_dict.get("best")
        self.best = None if best is None else float(best)
        self.wait = int(state_dict.get("wait", 0))
        self.last_step = state_dict.get("last_step")
        self._check_record = self.record_path is not None

    def on_train_epoch_start(
        self, trainer_state: TrainerState, model: nn.Module, loss_module: LossModule
    ) -> None:
        """After a resume: adopt the counters of the validation right after the checkpoint."""
        if not self._check_record:
            return
        self._check_record = False
        record = self._read_record()
        if (
            record is not None
            and record.get("monitor") == self.monitor
            and record.get("mode") == self.mode
            and record.get("last_step") == trainer_state["global_step"]
            and record.get("last_step") != self.last_step
        ):
            best = record.get("best")
            self.best = None if best is None else float(best)
            self.wait = int(record.get("wait", 0))
            self.last_step = record["last_step"]

    def _read_record(self) -> dict[str, Any] | None:
        if self.record_path is None:
            return None
        try:
            with open(self.record_path, encoding="utf-8") as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _write_record(self) -> None:
        if self.record_path is None or get_rank() != 0:
            return
        os.makedirs(os.path.dirname(self.record_path) or ".", exist_ok=True)
        data = json.dumps(self.state_dict(), indent=1).encode("utf-8")
        write_bytes_atomic(data, self.record_path)
