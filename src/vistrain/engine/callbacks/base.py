"""Base module for callbacks.

A callback is a bundle of hooks the training loop calls at fixed points::

    callback.setup()
    for epoch in epochs:
        callback.on_train_epoch_start(state, model, loss_module)
        for batch_idx, batch in enumerate(train_loader):
            callback.on_train_batch_start(state, model, loss_module, batch, batch_idx)
            outputs = model(**train_connector(batch)); loss.backward()
            at a window's end (every accumulate_grad_batches batches, and the epoch's last):
                unscale (fp16); callback.on_before_optimizer_step(state, model, optimizer)
                clip; optimizer.step(); global_step += 1
            logs = callback.on_train_batch_end(state, model, loss_module, outputs, batch, batch_idx)
        callback.on_train_epoch_end(state, model, loss_module)
        # validation:
        callback.on_test_epoch_start(state, model)
        for batch_idx, batch in enumerate(test_loader):
            outputs = model(**test_connector(batch))
            callback.on_test_batch_end(state, model, outputs, batch, batch_idx)
        logs = callback.on_test_epoch_end(state, model)
        callback.on_validation_end(state, model)  # state["val_logs"] holds the new logs
    callback.on_fit_end(state, model)

Both engines (the native ``Trainer`` and the Lightning bridge) call the hooks at these
points, each with a ``TrainerState`` built for that call. Hooks run in the order the
callbacks are listed. A hook may return a dict of scalars,
which the trainer logs as ``train/<key>`` or ``val/<key>`` / ``test/<key>``. A callback that
holds state across steps implements ``state_dict`` / ``load_state_dict`` so checkpoints
carry it and resume restores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from vistrain.common.typing import DictData, MetricLogs
from vistrain.engine.callbacks.trainer_state import TrainerState
from vistrain.engine.connectors import CallbackConnector
from vistrain.engine.loss_module import LossModule


class Callback:
    """Base class for Callbacks.

    Args:
        epoch_based: Whether the callback counts in epochs (True) or in steps (False).
        train_connector: Which keyword arguments to extract during training.
        test_connector: Which keyword arguments to extract during testing.
    """

    def __init__(
        self,
        epoch_based: bool = True,
        train_connector: CallbackConnector | None = None,
        test_connector: CallbackConnector | None = None,
    ) -> None:
        if train_connector is not None and not isinstance(train_connector, CallbackConnector):
            raise TypeError(
                "train_connector must be a CallbackConnector, "
                f"got {type(train_connector).__name__}."
            )
        if test_connector is not None and not isinstance(test_connector, CallbackConnector):
            raise TypeError(
                f"test_connector must be a CallbackConnector, got {type(test_connector).__name__}."
            )
        self.epoch_based = epoch_based
        self.train_connector = train_connector
        self.test_connector = test_connector

    def setup(self) -> None:
        """Setup callback (called once before training or testing starts)."""

    def state_dict(self) -> dict[str, Any]:
        """State to save in checkpoints; empty for stateless callbacks."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state returned by ``state_dict``."""

    def get_train_callback_inputs(self, outputs: DictData, batch: DictData) -> DictData:
        """Returns the data connector results for training.

        Raises:
            ValueError: If the callback has no train connector.
        """
        if self.train_connector is None:
            raise ValueError(
                f"{type(self).__name__} has no train_connector; pass "
                "train_connector=CallbackConnector({...}) to its constructor."
            )
        return self.train_connector(outputs, batch)

    def get_test_callback_inputs(self, outputs: DictData, batch: DictData) -> DictData:
        """Returns the data connector results for inference.

        Raises:
            ValueError: If the callback has no test connector.
        """
        if self.test_connector is None:
            raise ValueError(
                f"{type(self).__name__} has no test_connector; pass "
                "test_connector=CallbackConnector({...}) to its constructor."
            )
        return self.test_connector(outputs, batch)

    def on_train_batch_start(
        self,
        trainer_state: TrainerState,
        model: nn.Module,
        loss_module: LossModule,
        batch: DictData,
        batch_idx: int,
    ) -> None:
        """Hook to run at the start of a training batch (may edit ``batch`` in place)."""

    def on_train_epoch_start(
        self, trainer_state: TrainerState, model: nn.Module, loss_module: LossModule
    ) -> None:
        """Hook to run at the beginning of a training epoch."""

    def on_train_batch_end(
        self,
        trainer_state: TrainerState,
        model: nn.Module,
        loss_module: LossModule,
        outputs: DictData,
        batch: DictData,
        batch_idx: int,
    ) -> MetricLogs | None:
        """Hook to run at the end of a training batch."""
        return None

    def on_before_optimizer_step(
        self, trainer_state: TrainerState, model: nn.Module, optimizer: Optimizer
    ) -> None:
        """Hook to run before ``optimizer`` steps, once per optimizer and step.

        Beyond the reference: runs after the window's last backward and, under
        ``precision="16-mixed"``, after the gradients were unscaled, and before gradient
        clipping and the step -- so ``param.grad`` holds the true gradients of the whole
        window, which a callback may inspect or change (for example to log or rescale them).
        ``trainer_state["global_step"]`` is the number of steps before this one. Runs on every
        rank with the same (all-reduced, under DDP) gradients, in both engines.
        """

    def on_train_epoch_end(
        self, trainer_state: TrainerState, model: nn.Module, loss_module: LossModule
    ) -> None:
        """Hook to run at the end of a training epoch."""

    def on_test_epoch_start(self, trainer_state: TrainerState, model: nn.Module) -> None:
        """Hook to run at the beginning of a testing epoch."""

    def on_test_batch_end(
        self,
        trainer_state: TrainerState,
        model: nn.Module,
        outputs: DictData,
        batch: DictData,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Hook to run at the end of a testing batch."""

    def on_test_epoch_end(self, trainer_state: TrainerState, model: nn.Module) -> MetricLogs | None:
        """Hook to run at the end of a testing epoch."""
        return None

    def on_validation_end(self, trainer_state: TrainerState, model: nn.Module) -> None:
        """Hook to run after a validation during fit, once its logs are stored.

        Beyond the reference: every callback's ``on_test_epoch_end`` has returned and
        ``trainer_state["val_logs"]`` holds this validation's logs (as floats), so a callback
        that acts on a validation result (best checkpoint, early stopping) reads it here, for
        the weights that were just validated. Not called by ``test``. Runs on every rank; the
        model is still in eval mode.
        """

    def on_save_checkpoint(self, trainer_state: TrainerState, model: nn.Module) -> None:
        """Collective hook: runs on every rank just before the training state is collected.

        Beyond the reference: lets a callback make the state consistent first (for
        example, averaging normalisation statistics across ranks).
        """

    def on_fit_end(self, trainer_state: TrainerState, model: nn.Module) -> None:
        """Hook to run once when ``fit`` finishes (flush pending work, close files)."""


def callbacks_overriding(callbacks: Sequence[Callback], hook: str) -> list[Callback]:
    """The callbacks, in list order, whose ``hook`` is not the base class's no-op.

    A loop calls a per-step hook on these only: calling the base no-op has no effect, so
    skipping it cannot be seen, and when no callback overrides a hook its ``TrainerState``
    need not be built at all. A hook set on the instance (a test's stand-in) counts as an
    override too.

    Args:
        callbacks: The run's callbacks, in hook order.
        hook: A hook's name, e.g. ``"on_train_batch_start"``.
    """
    base = getattr(Callback, hook)
    return [
        callback
        for callback in callbacks
        if getattr(getattr(callback, hook), "__func__", None) is not base
    ]
