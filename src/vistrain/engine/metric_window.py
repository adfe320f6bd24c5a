"""Running sums of per-step metrics between two log lines, without a device sync per step.

``LoggingCallback`` adds every step's ``trainer_state["metrics"]`` to a ``MetricWindow`` and
reads the averages only on log steps and checkpoints. How the sums are kept depends on
where the tensors live (see ``MetricWindow``); the result is the same either way, and a window
saved in a checkpoint continues bit for bit after a resume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def to_floats(values: dict[str, Any]) -> dict[str, float]:
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


class MetricWindow:
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

    def add(self, metrics: Mapping[str, Any]) -> None:
        """Add one step's metrics (no device sync)."""
        keys = tuple(metrics)
        if keys != self._keys:
            self._fold()
            if not _keepable(metrics):
                self._keys = None
                self._add_per_key(metrics)
                return
            self._keys = keys
            self._on_host = read_at_once(next(iter(metrics.values())).device)
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

    def _add_per_key(self, metrics: Mapping[str, Any]) -> None:
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


def read_at_once(device: torch.device) -> bool:
    """Whether reading a metric on the host is free: CPU memory, no device to wait for."""
    return device.type == "cpu"


def _keepable(metrics: Mapping[str, Any]) -> bool:
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
