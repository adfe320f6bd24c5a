"""Progress lines, a live progress bar and averaged training metrics.

Where it sits in the loop (``R`` = ``refresh_rate``)::

    on_train_epoch_start   start the epoch's bar; data clock starts
    on_train_batch_start   train timer runs (resumes after validation); data time measured
    ... forward, backward, step ...
    on_train_batch_end     add the step's metrics to running sums (tensors, no sync);
                           every R batches: average them (one sync, one all-reduce),
                           log a line on rank 0 and return the averages (-> train/<key>)
    on_test_epoch_start    train timer paused: validation is not training time
    on_test_batch_end      a "Testing" line every R test batches
    on_test_epoch_end      the testing bar goes away

A training line looks like::

    Epoch 3: 40/120, ETA: 0:01:12, 2.31 it/s, 73.9 img/s, data: 0.004s, lr: 1.000e-03,
        loss: 1.2345, ...   (one line)

(``Iter 40/1000`` when the callback is step based, ``Testing 5/20`` while testing). Epochs are
numbered from 0, as in checkpoint names (``epoch=3-step=...``), ``metrics.jsonl`` and the
engines' ``current_epoch``: ``Epoch 3`` is the fourth epoch. ``ETA`` covers the whole run: the
rate is measured over the steps this process has trained (so it is right after a resume), the
remaining steps come from ``global_step`` and ``num_steps`` or ``num_epochs *
num_train_batches``; without a limit it
reads ``ETA: ?``. ``it/s``, ``img/s`` (per-rank batch size from ``batch["images"]`` times the
world size) and ``data`` (average time per batch between the end of one
``on_train_batch_end`` and the next ``on_train_batch_start``, i.e. waiting for the loader
and for callbacks listed after this one) cover the batches since the previous line. ``lr`` is
the learning rate after the step (one value when every parameter group shares it, else
``lr/opt<i>/group<j>`` per group, the names the engines log).

The first batch this process trains also logs a line at once (rank 0's own values of that
batch, not averaged and not returned), so a slow run shows signs of life and a resumed run
shows where it resumed. The returned averages stay aligned to ``refresh_rate``, and a
mid-window checkpoint carries the partial sums, so a resumed run logs the same scalars as an
uninterrupted one.
"""

from __future__ import annotations

import datetime
import logging
import math
import resource
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vistrain.common.distributed import (
    all_reduce_dict,
    get_world_size,
    is_distributed,
    is_rank_zero,
)
from vistrain.common.log_setup import ensure_logger
from vistrain.common.progress import ProgressDisplay, create_progress_display
from vistrain.common.timer import Timer
from vistrain.common.typing import DictData, MetricLogs
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.trainer_state import TrainerState, metric_tensors
from vistrain.engine.loss_module import LossModule
from vistrain.engine.metric_window import MetricWindow, to_floats
from vistrain.engine.optim import lr_scalars

_BAR_INTERVAL_S = 0.2
"""Shortest time between two live-bar updates (the bar redraws at 4 Hz anyway)."""

logger = logging.getLogger(__name__)


def format_eta(seconds: float | None) -> str:
    """``H:MM:SS`` for a duration, ``?`` when it is unknown (None, NaN or infinite)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def format_value(value: float) -> str:
    """Four decimals for ordinary magnitudes, scientific notation for tiny or huge ones."""
    if value == 0 or (math.isfinite(value) and 1e-3 <= abs(value) < 1e5):
        return f"{value:.4f}"
    return f"{value:.3e}"


def format_metrics(values: Mapping[str, float]) -> str:
    """``key: value, ...`` in the order given, each value as ``format_value`` writes it.

    Learning rates (``lr``, ``lr/...``) are always written ``1.000e-02``: their leading
    digits matter at every magnitude.
    """
    return ", ".join(
        f"{key}: {value:.3e}" if _is_lr(key) else f"{key}: {format_value(value)}"
        for key, value in values.items()
    )


def _is_lr(key: str) -> bool:
    return key == "lr" or key.startswith("lr/")


def learning_rates(trainer_state: TrainerState) -> dict[str, float]:
    """The learning rates to show: ``{"lr": x}`` when every group shares one, else per group."""
    optimizers = trainer_state.get("optimizers")
    if not optimizers:
        return {}
    rates = lr_scalars(optimizers)
    if len(set(rates.values())) == 1:
        return {"lr": next(iter(rates.values()))}
    return rates


def max_memory_mb(model: nn.Module | None) -> float:
    """Peak memory of this process in MiB (``perf/max_memory_mb``).

    CUDA ``max_memory_allocated`` of the model's GPU, else the process's peak resident set
    size (``getrusage``: KiB on Linux, bytes on macOS). Neither reading waits for the device.
    """
    param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    if param is not None and param.device.type == "cuda":
        return torch.cuda.max_memory_allocated(param.device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def total_train_steps(trainer_state: TrainerState) -> int | None:
    """Optimizer steps the run will take in all, or None when there is no limit.

    The smaller of ``num_steps`` and ``num_epochs * num_train_batches`` among those that are
    set (a value of -1 means no limit).
    """
    limits = []
    num_steps = trainer_state.get("num_steps", -1)
    if num_steps is not None and num_steps > 0:
        limits.append(int(num_steps))
    num_epochs = trainer_state.get("num_epochs", -1)
    num_batches = trainer_state.get("num_train_batches")
    if num_epochs is not None and num_epochs > 0 and num_batches:
        limits.append(int(num_epochs) * int(num_batches))
    return min(limits) if limits else None


class LoggingCallback(Callback):
    """Callback for logging: progress lines, a live bar on terminals, averaged metrics.

    Args:
        *args: Passed to ``Callback`` (``epoch_based`` chooses ``Epoch e: i/n`` positions
            and per-epoch log windows, or ``Iter s/N`` positions aligned to ``global_step``).
        refresh_rate: Log a line (and return averaged metrics) every this many batches;
            also at the last batch of an epoch when epoch based.
        **kwargs: Passed to ``Callback``.

    Raises:
        TypeError: If ``refresh_rate`` is not an int.
        ValueError: If ``refresh_rate`` is below 1.
    """

    def __init__(self, *args: Any, refresh_rate: int = 50, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(refresh_rate, bool) or not isinstance(refresh_rate, int):
            raise TypeError(f"refresh_rate must be an int, got {refresh_rate!r}.")
        if refresh_rate < 1:
            raise ValueError(
                f"refresh_rate={refresh_rate} is invalid; it must be at least 1 (log every "
                "refresh_rate batches)."
            )
        self.refresh_rate = refresh_rate
        self._display: ProgressDisplay | None = None
        self._train_timer = Timer(start=False)
        self._test_timer = Timer(start=False)
        # Steps done before this process trained its first batch (None until then).
        self._start_step: int | None = None
        self._first_line_done = False
        # Window since the last line: metric sums, batch and image counts, timing marks.
        self._window = MetricWindow()
        self._window_batches = 0
        self._window_images = 0
        self._window_start_time = 0.0
        self._data_time = 0.0
        self._data_batches = 0
        self._last_batch_end: float | None = None
        self._next_bar_update = 0.0
        self._test_done = 0
        self._test_total: int | None = None

    # ------------------------------------------------------------------ helpers

    def _get_display(self) -> ProgressDisplay:
        if self._display is None:
            ensure_logger()
            self._display = create_progress_display()
        return self._display

    def _reduce_window(self) -> dict[str, float]:
        """Average the window's sums over its batches and over ranks (collective).

        Every rank must call this at the same step (log steps are the same on every rank).
        One ``all_reduce`` when distributed, then one device-to-host transfer.
        """
        values: dict[str, Any] = self._window.snapshot()
        if not values:
            return {}
        if is_distributed():
            values = all_reduce_dict(values, "mean")
        totals = to_floats(values)
        counts = self._window.counts
        return {key: totals[key] / counts[key] for key in values}

    def _reset_window(self) -> None:
        self._window.clear()
        self._window_batches = 0
        self._window_images = 0
        self._window_start_time = self._train_timer.elapsed()
        self._data_time = 0.0
        self._data_batches = 0

    def _is_train_log_step(self, trainer_state: TrainerState, batch_idx: int) -> bool:
        if self.epoch_based:
            num_batches = trainer_state.get("num_train_batches")
            return (batch_idx + 1) % self.refresh_rate == 0 or batch_idx + 1 == num_batches
        step = trainer_state["global_step"]
        if not trainer_state.get("step_end", True):
            return False  # a micro-batch inside an accumulation window: the step is not done
        return step % self.refresh_rate == 0 or step == total_train_steps(trainer_state)

    def _eta(self, trainer_state: TrainerState) -> str:
        total = total_train_steps(trainer_state)
        if total is None or self._start_step is None:
            return format_eta(None)
        step = trainer_state["global_step"]
        done_here = step - self._start_step
        elapsed = self._train_timer.elapsed()
        if done_here <= 0 or elapsed <= 0:
            return format_eta(None)
        return format_eta(max(total - step, 0) * elapsed / done_here)

    def _position(self, trainer_state: TrainerState, batch_idx: int) -> tuple[str, int]:
        """The line's prefix (``Epoch 3: 40/120`` / ``Iter 40/1000``) and the bar position."""
        if self.epoch_based:
            num_batches = trainer_state.get("num_train_batches")
            total = "?" if not num_batches else str(num_batches)
            epoch = trainer_state["current_epoch"]
            return f"Epoch {epoch}: {batch_idx + 1}/{total}", batch_idx + 1
        steps = total_train_steps(trainer_state)
        step = trainer_state["global_step"]
        return f"Iter {step}/{'?' if steps is None else steps}", step

    def _window_rates(self) -> dict[str, float]:
        """The window's speed: ``perf/step_time``, ``perf/img_per_s``, ``perf/data_time``.

        Only what the window measured (no images: no ``img_per_s``); host clocks only.
        """
        rates: dict[str, float] = {}
        window_time = self._train_timer.elapsed() - self._window_start_time
        if window_time > 0 and self._window_batches > 0:
            rates["perf/step_time"] = window_time / self._window_batches
            if self._window_images > 0:
                rates["perf/img_per_s"] = self._window_images * get_world_size() / window_time
        if self._data_batches > 0:
            rates["perf/data_time"] = self._data_time / self._data_batches
        return rates

    def _train_line(self, prefix: str, eta: str, metrics: Mapping[str, float]) -> str:
        parts = [prefix, f"ETA: {eta}"]
        rates = self._window_rates()
        if "perf/step_time" in rates:
            parts.append(f"{1.0 / rates['perf/step_time']:.2f} it/s")
        if "perf/img_per_s" in rates:
            parts.append(f"{rates['perf/img_per_s']:.1f} img/s")
        if "perf/data_time" in rates:
            parts.append(f"data: {rates['perf/data_time']:.3f}s")
        if metrics:
            parts.append(format_metrics(metrics))
        return ", ".join(parts)

    def _bar_due(self, force: bool = False) -> ProgressDisplay | None:
        """The live display when the bar should be updated now (at most every 0.2 s), else None."""
        display = self._display
        if display is None or not display.live:
            return None
        now = time.perf_counter()
        if force or now >= self._next_bar_update:
            self._next_bar_update = now + _BAR_INTERVAL_S
            return display
        return None

    # ------------------------------------------------------------------ training hooks

    def setup(self) -> None:
        """Choose the progress display and make sure log lines are printed somewhere."""
        self._get_display()

    def on_train_epoch_start(
        self, trainer_state: TrainerState, model: nn.Module, loss_module: LossModule
    ) -> None:
        """Show the epoch's bar; time from here to the first batch is data-loading time."""
        display = self._get_display()
        if self.epoch_based:
            display.start_task(
                "train",
                f"Epoch {trainer_state['current_epoch']}",
                trainer_state.get("num_train_batches") or None,
                completed=trainer_state.get("batches_done", 0) or 0,
            )
        elif self._start_step is None:
            display.start_task(
                "train",
                "Iter",
                total_train_steps(trainer_state),
                completed=trainer_state["global_step"],
            )
        self._last_batch_end = time.perf_counter()

    def on_train_batch_start(
        self,
        trainer_state: TrainerState,
        model: nn.Module,
        loss_module: LossModule,
        batch: DictData,
        batch_idx: int,
    ) -> None:
        """Run the train timer (resuming it after validation) and measure data time."""
        now = time.perf_counter()
        if self._start_step is None:
            self._start_step = trainer_state["global_step"]
            self._window_start_time = 0.0
        if not self._train_timer.running:
            self._train_timer.resume()
        last_batch_end = self._last_batch_end
        if last_batch_end is not None:
            self._data_time += now - last_batch_end
            self._data_batches += 1

    def on_train_batch_end(
        self,
        trainer_state: TrainerState,
        model: nn.Module,
        loss_module: LossModule,
        outputs: DictData,
        batch: DictData,
        batch_idx: int,
    ) -> MetricLogs | None:
        """Accumulate the step's metrics; on log steps return their averages (collective).

        Every rank must run this hook on every batch: log steps all-reduce the averages.
        """
        metrics = metric_tensors(trainer_state)
        if metrics:
            self._window.add(metrics)
        self._window_batches += 1
        if isinstance(batch, dict):
            images = batch.get("images")
            if isinstance(images, Tensor) and images.dim() > 0:
                self._window_images += images.shape[0]
        logs: MetricLogs | None = None
        if self._is_train_log_step(trainer_state, batch_idx):
            logs = self._log_window(trainer_state, batch_idx, model)
        else:
            if not self._first_line_done and is_rank_zero():
                self._log_first_batch(trainer_state, batch_idx, metrics)
            display = self._bar_due()
            if display is not None:
                completed = self._position(trainer_state, batch_idx)[1]
                display.update_task("train", completed, eta=self._eta(trainer_state))
        self._first_line_done = True
        self._last_batch_end = time.perf_counter()
        return logs

    def _log_window(
        self, trainer_state: TrainerState, batch_idx: int, model: nn.Module
    ) -> MetricLogs | None:
        """Close the window: average it (collective), print its line, return the averages.

        Rank 0 also returns the window's ``perf/*`` scalars (its own clocks and memory, read
        without a device sync); the engines write those keys as they are, not as ``train/``.
        """
        averages = self._reduce_window()
        logs: MetricLogs = dict(averages)
        if is_rank_zero():
            shown = {**learning_rates(trainer_state), **averages}
            prefix, completed = self._position(trainer_state, batch_idx)
            eta = self._eta(trainer_state)
            display = self._bar_due(force=True)
            if display is not None:
                display.update_task(
                    "train", completed, eta=eta, metrics=format_metrics(shown), redraw=True
                )
            logger.info(self._train_line(prefix, eta, shown))
            logs.update(self._window_rates())
            logs["perf/max_memory_mb"] = max_memory_mb(model)
        self._reset_window()
        return logs or None

    def _log_first_batch(
        self, trainer_state: TrainerState, batch_idx: int, metrics: Mapping[str, Any] | None
    ) -> None:
        """Rank 0's values of the first batch of this process, at once (one sync, once)."""
        values = to_floats(dict(metrics or {}))
        shown = {**learning_rates(trainer_state), **dict(sorted(values.items()))}
        prefix, _ = self._position(trainer_state, batch_idx)
        parts = [prefix, f"ETA: {self._eta(trainer_state)}"]
        if shown:
            parts.append(format_metrics(shown))
        logger.info(", ".join(parts) + " (first batch)")

    # ------------------------------------------------------------------ testing hooks

    def on_test_epoch_start(self, trainer_state: TrainerState, model: nn.Module) -> None:
        """Pause training time and start the test timer and bar."""
        self._train_timer.pause()
        self._last_batch_end = None
        self._test_timer.start()
        self._test_done = 0
        per_loader = trainer_state.get("num_test_batches")
        self._test_total = sum(per_loader) if per_loader else None
        self._get_display().start_task("test", "Testing", self._test_total)

    def on_test_batch_end(
        self,
        trainer_state: TrainerState,
        model: nn.Module,
        outputs: DictData,
        batch: DictData,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Log a ``Testing i/n`` line every ``refresh_rate`` test batches (rank 0)."""
        self._test_timer.resume()
        self._test_done += 1
        per_loader = trainer_state.get("num_test_batches") or []
        num_batches = per_loader[dataloader_idx] if dataloader_idx < len(per_loader) else None
        log_step = (batch_idx + 1) % self.refresh_rate == 0 or batch_idx + 1 == num_batches
        display = self._bar_due(force=log_step)
        if display is not None:
            eta = format_eta(self._test_eta_seconds())
            display.update_task("test", self._test_done, eta=eta, redraw=log_step)
        if log_step and is_rank_zero():
            logger.info(self._test_line(batch_idx, dataloader_idx, num_batches, per_loader))

    def _test_rate(self) -> float:
        elapsed = self._test_timer.elapsed()
        return self._test_done / elapsed if elapsed > 0 else 0.0

    def _test_eta_seconds(self) -> float | None:
        rate = self._test_rate()
        if self._test_total is None or rate <= 0:
            return None
        return max(self._test_total - self._test_done, 0) / rate

    def _test_line(
        self, batch_idx: int, dataloader_idx: int, num_batches: int | None, per_loader: list[int]
    ) -> str:
        loader = f" [loader {dataloader_idx + 1}/{len(per_loader)}]" if len(per_loader) > 1 else ""
        total = "?" if num_batches is None else str(num_batches)
        parts = [f"Testing{loader} {batch_idx + 1}/{total}"]
        parts.append(f"ETA: {format_eta(self._test_eta_seconds())}")
        rate = self._test_rate()
        if rate > 0:
            parts.append(f"{rate:.2f} it/s")
        return ", ".join(parts)

    def on_test_epoch_end(self, trainer_state: TrainerState, model: nn.Module) -> MetricLogs | None:
        """Stop the test timer and remove the testing bar."""
        self._test_timer.pause()
        if self._display is not None:
            self._display.end_task("test")
        return None

    def on_fit_end(self, trainer_state: TrainerState, model: nn.Module) -> None:
        """Stop the live bar and give the terminal back."""
        if self._display is not None:
            self._display.close()

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, trainer_state: TrainerState, model: nn.Module) -> None:
        """Collective: average the partial window across ranks before it is saved.

        Replacing each rank's partial sums by their mean leaves the next logged average
        unchanged (it is a mean over ranks anyway) and lets the single saved copy stand for
        every rank after a resume.
        """
        if is_distributed() and self._window.counts:
            self._window.replace(all_reduce_dict(self._window.snapshot(), "mean"))

    def state_dict(self) -> dict[str, Any]:
        """The partial metric window (empty right after a logged line)."""
        if not self._window.counts:
            return {}
        return {"sums": to_floats(self._window.snapshot()), "counts": dict(self._window.counts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the partial metric window so the next line averages the same batches."""
        sums = state_dict.get("sums", {})
        counts = state_dict.get("counts", {})
        if set(sums) != set(counts):
            raise ValueError(
                "LoggingCallback state is inconsistent: 'sums' and 'counts' have different "
                f"keys ({sorted(sums)} vs {sorted(counts)})."
            )
        # Kept as floats: the next metric tensors carry them onto their own device.
        self._window.load(sums, counts)


# ---------------------------------------------------------------------- other callbacks' logs


def log_callback_train_logs(
    callback: Callback, logs: Mapping[str, Any], trainer_state: TrainerState
) -> None:
    """Print the logs another callback returned from ``on_train_batch_end`` (rank 0).

    The engines write every callback's returned logs to the scalar files as ``train/<key>``;
    this puts the same values on the console, one line whenever a callback returns some::

        Epoch 3: 40/120, AccuracyCallback: acc: 0.8125

    A ``LoggingCallback``'s own averages are on its progress line already and are skipped.
    """
    if isinstance(callback, LoggingCallback) or not logs or not is_rank_zero():
        return
    num_batches = trainer_state.get("num_train_batches") or "?"
    done = trainer_state.get("batches_done", 0)
    position = f"Epoch {trainer_state['current_epoch']}: {done}/{num_batches}"
    values = to_floats(dict(logs))
    logger.info("%s, %s: %s", position, type(callback).__name__, format_metrics(values))


def log_evaluation_logs(
    stage: str, logs: Mapping[str, Any], epoch: int | None = None, step: int | None = None
) -> None:
    """One line with every scalar a validation or test returned, built-in or a user's (rank 0).

    ``Validation (epoch 3, step 1200): Det/AP: 0.5663, ..., my/metric: 1.0000``: the same keys,
    in the same order, as the ``val/<key>`` or ``test/<key>`` scalars in the files. Without
    ``epoch`` and ``step`` the parenthesis is left out.
    """
    if not logs or not is_rank_zero():
        return
    where = "" if epoch is None or step is None else f" (epoch {epoch}, step {step})"
    logger.info("%s%s: %s", stage, where, format_metrics(to_floats(dict(logs))))
