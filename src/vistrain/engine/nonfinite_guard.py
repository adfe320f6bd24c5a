"""Stop a run whose loss or gradient norm became NaN or Inf, without a device sync per step.

Reading a loss as a Python float waits for the device, so checking every step would cost a
sync per step. Instead every step adds its finiteness flags to a small tensor on the device
(``torch.isfinite`` of each loss term, a logical and, and the first step a term went bad:
a few tiny kernels, no sync), and the host reads that tensor only on log steps and before
every checkpoint (``LoopState`` calls ``check``). A bad value is then reported with the step
and epoch it first appeared in, and the loss terms that were not finite, and no checkpoint
of the poisoned weights is written.

``nonfinite_tensors`` checks a state dict (one sync, at save time): ``CheckpointCallback``
never lets a file with non-finite weights become ``last.ckpt`` or ``best.ckpt``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

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


class NonFiniteGuard:
    """Collects finiteness flags on the device each step; reads them when asked.

    The flags of one step are ``isfinite`` of the total loss and every loss term (and the
    gradient norm when given). Per watched value the guard keeps, on the device, the first
    step at which it was not finite (0 = never). The epoch of that step is known on the host
    from the epoch starts it has seen, so reading the result is one small copy.
    """

    def __init__(self) -> None:
        self._names: list[str] | None = None
        self._first_bad: torch.Tensor | None = None  # int64 per name: first bad step, 0 = none
        self._epoch_starts: list[tuple[int, int]] = []  # (first step, epoch)
        self._grad_norm: torch.Tensor | None = None
        self._grad_first_bad: torch.Tensor | None = None

    def observe(self, total_loss: Any, metrics: Mapping[str, Any], step: int, epoch: int) -> None:
        """Record the finiteness of step ``step``'s losses (no host sync).

        A change of the watched names (a loss term that appears later) first checks what
        was collected so far, then starts over with the new names.

        Raises:
            NonFiniteError: Only when the names changed and an earlier value was not finite.
        """
        if not self._epoch_starts or self._epoch_starts[-1][1] != epoch:
            self._epoch_starts.append((step, epoch))
        names = [TOTAL_LOSS, *metrics]
        values = [_as_tensor(total_loss), *(_as_tensor(v) for v in metrics.values())]
        if names != self._names:
            self.check()
            self._names = names
            self._first_bad = None
        flags = torch.isfinite(torch.stack([v.to(values[0].device) for v in values]))
        self._first_bad = self._mark(self._first_bad, flags, step)

    def observe_grad_norm(self, grad_norm: torch.Tensor, step: int) -> None:
        """Record the finiteness of a step's gradient norm (no host sync)."""
        flags = torch.isfinite(grad_norm.detach().reshape(1))
        self._grad_first_bad = self._mark(self._grad_first_bad, flags, step)

    @staticmethod
    def _mark(first_bad: torch.Tensor | None, flags: torch.Tensor, step: int) -> torch.Tensor:
        if first_bad is None:
            first_bad = torch.zeros(flags.shape, dtype=torch.int64, device=flags.device)
        newly_bad = (~flags) & (first_bad == 0)
        return torch.where(newly_bad, torch.full_like(first_bad, step), first_bad)

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
        if self._first_bad is not None and self._names is not None:
            for name, step in zip(self._names, self._first_bad.tolist()):
                if step:
                    bad[name] = int(step)
        if self._grad_first_bad is not None:
            step = int(self._grad_first_bad.item())
            if step:
                bad[GRAD_NORM] = step
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
