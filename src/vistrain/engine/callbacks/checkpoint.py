"""Callback for model checkpointing.

Where it sits in the loop (see ``vistrain.engine.trainer``)::

    setup()                       rank 0: make <save_prefix>/checkpoints, remove stale temp files
    for epoch ...:
        for batch ...:
            ... optimizer step; global_step += 1
            on_train_batch_end    step-based: save when global_step % checkpoint_period == 0
            (step-based validation)
            on_validation_end     credit the validation to the file saved at this step
        on_train_epoch_end        epoch-based: save when (epoch + 1) % checkpoint_period == 0
        (validation)
        on_validation_end         credit the validation to the file saved at this step
    on_fit_end                    wait for pending writes

Files, all written by rank 0 through ``vistrain.engine.checkpoint_io`` (crash-consistent):
``epoch=<E>-step=<S>.ckpt`` (periodic), ``last.ckpt`` (hard link to the newest periodic file)
and, with ``monitor``, ``best.ckpt`` (hard link to the best validated one) and ``best.json``
(its value, so a resume from the checkpoint that became best afterwards still knows it).

Weights holding NaN or Inf are never saved (so never ``last.ckpt`` or ``best.ckpt``): the
save raises ``NonFiniteError`` instead (``vistrain.engine.nonfinite_guard``).

Best-checkpoint rule: validation runs *after* the save hooks, so a validation evaluates the
weights of the newest checkpoint when that file was saved at the validation's step. Its
``monitor`` value (``trainer_state["val_logs"]`` in ``on_validation_end``) is credited to that
file; a validation at a step without a checkpoint (periods that do not line up) credits none.

The contents of a file are the engine's ``checkpoint_state()``; driven without an engine (a
hand-built TrainerState), the same ``vistrain.engine.resume.collect_checkpoint`` builds them
from the state, so there is one writer of the format.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from typing import Any

import torch
from torch import nn

from vistrain.common.checks import check_choice, check_positive_int
from vistrain.common.cpu import has_spare_core
from vistrain.common.distributed import broadcast, get_rank, is_distributed
from vistrain.common.typing import DictData, MetricLogs
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.trainer_state import TrainerState
from vistrain.engine.checkpoint_io import (
    AsyncCheckpointWriter,
    cleanup_stale_temp_files,
    link_checkpoint,
    remove_files,
    save_checkpoint,
    write_bytes_atomic,
)
from vistrain.engine.loss_module import LossModule
from vistrain.engine.nonfinite_guard import NonFiniteError, nonfinite_tensors
from vistrain.engine.resume import collect_checkpoint

logger = logging.getLogger(__name__)

LAST_NAME = "last.ckpt"
BEST_NAME = "best.ckpt"
BEST_RECORD_NAME = "best.json"


def writer_has_spare_cpu(model: nn.Module) -> bool:
    """Whether a background writer would run beside training rather than steal its CPU time.

    True when the model trains on an accelerator (the CPU mostly waits), or when the cores this
    process may use outnumber the compute threads of all local training processes
    (``LOCAL_WORLD_SIZE`` x ``torch.get_num_threads()``).

    Measured with ``benchmarks/checkpoint.py`` on 2 cores (ResNet-18 + SGD momentum, 94 MB,
    blocking save 75-95 ms): with 1 compute thread an asynchronous save blocks training 7-16 ms
    (0.09-0.17x) and costs 0.2-0.9x a blocking save in all, counting the slower steps while
    the write is in flight. With 2 compute threads the writer and the kernel's write-back
    compete with training for both cores: 0.8-1.2x a blocking save in all on a quiet machine
    and 2-3.5x on a busy one, so blocking is chosen there.
    """
    if any(param.device.type != "cpu" for param in model.parameters()):
        return True
    return has_spare_core()


class CheckpointCallback(Callback):
    """Callback for model checkpointing.

    Saves the complete training state (``train_module.checkpoint_state()``: model, optimizers,
    schedulers, callbacks, loop position, RNG states) every ``checkpoint_period`` epochs, or
    steps when ``epoch_based=False``. The state is collected on every rank (a collective), and
    rank 0 alone writes it.

    Args:
        *args: Passed to ``Callback`` (``epoch_based``, connectors).
        save_prefix: Output folder; files go to ``<save_prefix>/checkpoints``.
        checkpoint_period: Save every this many epochs (or steps). Defaults to 1.
        max_to_keep: Keep only the newest this many periodic files; an old one is deleted
            only after the new one is durable. ``None`` keeps all. ``last.ckpt`` and
            ``best.ckpt`` are hard links and survive the deletion of their source.
        monitor: Key of the validation logs (as the evaluator returns them, e.g. ``"Det/AP"``)
            that selects ``best.ckpt``. ``None`` disables it.
        mode: ``"max"`` or ``"min"``: whether a higher or lower ``monitor`` value is better.
        async_save: Write in a background thread after a CPU snapshot on the training thread
            (``True``), or block training for the whole write (``False``). ``None`` (default)
            decides at the first save: asynchronous when the writer has a spare core (see
            ``writer_has_spare_cpu``), blocking otherwise.
        every_n_minutes: Also save after every this many minutes of wall time since the
            previous save (or the first step), at a step end, whatever the period
            (Lightning's ``train_time_interval``). The clock is not read every step: each
            reading schedules the next one half the remaining time ahead at the step rate
            it measured, but at most ``TIME_CHECK_MAX_STEPS`` (100) steps ahead, so a period
            costs about ``log2(period / step time)`` readings plus one per 100 steps, and the
            save comes at the step it is due while the step time stays steady (at most 100
            steps late if steps slow down between two readings). In a distributed run rank
            0's clock decides (one broadcast per reading). ``None`` disables it.
        **kwargs: Passed to ``Callback``.

    Raises:
        TypeError: For a period or ``max_to_keep`` that is not an int.
        ValueError: For a period or ``max_to_keep`` below 1, an empty ``save_prefix``, a
            ``mode`` other than ``"min"``/``"max"`` or ``every_n_minutes`` not positive.
    """

    TIME_CHECK_MAX_STEPS = 100
    """Most steps between two readings of the clock for ``every_n_minutes``."""

    def __init__(
        self,
        *args: Any,
        save_prefix: str,
        checkpoint_period: int = 1,
        max_to_keep: int | None = None,
        monitor: str | None = None,
        mode: str = "max",
        async_save: bool | None = None,
        every_n_minutes: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(save_prefix, (str, os.PathLike)) or not os.fspath(save_prefix):
            raise ValueError(f"save_prefix must be a non-empty path, got {save_prefix!r}.")
        check_positive_int("checkpoint_period", checkpoint_period)
        check_positive_int("max_to_keep", max_to_keep, {None: "keep all"})
        check_choice("mode", mode, ("min", "max"))
        if monitor is not None and not isinstance(monitor, str):
            raise TypeError(f"monitor must be a str or None, got {type(monitor).__name__}.")
        if every_n_minutes is not None and (
            isinstance(every_n_minutes, bool)
            or not isinstance(every_n_minutes, (int, float))
            or not every_n_minutes > 0
        ):
            raise ValueError(
                f"every_n_minutes={every_n_minutes!r} must be a positive number of minutes "
                "(or None)."
            )
        self.every_n_minutes = every_n_minutes
        self._last_save_time: float | None = None  # monotonic time of the last save
        self._steps_to_time_check = 0  # step ends until the clock is read again
        self._last_time_check: tuple[float, int] | None = None  # (monotonic time, step)
        self.save_prefix = os.fspath(save_prefix)
        self.output_dir = os.path.join(self.save_prefix, "checkpoints")
        self.checkpoint_period = checkpoint_period
        self.max_to_keep = max_to_keep
        self.monitor = monitor
        self.mode = mode
        self.async_save = async_save
        self._use_async: bool | None = async_save
        self._writer: AsyncCheckpointWriter | None = None
        self._saved: list[str] = []  # periodic file names, oldest first
        self._last_step: int | None = None  # global step of the newest periodic file
        self._best: dict[str, Any] | None = None  # {"value", "file", "global_step"}
        self._warned_missing = False

    # ------------------------------------------------------------------ hooks
    def setup(self) -> None:
        """Rank 0: create the checkpoint folder and delete leftovers of interrupted writes."""
        if get_rank() != 0:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        removed = cleanup_stale_temp_files(self.output_dir)
        if removed:
            logger.info("Removed %d stale temporary checkpoint file(s).", len(removed))

    def on_train_batch_end(
        self,
        trainer_state: TrainerState,
        model: nn.Module,
        loss_module: LossModule,
        outputs: DictData,
        batch: DictData,
        batch_idx: int,
    ) -> MetricLogs | None:
        """Save by step period, or once ``every_n_minutes`` have passed (collective).

        Step based: when ``global_step`` is a multiple of the period. Only on batches that
        end an accumulation window (``step_end``), not again on a window's micro-batches.
        """
        if not trainer_state.get("step_end", True):
            return None
        step = trainer_state["global_step"]
        by_step = not self.epoch_based and step % self.checkpoint_period == 0
        if by_step or (self.every_n_minutes is not None and self._time_due(step)):
            self._save(trainer_state, model, epoch_finished=False, batch_idx=batch_idx)
        return None

    def _time_due(self, step: int) -> bool:
        """Whether ``every_n_minutes`` passed since the last save (rank 0's clock decides).

        Most step ends only count down to the next reading of the clock (see
        ``every_n_minutes``); every rank counts the same steps, since rank 0 broadcasts the
        schedule with the answer.
        """
        if self._steps_to_time_check > 1:
            self._steps_to_time_check -= 1
            return False
        now = time.monotonic()
        if self._last_save_time is None:
            self._last_save_time = now
        remaining = 60.0 * float(self.every_n_minutes or 0) - (now - self._last_save_time)
        wait = 1
        if self._last_time_check is not None and remaining > 0:
            checked_at, checked_step = self._last_time_check
            if step > checked_step and now > checked_at:
                step_time = (now - checked_at) / (step - checked_step)
                wait = max(1, min(int(remaining / step_time / 2), self.TIME_CHECK_MAX_STEPS))
        self._last_time_check = (now, step)
        due, self._steps_to_time_check = int(remaining <= 0), wait
        if is_distributed():
            flags = broadcast(torch.tensor([due, wait], dtype=torch.int64)).tolist()
            due, self._steps_to_time_check = flags
        return bool(due)

    def on_train_epoch_end(
        self, trainer_state: TrainerState, model: nn.Module, loss_module: LossModule
    ) -> None:
        """Epoch-based: save when ``(epoch + 1)`` is a multiple of the period (collective)."""
        if self.epoch_based and (trainer_state["current_epoch"] + 1) % self.checkpoint_period == 0:
            self._save(trainer_state, model, epoch_finished=True, batch_idx=None)

    def on_validation_end(self, trainer_state: TrainerState, model: nn.Module) -> None:
        """Credit this validation's ``monitor`` value to the file saved at its step, if any."""
        if self.monitor is not None:
            self._credit_validation(trainer_state)

    def on_fit_end(self, trainer_state: TrainerState, model: nn.Module) -> None:
        """Wait until every write is durable (re-raising errors)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def save_now(
        self, trainer_state: TrainerState, model: nn.Module, epoch_finished: bool = False
    ) -> str:
        """Collective: save the training state at this step now and wait until it is durable.

        The loop calls it when a stop is agreed (``LoopState.stop_requested``), so a resume
        continues at exactly this step. A file already saved at this step is written again,
        so it holds the callbacks' newest states (an epoch-end file is saved before that
        epoch's validation; early stopping counts after it). The file joins the retention
        list and becomes ``last.ckpt`` like any other.

        Args:
            trainer_state: The state at the stop.
            model: The model.
            epoch_finished: Whether the epoch of ``trainer_state`` has ended (only used when
                the state has no engine to ask).

        Returns:
            The path of the checkpoint (the same on every rank; rank 0 wrote it).
        """
        name = f"epoch={trainer_state['current_epoch']}-step={trainer_state['global_step']}.ckpt"
        self._save(trainer_state, model, epoch_finished=epoch_finished, batch_idx=None)
        if self._writer is not None:
            self._writer.wait()
        return os.path.join(self.output_dir, name)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Retention list and best record, so a resumed run keeps deleting and ranking right."""
        return {
            "saved": list(self._saved),
            "last_step": self._last_step,
            "monitor": self.monitor,
            "mode": self.mode,
            "best": None if self._best is None else dict(self._best),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()``; also adopt a newer ``best.json`` that this state predates.

        A checkpoint can become best only after it was written (validation follows the save),
        so its own state lacks that result; ``best.json`` carries it. The record is used only
        if its step is not beyond the restored checkpoint's, so a resume from an older
        checkpoint ignores results of the abandoned later run.
        """
        self._saved = [str(name) for name in state_dict.get("saved", [])]
        self._last_step = state_dict.get("last_step")
        same_metric = (
            state_dict.get("monitor") == self.monitor and state_dict.get("mode") == self.mode
        )
        best = state_dict.get("best")
        self._best = dict(best) if same_metric and isinstance(best, dict) else None
        if self.monitor is None or self._last_step is None:
            return
        record = self._read_best_record()
        if (
            record is not None
            and record.get("monitor") == self.monitor
            and record.get("mode") == self.mode
            and isinstance(record.get("global_step"), int)
            and record["global_step"] <= self._last_step
            and isinstance(record.get("value"), (int, float))
            and self._is_better(float(record["value"]))
        ):
            self._best = {
                "value": float(record["value"]),
                "file": record.get("file"),
                "global_step": record["global_step"],
            }

    # ------------------------------------------------------------------ internals
    def _read_best_record(self) -> dict[str, Any] | None:
        path = os.path.join(self.output_dir, BEST_RECORD_NAME)
        try:
            with open(path, encoding="utf-8") as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self._best is None:
            return True
        best = float(self._best["value"])
        return value > best if self.mode == "max" else value < best

    def _credit_validation(self, trainer_state: TrainerState) -> None:
        """Give the validation's value to the checkpoint it evaluated, if one was saved."""
        val_step = trainer_state["global_step"]
        if self.monitor is None or not self._saved or self._last_step != val_step:
            return
        val_logs = trainer_state.get("val_logs") or {}
        if self.monitor not in val_logs:
            if not self._warned_missing and get_rank() == 0:
                self._warned_missing = True
                warnings.warn(
                    f"CheckpointCallback: monitor={self.monitor!r} is not in the validation "
                    f"logs (available: {sorted(val_logs)}); best.ckpt is not updated. Use one "
                    "of the available keys.",
                    UserWarning,
                    stacklevel=2,
                )
            return
        value = float(val_logs[self.monitor])
        if not self._is_better(value):
            return
        self._best = {"value": value, "file": self._saved[-1], "global_step": val_step}
        if get_rank() != 0:
            return
        src = os.path.join(self.output_dir, self._saved[-1])
        record = {"monitor": self.monitor, "mode": self.mode, **self._best}
        data = json.dumps(record, indent=1).encode("utf-8")

        def update_best() -> None:
            link_checkpoint(src, os.path.join(self.output_dir, BEST_NAME))
            write_bytes_atomic(data, os.path.join(self.output_dir, BEST_RECORD_NAME))

        if self._writer is not None:
            self._writer.run(update_best)  # after the pending write of ``src``
        else:
            update_best()

    def _collect_state(
        self,
        trainer_state: TrainerState,
        model: nn.Module,
        epoch_finished: bool,
        batch_idx: int | None,
    ) -> dict[str, Any]:
        """Collective: the engine's ``checkpoint_state()``.

        Without an engine (a hand-built state) the same format is built from the state by
        ``collect_checkpoint``, holding this callback's state only.
        """
        train_module = trainer_state.get("train_module")
        if train_module is not None:
            return train_module.checkpoint_state()
        batches_done = None
        if batch_idx is not None and "batches_done" not in trainer_state:
            batches_done = batch_idx + 1
        return collect_checkpoint(
            trainer_state, model, [self], epoch_finished=epoch_finished, batches_done=batches_done
        )

    def _save(
        self,
        trainer_state: TrainerState,
        model: nn.Module,
        epoch_finished: bool,
        batch_idx: int | None,
    ) -> None:
        """Record the new file, collect the state on every rank, write it on rank 0.

        Raises:
            NonFiniteError: If the model's weights hold NaN or Inf; nothing is written and
                ``last.ckpt`` / ``best.ckpt`` keep the previous finite weights.
        """
        self._last_save_time = time.monotonic()
        step = trainer_state["global_step"]
        name = f"epoch={trainer_state['current_epoch']}-step={step}.ckpt"
        bookkeeping = (list(self._saved), self._last_step)
        if name in self._saved:
            self._saved.remove(name)
        self._saved.append(name)
        self._last_step = step
        expired: list[str] = []
        if self.max_to_keep is not None and len(self._saved) > self.max_to_keep:
            expired = self._saved[: -self.max_to_keep]
            self._saved = self._saved[-self.max_to_keep :]
        # The state is taken after the bookkeeping so the file records itself as kept.
        try:
            state = self._collect_state(trainer_state, model, epoch_finished, batch_idx)
        except NonFiniteError:
            self._saved, self._last_step = bookkeeping
            self.on_fit_end(trainer_state, model)  # earlier files are durable when it stops
            raise
        bad = nonfinite_tensors(state["state_dict"])  # same weights on every rank
        if bad:
            self._saved, self._last_step = bookkeeping
            self.on_fit_end(trainer_state, model)
            raise NonFiniteError(
                f"training stopped at step {step} (epoch {trainer_state['current_epoch']}): "
                f"the weights hold NaN or Inf ({', '.join(bad)}); {name} was not written and "
                f"{LAST_NAME} / {BEST_NAME} keep the last finite weights."
            )
        if get_rank() != 0:
            return
        path = os.path.join(self.output_dir, name)
        last = os.path.join(self.output_dir, LAST_NAME)
        expired_paths = [os.path.join(self.output_dir, old) for old in expired]
        if self._use_async is None:
            self._use_async = writer_has_spare_cpu(model)
            logger.info(
                "CheckpointCallback: %s saving (pass async_save to choose).",
                "asynchronous" if self._use_async else "blocking",
            )
        if self._use_async:
            if self._writer is None:
                self._writer = AsyncCheckpointWriter()
            self._writer.save(state, path, links=[last], delete=expired_paths)
        else:
            save_checkpoint(state, path)
            link_checkpoint(path, last)
            remove_files(expired_paths)
