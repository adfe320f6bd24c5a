"""Callback for updating EMA model."""

from __future__ import annotations

import numbers
from typing import Any

from torch import nn

from vistrain.common.typing import DictData, MetricLogs
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.trainer_state import TrainerState
from vistrain.engine.connectors import CallbackConnector
from vistrain.engine.loss_module import LossModule
from vistrain.model.adapter import ModelEMAAdapter, find_ema_adapters


class EMACallback(Callback):
    """Callback for EMA: updates the model's EMA copy after every optimizer step.

    Where it sits in the loop::

        for batch in train_loader:
            loss.backward(); optimizer.step()        # global_step += 1 when it stepped
            ema_callback.on_train_batch_end(...)     # adapter.update(global_step)

    The model must contain a ``ModelEMAAdapter`` (or ``ModelExpEMAAdapter``): directly,
    or inside DDP, DataParallel or any other wrapper modules at any depth. Every
    outermost adapter found is updated with the trainer's ``global_step``. With gradient
    accumulation the hook runs on batches where the optimizer did not step
    (``trainer_state["step_end"]`` False, ``global_step`` unchanged since the last update);
    the callback leaves the EMA alone then, so it moves exactly once per optimizer step. A
    step that fp16 loss scaling skipped (``step_skipped``) does not move it either.

    The adapters are looked up once per model object and cached; the hook itself does no
    device sync. ``state_dict`` holds the last step it updated at, so a resumed run
    neither repeats nor skips an update (the EMA weights and the adapter's update counter
    travel in the model's own state dict).

    Args:
        epoch_based: Whether the callback counts in epochs (unused by EMA).
        train_connector: Unused by EMA; accepted for the common callback signature.
        test_connector: Unused by EMA; accepted for the common callback signature.
    """

    def __init__(
        self,
        epoch_based: bool = True,
        train_connector: CallbackConnector | None = None,
        test_connector: CallbackConnector | None = None,
    ) -> None:
        super().__init__(epoch_based, train_connector, test_connector)
        self._last_step = 0
        self._model: nn.Module | None = None
        self._adapters: tuple[ModelEMAAdapter, ...] = ()

    def adapters(self, model: nn.Module) -> tuple[ModelEMAAdapter, ...]:
        """The EMA adapters this callback updates in ``model`` (cached per model object).

        Raises:
            TypeError: If ``model`` contains no ``ModelEMAAdapter``.
        """
        if model is not self._model:
            found = find_ema_adapters(model)
            if not found:
                raise TypeError(
                    f"EMACallback found no EMA adapter in the model ({type(model).__name__}); "
                    "wrap the model before training: model = ModelEMAAdapter(model) or "
                    "ModelExpEMAAdapter(model) from vistrain.model.adapter (then DDP if needed)."
                )
            self._model, self._adapters = model, tuple(found)
        return self._adapters

    def on_train_batch_end(
        self,
        trainer_state: TrainerState,
        model: nn.Module,
        loss_module: LossModule,
        outputs: DictData,
        batch: DictData,
        batch_idx: int,
    ) -> MetricLogs | None:
        """Update the EMA copy if the optimizer stepped (and changed the weights) at this batch."""
        step = trainer_state["global_step"]
        if (
            step <= 0
            or step == self._last_step
            or not trainer_state.get("step_end", True)
            or trainer_state.get("step_skipped", False)
        ):
            return None  # no optimizer step yet / accumulating gradients / a skipped fp16 step
        for adapter in self.adapters(model):
            adapter.update(step)
        self._last_step = step
        return None

    def state_dict(self) -> dict[str, Any]:
        """The last global step the EMA was updated at."""
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the last updated step from ``state_dict``.

        Raises:
            ValueError: If the state has no non-negative integer ``last_step``.
        """
        last_step = state_dict.get("last_step")
        if (
            isinstance(last_step, bool)
            or not isinstance(last_step, numbers.Integral)
            or last_step < 0
        ):
            raise ValueError(
                f"EMACallback state needs 'last_step' as an integer >= 0, got {last_step!r}; "
                "pass a dict returned by EMACallback.state_dict()."
            )
        self._last_step = int(last_step)
