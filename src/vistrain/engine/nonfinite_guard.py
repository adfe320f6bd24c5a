"""Stop a run whose loss or gradient norm became NaN or Inf, without a device sync per step.

Reading a loss as a Python float waits for the device, so checking every step would cost a
sync per step. Instead every step keeps its (detached) loss values as they are (no kernel,
no sync); every few hundred steps they are stacked and folded, on the device, into the
first step each value was not finite, and the host reads that only on log steps and before
every checkpoint (``LoopState`` calls ``check``). A bad value is then reported with the
step and epoch it first appeared in, and the loss terms that were not finite, and no
checkpoint of the poisoned weights is written. Values in CPU memory have no device to wait
for: they are read as they arrive (cheaper than stacking them later, and nothing is kept),
and reported at the same checks.

Under fp16 loss scaling a step with inf/nan gradients is skipped rather than watched; more
than ``max_skipped_steps`` of them in a row (a run that diverged and overflows at every
scale) stop the run too (``NonFiniteGuard.observe_skipped_step``).

``nonfinite_tensors`` checks a state dict (one sync, at save time): ``CheckpointCallback``
never lets a file with non-finite weights become ``last.ckpt`` or ``best.ckpt``.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from math import isfinite
from typing import Any

import torch

from vistrain.common.checks import check_positive_int
from vistrain.common.distributed import all_gather_object, is_distributed

TOTAL_LOSS = "total_loss"
"""Name of the summed loss among the watched values."""
GRAD_NORM = "grad_norm"
"""Name of the gradient norm among the watched values (when the step computes one)."""


class NonFiniteError(RuntimeError):
    """A loss term, the total loss or the gradient norm became NaN or Inf."""


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(())
    return torch.tensor(float(value))


class _Watch:
    """Rows of watched values, one per step, and the first step each value was not finite.

    Where the values live decides how (``on_host``, from the layout's first row, as in
    ``MetricWindow``). In CPU memory each value is read as it arrives (``check_row``):
    about 0.25 us a value against 0.6 us to stack it later, and nothing is kept. Elsewhere a
    row's values are only kept (a list extend, no device op) until the fold stacks all kept
    rows at once, so a step costs no kernel launch. Rows are numbered in order of arrival;
    ``row_steps`` maps a row number to its training step on the host (8 bytes per step), so
    the fold needs no host-to-device copy.
    """

    def __init__(self, width: int, on_host: bool | None = None) -> None:
        self.width = width  # values per row
        self.on_host = on_host  # None: not known yet (kept, as elsewhere, until it is)
        self.host_first_bad = [0] * width  # on_host: per value, first bad step (0 = none)
        self.values: list[Any] = []  # the kept rows' values, row after row
        self.kept = 0  # rows kept, not yet folded
        self.row_steps = array("q")
        self.folded = 0  # rows already folded
        self.first_bad: torch.Tensor | None = None  # per value: 1 + first bad row, 0 = none

    def add(self, row: Sequence[Any], step: int, fold_every: int) -> None:
        """Watch one row of ``width`` values, made at ``step``."""
        if self.on_host:
            self.check_row(row, step)
            return
        self.values.extend(row)
        self.count_rows(1, step, fold_every)

    def check_row(self, row: Sequence[Any], step: int) -> None:
        """``on_host``: read the row now; note ``step`` for each value first found not finite.

        One read per distinct value in a run of repeats (a one-term loss module's term, its
        ``"loss"`` and the total are one tensor).
        """
        previous = None
        for value in row:
            if value is not previous and not isfinite(value):
                break
            previous = value
        else:
            return
        first_bad = self.host_first_bad
        for index, value in enumerate(row):
            if not first_bad[index] and not isfinite(value):
                first_bad[index] = step

    def count_rows(self, rows: int, step: int, fold_every: int) -> None:
        """Count the last ``rows`` rows put straight into ``values``, all made at ``step``.

        Folds once ``fold_every`` rows are kept (a window's rows are counted together, so
        a fold may come up to one window later than ``fold_every``).
        """
        if not rows:
            return
        self.row_steps.extend((step,) * rows)
        self.kept += rows
        if self.kept >= fold_every:
            self.fold()

    def _stacked(self) -> torch.Tensor:
        """The kept rows as one ``(rows, width)`` tensor (one stack in the common case)."""
        values = self.values
        try:
            flat = torch.stack(values)
        except (TypeError, RuntimeError):  # numbers, (1,)-shaped terms, mixed devices
            device = next(v.device for v in values if isinstance(v, torch.Tensor))
            flat = torch.stack([_as_tensor(v).to(device) for v in values])
        return flat.reshape(self.kept, self.width)

    def fold(self) -> None:
        """Fold the kept rows into ``first_bad`` with device ops only."""
        if not self.kept:
            return
        bad = ~torch.isfinite(self._stacked())  # (rows, values)
        start = self.folded + 1
        number = torch.arange(start, start + self.kept, device=bad.device)
        found = torch.where(bad, number[:, None], torch.iinfo(torch.int64).max).min(dim=0).values
        found = torch.where(bad.any(dim=0), found, 0)
        self.folded += self.kept
        self.values.clear()
        self.kept = 0
        if self.first_bad is not None:
            found = torch.where(self.first_bad > 0, self.first_bad, found)
        self.first_bad = found

    def bad_steps(self) -> list[int]:
        """Per watched value, the first step it was not finite (0 = never); one host sync."""
        if self.on_host:
            return list(self.host_first_bad)
        self.fold()
        if self.first_bad is None:
            return []
        return [self.row_steps[row - 1] if row else 0 for row in self.first_bad.tolist()]


class NonFiniteGuard:
    """Keeps each step's losses on the device; finds non-finite ones when asked.

    A step costs a list extend of its (already computed, detached) loss values. Every
    ``FOLD_EVERY`` steps, and when checked, the kept values are stacked and folded on the
    device into the first row at which each watched value was not finite, so memory stays
    bounded however rarely the run checks. The epoch of a step is known on the host from the
    epoch starts the guard has seen, so a check reads one small tensor.

    Steps that fp16 loss scaling skips (inf/nan gradients) are the scaler's to handle: their
    losses are not watched, the scaler halves its scale and the run goes on. A run that
    diverged, though, overflows at every scale and would skip every step from then on
    without ever stopping; so more than ``max_skipped_steps`` skipped steps in a row stop it
    (``observe_skipped_step``). The count starts over after a resume.

    Args:
        max_skipped_steps: Most fp16 steps in a row that may be skipped before the run
            stops. The default, 100, is far above the few skips with which a run finds its
            scale (at the start, or after a rare overflow): each skip halves the scale, so
            after 100 in a row it is ``2**16 / 2**100``, about ``5e-26``, and no
            finite gradient can be the cause any more.

    Raises:
        TypeError: If ``max_skipped_steps`` is not an int.
        ValueError: If it is below 1.
    """

    FOLD_EVERY = 256
    READ_CPU_VALUES_AT_ONCE = True
    """Read values in CPU memory as they arrive; False keeps them for the fold (tests)."""

    def __init__(self, max_skipped_steps: int = 100) -> None:
        check_positive_int("max_skipped_steps", max_skipped_steps)
        self.max_skipped_steps = max_skipped_steps
        self._keys: tuple[str, ...] | None = None
        self._names: list[str] | None = None
        self._losses = _Watch(1)
        self._grad_norm = _Watch(1)
        self._epoch_starts: list[tuple[int, int]] = []  # (first step, epoch)
        self._skips_from = 0  # first step of the latest run of skipped steps
        self._last_skipped = -1  # the latest skipped step

    def observe(
        self, total_loss: torch.Tensor, metrics: Mapping[str, Any], step: int, epoch: int
    ) -> None:
        """Keep step ``step``'s total loss and loss terms (no host sync, no device op).

        A change of the watched names (a loss term that appears later) first checks what
        was collected so far, then starts over with the new names.

        Raises:
            NonFiniteError: Only when the names changed and an earlier value was not finite.
        """
        if total_loss.requires_grad:  # the engines hand over a detached loss already
            total_loss = total_loss.detach()
        self.observe_window(((total_loss, metrics, epoch),), step)

    def observe_window(
        self, rows: Sequence[tuple[torch.Tensor, Mapping[str, Any], int]], step: int
    ) -> None:
        """``observe`` for every micro-batch of step ``step``'s window, in one call.

        Args:
            rows: Per micro-batch ``(total_loss, metrics, epoch)``, the total loss already
                detached (the engines hand over the loss module's detached total).
            step: The step the window made.

        Raises:
            NonFiniteError: As ``observe``.
        """
        epoch_starts = self._epoch_starts
        watch = self._losses
        values = watch.values
        added = 0  # rows put in ``values`` and not yet counted by ``watch``
        for total_loss, metrics, epoch in rows:
            if not epoch_starts or epoch_starts[-1][1] != epoch:
                epoch_starts.append((step, epoch))
            keys = tuple(metrics)
            if keys != self._keys:
                watch.count_rows(added, step, self.FOLD_EVERY)
                added = 0
                self.check()
                self._keys = keys
                self._names = [TOTAL_LOSS, *keys]
                on_host = self._reads_at_once(total_loss, *metrics.values())
                watch = self._losses = _Watch(len(keys) + 1, on_host)
                values = watch.values
            if watch.on_host:
                watch.check_row((total_loss, *metrics.values()), step)
                continue
            # _Watch.add without its call per micro-batch: the rows are counted at once.
            values.append(total_loss)
            values.extend(metrics.values())
            added += 1
        watch.count_rows(added, step, self.FOLD_EVERY)

    def _reads_at_once(self, *values: Any) -> bool:
        """Whether to read these values as they arrive: all in CPU memory (or numbers)."""
        return self.READ_CPU_VALUES_AT_ONCE and all(
            not isinstance(v, torch.Tensor) or v.device.type == "cpu" for v in values
        )

    def observe_grad_norm(self, grad_norm: torch.Tensor, step: int) -> None:
        """Keep a step's gradient norm (no host sync)."""
        grad_norm = grad_norm.detach().reshape(())
        watch = self._grad_norm
        if watch.on_host is None:  # the first norm: where it lives decides
            watch.on_host = self._reads_at_once(grad_norm)
        watch.add((grad_norm,), step, self.FOLD_EVERY)

    def observe_skipped_step(self, step: int, epoch: int, scale: float) -> None:
        """Count step ``step``, which fp16 loss scaling skipped; stop a run that only skips.

        Args:
            step: The skipped step's number (``global_step`` after it).
            epoch: Its epoch (for the message).
            scale: The loss scale after the skip (for the message).

        Raises:
            NonFiniteError: When more than ``max_skipped_steps`` steps in a row were skipped.
        """
        if step != self._last_skipped + 1:
            self._skips_from = step
        self._last_skipped = step
        in_a_row = step - self._skips_from + 1
        if in_a_row <= self.max_skipped_steps:
            return
        raise NonFiniteError(
            f"training stopped: fp16 loss scaling skipped {in_a_row} steps in a row (steps "
            f"{self._skips_from}-{step}, epoch {epoch}; max_skipped_steps="
            f"{self.max_skipped_steps}) because the gradients held inf/nan at every loss "
            f"scale down to {scale:.3g}; no step changed the weights. Check the data and the "
            "loss for inf/nan, lower lr, add gradient clipping or train with "
            "precision='bf16-mixed' or '32'."
        )

    def _epoch_of(self, step: int) -> int:
        epoch = self._epoch_starts[0][1] if self._epoch_starts else 0
        for first_step, start_epoch in self._epoch_starts:
            if first_step <= step:
                epoch = start_epoch
        return epoch

    def check(self) -> None:
        """Read the collected flags (one host sync); raise if anything was not finite.

        Collective under a process group (every rank calls it at the same log step or
        checkpoint): the ranks' findings are merged, so all of them stop together rather
        than one raising while the others wait in the next collective.

        Raises:
            NonFiniteError: Naming the first step and epoch with a non-finite value and
                every value that was not finite at that step.
        """
        bad: dict[str, int] = {}
        for names, watch in ((self._names or [], self._losses), ([GRAD_NORM], self._grad_norm)):
            for name, step in zip(names, watch.bad_steps()):
                if step:
                    bad[name] = step
        if is_distributed():
            merged: dict[str, int] = {}
            for rank_bad in all_gather_object(bad):
                for name, step in rank_bad.items():
                    merged[name] = min(step, merged.get(name, step))
            bad = merged
        if not bad:
            return
        first = min(bad.values())
        names = [name for name, step in bad.items() if step == first]
        later = sorted(name for name, step in bad.items() if step != first)
        more = f" (later also: {', '.join(later)})" if later else ""
        raise NonFiniteError(
            f"training stopped: non-finite value of {', '.join(names)} at step {first} "
            f"(epoch {self._epoch_of(first)}){more}; no checkpoint was written from then on. "
            "Lower lr, add gradient clipping or check the data; resume from a checkpoint "
            "saved before that step."
        )


def nonfinite_tensors(state_dict: Mapping[str, Any], limit: int = 5) -> list[str]:
    """Names of floating-point tensors of ``state_dict`` holding NaN or Inf (at most ``limit``).

    One device sync for the whole dict (the flags are stacked before they are read).
    """
    names: list[str] = []
    flags: list[torch.Tensor] = []
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            names.append(name)
            flags.append(torch.isfinite(value).all())
    if not flags:
        return []
    device = flags[0].device
    finite = torch.stack([flag.to(device) for flag in flags]).tolist()
    return [name for name, ok in zip(names, finite) if not ok][:limit]


__all__ = ["GRAD_NORM", "TOTAL_LOSS", "NonFiniteError", "NonFiniteGuard", "nonfinite_tensors"]
