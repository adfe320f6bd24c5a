"""From micro-batch losses to optimizer steps: precision, accumulation, clipping.

Both engines train through one :class:`OptimizerStepper`, so a mixed-precision, accumulated or
clipped step is the same computation under the native Trainer and under Lightning. Per
micro-batch the engine does::

    with stepper.autocast():                      # bf16 / fp16 autocast, or nothing for "32"
        outputs = model(**inputs); loss, metrics = loss_module(outputs, batch)
    stepper.backward(loss)                        # loss / accumulate_grad_batches, scaled for fp16
    if stepper.window_full(micro_batch_index, last_of_epoch):
        stepper.step(optimizers, before_step=hook, want_norm=log_step)
        # unscale -> before_step(optimizer) -> clip -> step (skipped on inf/nan in fp16)
        # -> scaler update -> zero grads; returns False for a skipped step

The order is a hand-written loop's: autocast the forward and the loss, divide the loss by the
number of micro-batches, backward, (unscale,) clip the total norm or the values, step, zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
"""Accepted values of ``precision``."""

CLIP_ALGORITHMS = ("norm", "value")
"""Accepted values of ``gradient_clip_algorithm``."""

_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_NO_AUTOCAST = contextlib.nullcontext()


def check_step_options(
    precision: str,
    accumulate_grad_batches: int,
    gradient_clip_val: float | None,
    gradient_clip_algorithm: str,
) -> None:
    """Refuse a step option that is out of range, naming the value and the choices.

    Raises:
        ValueError: For an unknown precision or clip algorithm, a non-positive or non-integer
            ``accumulate_grad_batches``, or a negative or non-finite ``gradient_clip_val``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}.")
    if (
        isinstance(accumulate_grad_batches, bool)
        or not isinstance(accumulate_grad_batches, int)
        or accumulate_grad_batches < 1
    ):
        raise ValueError(
            f"accumulate_grad_batches={accumulate_grad_batches!r} must be an integer >= 1."
        )
    if gradient_clip_val is not None and not (
        isinstance(gradient_clip_val, (int, float))
        and not isinstance(gradient_clip_val, bool)
        and 0 < float(gradient_clip_val) < float("inf")
    ):
        raise ValueError(
            f"gradient_clip_val={gradient_clip_val!r} must be a finite number > 0, or None "
            "for no clipping."
        )
    if gradient_clip_algorithm not in CLIP_ALGORITHMS:
        raise ValueError(
            f"gradient_clip_algorithm={gradient_clip_algorithm!r} is not one of "
            f"{', '.join(CLIP_ALGORITHMS)}."
        )


def _trained_params(optimizers: Sequence[Optimizer]) -> list[Tensor]:
    """Every parameter with a gradient, in optimizer and group order, each once."""
    seen: set[int] = set()
    params: list[Tensor] = []
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None and id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
    return params


def _all_params(optimizers: Sequence[Optimizer]) -> list[Tensor]:
    """Every parameter of ``optimizers``, in optimizer and group order, each once."""
    seen: set[int] = set()
    params: list[Tensor] = []
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
    return params


def accumulated_grads(optimizers: Sequence[Optimizer]) -> list[Tensor | None]:
    """CPU copies of the gradients accumulated so far (a checkpoint inside a window)."""
    return [
        None if param.grad is None else param.grad.detach().to("cpu", copy=True)
        for param in _all_params(optimizers)
    ]


def restore_accumulated_grads(
    optimizers: Sequence[Optimizer], grads: Sequence[Tensor | None]
) -> None:
    """Put gradients saved by :func:`accumulated_grads` back on the parameters.

    Raises:
        ValueError: If the number of parameters differs from the saved one.
    """
    params = _all_params(optimizers)
    if len(params) != len(grads):
        raise ValueError(
            f"The checkpoint holds accumulated gradients of {len(grads)} parameters but the "
            f"optimizers hold {len(params)}; resume with the same model and optimizers."
        )
    for param, grad in zip(params, grads):
        param.grad = None if grad is None else grad.to(param.device, param.dtype)


class OptimizerStepper:
    """Autocast, loss scaling, gradient accumulation and clipping for one training run.

    Args:
        device: The device the model trains on (picks the autocast and scaler device type).
        precision: ``"32"`` (no autocast), ``"bf16-mixed"`` or ``"16-mixed"`` (autocast with
            that dtype; ``"16-mixed"`` also scales the loss with ``torch.amp.GradScaler``).
        accumulate_grad_batches: Micro-batches per optimizer step. Each micro-batch's loss is
            divided by this number before backward. The last window of an epoch may be
            shorter; it steps too (its gradients are then scaled by ``1/accumulate``, as in
            Lightning and MMEngine).
        gradient_clip_val: Clip threshold; None for no clipping.
        gradient_clip_algorithm: ``"norm"`` clips the total 2-norm of all trained gradients,
            ``"value"`` clamps each gradient element to ``[-val, val]``.

    Attributes:
        scaler: The fp16 loss scaler (disabled unless ``precision == "16-mixed"``); its
            state belongs in checkpoints.
        skipped_steps: Optimizer steps skipped because fp16 gradients held inf or nan.
        grad_norm: The total gradient norm of the last step, as a device tensor (no host
            sync), when it was computed (clipping by norm, or ``want_norm``); else None.
        plain_backward: Whether ``backward(loss)`` is just ``loss.backward()`` (no
            accumulation, no loss scaling), so a per-step loop may call that instead.
    """

    def __init__(
        self,
        device: torch.device,
        precision: str = "32",
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
    ) -> None:
        check_step_options(
            precision, accumulate_grad_batches, gradient_clip_val, gradient_clip_algorithm
        )
        self.device_type = device.type
        self.precision = precision
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = None if gradient_clip_val is None else float(gradient_clip_val)
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=precision == "16-mixed")
        self._scaling = self.scaler.is_enabled()
        # backward(loss) would be loss.backward() itself: an engine may call that directly.
        self.plain_backward = accumulate_grad_batches == 1 and not self._scaling
        dtype = _AUTOCAST_DTYPES.get(precision)
        # One context for the whole run: building a torch.autocast per micro-batch costs
        # more than entering it (its checks run in __init__), and entering keeps no state
        # beyond the matching exit. None for "32": a loop that branches on it enters nothing.
        self.autocast_context: contextlib.AbstractContextManager[Any] | None = (
            None if dtype is None else torch.autocast(self.device_type, dtype=dtype)
        )
        self.skipped_steps = 0
        self.grad_norm: Tensor | None = None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """A context that runs the forward and the loss under autocast for the precision.

        The same context object every call, built once (``"32"``: a shared no-op): it is
        entered once per micro-batch and must not be nested inside itself. A per-step loop
        may test ``autocast_context`` (None for ``"32"``) instead and enter nothing.
        """
        context = self.autocast_context
        return _NO_AUTOCAST if context is None else context

    def window_full(self, micro_batch_index: int, last_of_epoch: bool) -> bool:
        """Whether the micro-batch ``micro_batch_index`` (0-based in the epoch) ends a window.

        A window ends after every ``accumulate_grad_batches`` micro-batches and at the last
        batch of an epoch (a shorter, partial window).
        """
        return last_of_epoch or (micro_batch_index + 1) % self.accumulate_grad_batches == 0

    def backward(self, loss: Tensor, backward: Callable[[Tensor], None] | None = None) -> None:
        """Back-propagate one micro-batch's loss, divided by the window and scaled for fp16.

        Args:
            loss: The micro-batch's total loss.
            backward: How to back-propagate (Lightning's ``manual_backward``); default
                ``Tensor.backward``.
        """
        if self.accumulate_grad_batches > 1:
            loss = loss / self.accumulate_grad_batches
        scaled = self.scaler.scale(loss) if self._scaling else loss
        if backward is None:
            scaled.backward()
        else:
            backward(scaled)

    def step(
        self,
        optimizers: Sequence[Optimizer],
        before_step: Callable[[Optimizer], None] | None = None,
        want_norm: bool = False,
    ) -> bool:
        """Finish a window: unscale, hook, clip, step every optimizer, zero the gradients.

        Args:
            optimizers: The run's optimizers, stepped in order.
            before_step: Called once per optimizer after unscaling and before clipping (the
                ``on_before_optimizer_step`` hook).
            want_norm: Compute the total gradient norm even when not clipping by norm (on log
                steps), kept in :attr:`grad_norm` as a tensor.

        Returns:
            False when fp16 loss scaling found inf/nan gradients and skipped the step (the
            caller then advances neither the schedulers nor the EMA); True otherwise.
        """
        scaling = self._scaling
        if scaling:
            for optimizer in optimizers:
                self.scaler.unscale_(optimizer)
        if before_step is not None:
            for optimizer in optimizers:
                before_step(optimizer)
        self.grad_norm = None
        clip = self.gradient_clip_val
        if clip is not None or want_norm:
            params = _trained_params(optimizers)
            if clip is not None and self.gradient_clip_algorithm == "norm":
                self.grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
            else:
                if want_norm:
                    self.grad_norm = torch.nn.utils.get_total_norm(
                        [p.grad for p in params if p.grad is not None], foreach=True
                    )
                if clip is not None:
                    torch.nn.utils.clip_grad_value_(params, clip, foreach=True)
        stepped = True
        if scaling:
            scale_before = self.scaler.get_scale()
            for optimizer in optimizers:
                self.scaler.step(optimizer)
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale_before
            if not stepped:
                self.skipped_steps += 1
        else:
            for optimizer in optimizers:
                optimizer.step()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        return stepped

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state and the skipped-step count, for checkpoints."""
        return {"scaler": self.scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (an empty scaler state is accepted)."""
        scaler_state = state.get("scaler") or {}
        if scaler_state and self.scaler.is_enabled():
            self.scaler.load_state_dict(scaler_state)
        self.skipped_steps = int(state.get("skipped_steps", 0))


__all__ = [
    "CLIP_ALGORITHMS",
    "PRECISIONS",
    "OptimizerStepper",
    "accumulated_grads",
    "check_step_options",
    "restore_accumulated_grads",
]
