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

    Epoch 3: 40/120, ETA: 0:01:12, 2.31 it/s, 73.9 img/s, data: 0.004s, loss: 1.2345, ...

(``Iter 40/1000`` when the callback is step based, ``Testing 5/20`` while testing). The epoch
is counted from 1. ``ETA`` covers the whole run: the rate is measured over the steps this
process has trained (so it is right after a resume), the remaining steps come from
``global_step`` and ``num_steps`` or ``num_epochs * num_train_batches``; without a limit it
reads ``ETA: ?``. ``it/s``, ``img/s`` (per-rank batch size from ``batch["images"]`` times the
world size) and ``data`` (average time per batch between the end of one
``on_train_batch_end`` and the next ``on_train_batch_start``, i.e. waiting for the loader
and for callbacks listed after this one) cover the batches since the previous line.

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
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vistrain.common.distributed import (
    all_reduce_dict,
    get_world_size,
    is_distributed,
    is_rank_zero,
)
from vistrain.common.logging import ProgressDisplay, create_progress_display, ensure_logger
from vistrain.common.timer import Timer
from vistrain.common.typing import DictData, MetricLogs
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.trainer_state import TrainerState, metric_tensors
from vistrain.engine.loss_module import LossModule

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


def _to_floats(values: dict[str, Any]) -> dict[str, float]:
    """Python floats of a dict of scalars, with one device-to-host transfer for all tensors."""
    out = {key: float(value) for key, value in values.items() if not isinstance(value, Tensor)}
    tensor_keys = [key for key, value in values.items() if isinstance(value, Tensor)]
    if tensor_keys:
        device = values[tensor_keys[0]].device
        stacked = torch.stack([values[key].to(device).reshape(()) for key in tensor_keys])
        out.update(zip(tensor_keys, stacked.tolist()))
    return out


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class _MetricWindow:
    """Running sums of the metrics since the last logged line.

    The common case is the same keys every step as one-element tensors on one device. On
    the CPU each value is read at once and added to a Python float (reading CPU memory
    syncs nothing, and the tensors are freed at once). On an accelerator the steps'
    tensors are kept and summed (one ``torch.stack`` and one sum, in float64) only when
    the window is read, on log steps and checkpoints, so nothing waits for the device in
    between. Other steps (keys that change, Python numbers) fall back to one sum per key.
    Sums are folded at the same points whether or not a run was resumed (saving a
    checkpoint reads the window), so a window restored from a checkpoint continues bit for
    bit. ``clear()`` keeps the key layout for the next window.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor | float] = {}  # folded sums
        self._counts: dict[str, int] = {}  # steps folded into each sum
        self._keys: tuple[str, ...] | None = None  # layout of the steps not yet folded
        self._on_host = False  # layout's tensors live on the CPU: sum as floats
        self._host_sums: list[float] = []
        self._steps = 0  # steps in the layout's accumulators
        self._pending: list[list[Tensor]] = []  # accelerator steps, not yet summed

    @property
    def counts(self) -> dict[str, int]:
        """Number of steps that contributed to each key's sum."""
        if not self._steps or self._keys is None:
            return self._counts
        merged = dict(self._counts)
        for key in self._keys:
            merged[key] = merged.get(key, 0) + self._steps
        return merged

    def add(self, metrics: dict[str, Any]) -> None:
        """Add one step's metrics (no device sync)."""
        keys = tuple(metrics)
        if keys != self._keys:
            self._fold()
            if not _keepable(metrics):
                self._keys = None
                self._add_per_key(metrics)
                return
            self._keys = keys
            self._on_host = _read_at_once(next(iter(metrics.values())).device)
            self._host_sums = [0.0] * len(keys)
        if self._on_host:
            sums = self._host_sums
            for index, value in enumerate(metrics.values()):
                sums[index] += value.item()
        else:
            self._pending.append(list(metrics.values()))
        self._steps += 1

    def _fold(self) -> None:
        """Move the layout's accumulators into the per-key sums (no host read)."""
        keys, steps = self._keys, self._steps
        if not steps or keys is None:
            return
        columns: Sequence[Tensor | float]
        if self._on_host:
            columns = self._host_sums
            self._host_sums = [0.0] * len(keys)
        else:
            flat = [value for step in self._pending for value in step]
            with torch.no_grad():
                try:
                    stacked = torch.stack(flat)
                except RuntimeError:  # mixed shapes or dtypes: () next to (1,), say
                    dtype = _sum_dtype(flat[0].device)
                    stacked = torch.stack([value.reshape(()).to(dtype) for value in flat])
                totals = stacked.reshape(steps, len(keys)).to(_sum_dtype(stacked.device))
                columns = totals.sum(0).unbind()
            self._pending.clear()
        sums, counts = self._sums, self._counts
        for key, column in zip(keys, columns):
            previous = sums.get(key)
            sums[key] = column if previous is None else column + previous  # type: ignore[operator,assignment]
            counts[key] = counts.get(key, 0) + steps
        self._steps = 0

    def _add_per_key(self, metrics: dict[str, Any]) -> None:
        sums = self._sums
        for key, value in metrics.items():
            _check_metric(key, value)
            total = sums.get(key)
            if isinstance(value, Tensor):
                value = value.detach().reshape(())
                if isinstance(total, Tensor):
                    sums[key] = total + value
                else:  # first value, or a float restored from a checkpoint
                    start = 0.0 if total is None else total
                    sums[key] = value.to(_sum_dtype(value.device), copy=True).add_(start)
            else:
                sums[key] = (0.0 if total is None else total) + float(value)
            self._counts[key] = self._counts.get(key, 0) + 1

    def snapshot(self) -> dict[str, Tensor | float]:
        """Key to running sum (tensors stay on their device), sorted by key."""
        self._fold()
        return {key: self._sums[key] for key in sorted(self._sums)}

    def replace(self, sums: dict[str, Tensor | float]) -> None:
        """Overwrite the sums (counts unchanged), e.g. with their mean across ranks."""
        self._fold()
        self._sums.update(sums)

    def clear(self) -> None:
        """Start an empty window (the key layout is kept: the next step needs no checks)."""
        self._pending.clear()
        if self._keys is not None:
            self._host_sums = [0.0] * len(self._keys)
        self._steps = 0
        self._sums = {}
        self._counts = {}

    def load(self, sums: dict[str, float], counts: dict[str, int]) -> None:
        """Restore sums and counts saved with ``snapshot`` converted to floats."""
        self._pending.clear()
        self._keys, self._steps = None, 0
        self._sums = {key: float(value) for key, value in sums.items()}
        self._counts = {key: int(value) for key, value in counts.items()}


def _read_at_once(device: torch.device) -> bool:
    """Whether reading a metric on the host is free: CPU memory, no device to wait for."""
    return device.type == "cpu"


def _keepable(metrics: dict[str, Any]) -> bool:
    """True when a step's metrics can be kept as they are and summed later in one stack.

    That needs one-element tensors on one device that carry no autograd graph (a kept
    tensor with a graph would keep the graph alive until the window is read).
    """
    values = list(metrics.values())
    for key, value in metrics.items():
        _check_metric(key, value)
    if not values or not all(isinstance(value, Tensor) for value in values):
        return False
    device = values[0].device
    return all(value.device == device and not value.requires_grad for value in values)


def _check_metric(key: str, value: Any) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(
                f"Metric {key!r} has shape {tuple(value.shape)}; trainer_state['metrics'] "
                "must hold scalars (0-d tensors or numbers)."
            )
    elif not isinstance(value, (int, float)):
        raise TypeError(
            f"Metric {key!r} is a {type(value).__name__}; trainer_state['metrics'] must hold "
            "scalars (0-d tensors or numbers)."
        )


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
        self._window = _MetricWindow()
        self._window_batches = 0
        self._window_images = 0
        self._window_start_time = 0.0
        self._data_time = 0.0
        self._data_batches = 0
        self._last_batch_end: float | None = None
        self._next_bar_update = 0.0
        self._metrics_text = ""
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
        totals = _to_floats(values)
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
            epoch = trainer_state["current_epoch"] + 1
            return f"Epoch {epoch}: {batch_idx + 1}/{total}", batch_idx + 1
        steps = total_train_steps(trainer_state)
        step = trainer_state["global_step"]
        return f"Iter {step}/{'?' if steps is None else steps}", step

    def _train_line(self, prefix: str, eta: str, metrics: dict[str, float]) -> str:
        parts = [prefix, f"ETA: {eta}"]
        window_time = self._train_timer.elapsed() - self._window_start_time
        if window_time > 0 and self._window_batches > 0:
            parts.append(f"{self._window_batches / window_time:.2f} it/s")
            if self._window_images > 0:
                images = self._window_images * get_world_size()
                parts.append(f"{images / window_time:.1f} img/s")
        if self._data_batches > 0:
            parts.append(f"data: {self._data_time / self._data_batches:.3f}s")
        parts.extend(f"{key}: {format_value(value)}" for key, value in metrics.items())
        return ", ".join(parts)

    def _update_bar(
        self, key: str, completed: int, info: str | None = None, force: bool = False
    ) -> None:
        display = self._display
        if display is None or not display.live:
            return
        now = time.perf_counter()
        if force or now >= self._next_bar_update:
            self._next_bar_update = now + _BAR_INTERVAL_S
            display.update_task(key, completed, info, redraw=force)

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
                f"Epoch {trainer_state['current_epoch'] + 1}",
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
            logs = self._log_window(trainer_state, batch_idx)
        else:
            if not self._first_line_done and is_rank_zero():
                self._log_first_batch(trainer_state, batch_idx, metrics)
            display = self._display
            if display is not None and display.live:
                self._update_bar("train", self._position(trainer_state, batch_idx)[1])
        self._first_line_done = True
        self._last_batch_end = time.perf_counter()
        return logs

    def _log_window(self, trainer_state: TrainerState, batch_idx: int) -> MetricLogs | None:
        """Close the window: average it (collective), print its line, return the averages."""
        averages = self._reduce_window()
        if is_rank_zero():
            self._metrics_text = ", ".join(
                f"{key}: {format_value(value)}" for key, value in averages.items()
            )
            prefix, completed = self._position(trainer_state, batch_idx)
            eta = self._eta(trainer_state)
            self._update_bar("train", completed, f"ETA: {eta}  {self._metrics_text}", force=True)
            logger.info(self._train_line(prefix, eta, averages))
        self._reset_window()
        return dict(averages) if averages else None

    def _log_first_batch(
        self, trainer_state: TrainerState, batch_idx: int, metrics: dict[str, Any] | None
    ) -> None:
        """Rank 0's values of the first batch of this process, at once (one sync, once)."""
        values: dict[str, float] = {}
        for key, value in (metrics or {}).items():
            values[key] = float(value.detach()) if isinstance(value, Tensor) else float(value)
        prefix, _ = self._position(trainer_state, batch_idx)
        parts = [prefix, f"ETA: {self._eta(trainer_state)}"]
        parts.extend(f"{key}: {format_value(value)}" for key, value in sorted(values.items()))
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
        if (batch_idx + 1) % self.refresh_rate == 0 or batch_idx + 1 == num_batches:
            self._update_bar("test", self._test_done, force=True)
            if is_rank_zero():
                logger.info(self._test_line(batch_idx, dataloader_idx, num_batches, per_loader))
        else:
            self._update_bar("test", self._test_done)

    def _test_line(
        self, batch_idx: int, dataloader_idx: int, num_batches: int | None, per_loader: list[int]
    ) -> str:
        loader = f" [loader {dataloader_idx + 1}/{len(per_loader)}]" if len(per_loader) > 1 else ""
        total = "?" if num_batches is None else str(num_batches)
        parts = [f"Testing{loader} {batch_idx + 1}/{total}"]
        elapsed = self._test_timer.elapsed()
        rate = self._test_done / elapsed if elapsed > 0 else 0.0
        eta = None
        if self._test_total is not None and rate > 0:
            eta = max(self._test_total - self._test_done, 0) / rate
        parts.append(f"ETA: {format_eta(eta)}")
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
        return {"sums": _to_floats(self._window.snapshot()), "counts": dict(self._window.counts)}

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
