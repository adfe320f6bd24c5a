"""``CallbackWrapper``: run a vistrain callback, unchanged, inside ``lightning.pytorch.Trainer``.

Each wrapper turns Lightning's hooks into the vistrain hooks of one callback, with a
fresh ``TrainerState`` built by the module's engine for each call (``train_engine="pl"``)::

    setup                                      -> setup() (once)
    on_train_epoch_start                       -> on_train_epoch_start
    on_train_batch_start                       -> on_train_batch_start
    on_train_batch_end                         -> on_train_batch_end (logs -> train/<k>)
    on_train_epoch_end (or after the last batch) -> on_train_epoch_end, dispatched by the
                                                  engine for all callbacks at once, after
                                                  schedulers.step(epoch)
    on_validation_epoch_start / on_test_epoch_start -> on_test_epoch_start
    on_validation_batch_end / on_test_batch_end     -> on_test_batch_end
    on_validation_epoch_end / on_test_epoch_end     -> on_test_epoch_end (logs -> val/<k>
                                                       or test/<k>); after a validation the
                                                       engine runs on_validation_end for
                                                       every callback
    on_fit_end                                 -> on_fit_end

The LightningModule must be a ``vistrain.pl.TrainingModule``: it owns the engine (loop
bookkeeping, checkpoints in the native format, loader swaps). Batch indices are the native
ones (a mid-epoch resume continues counting where the checkpoint stopped).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.logging import log_callback_train_logs
from vistrain.pl.engine import LightningEngine
from vistrain.pl.training_module import TrainingModule


class CallbackWrapper(pl.Callback):
    """A Lightning callback that runs one vistrain ``Callback``.

    Args:
        callback: The vistrain callback to run.

    Raises:
        TypeError: If ``callback`` is not a vistrain ``Callback``.
    """

    def __init__(self, callback: Callback) -> None:
        if not isinstance(callback, Callback):
            raise TypeError(
                f"CallbackWrapper needs a vistrain.engine.callbacks.Callback, got "
                f"{type(callback).__name__}."
            )
        self.callback = callback
        self._setup_done = False

    @property
    def state_key(self) -> str:
        """Unique per wrapped object, so several wrappers of one class can coexist."""
        return f"CallbackWrapper[{type(self.callback).__name__}@{id(self.callback):x}]"

    @staticmethod
    def _engine(pl_module: pl.LightningModule) -> LightningEngine:
        if not isinstance(pl_module, TrainingModule):
            raise TypeError(
                f"CallbackWrapper runs vistrain callbacks on a vistrain.pl.TrainingModule, got "
                f"{type(pl_module).__name__}; wrap the model in TrainingModule(model, "
                "loss_module, optimizers, lr_schedulers, train_data_connector, "
                "test_data_connector, ...)."
            )
        return pl_module.engine

    # ------------------------------------------------------------------ setup / fit
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Register the callback with the engine and run its ``setup`` once."""
        engine = self._engine(pl_module)
        engine.attach(trainer)
        engine.register(self.callback)
        if not self._setup_done:
            self.callback.setup()
            self._setup_done = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``on_fit_end``."""
        engine = self._engine(pl_module)
        self.callback.on_fit_end(engine.train_state(), engine.model)

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``on_train_epoch_start``."""
        engine = self._engine(pl_module)
        self.callback.on_train_epoch_start(engine.train_state(), engine.model, engine.loss_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """``on_train_batch_start`` (may edit ``batch`` in place before the step)."""
        engine = self._engine(pl_module)
        index = batch_idx + engine.batch_offset()
        state = engine.train_state()
        self.callback.on_train_batch_start(state, engine.model, engine.loss_module, batch, index)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """``on_train_batch_end`` with the model's outputs; returned logs go to the engine."""
        engine = self._engine(pl_module)
        index = batch_idx + engine.batch_offset()
        state = engine.train_state(metrics=True)
        logs = self.callback.on_train_batch_end(
            state, engine.model, engine.loss_module, engine.last_outputs, batch, index
        )
        if logs:
            log_callback_train_logs(self.callback, logs, state)
        engine.add_train_logs(logs)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Let the engine end the epoch for every callback, if it has not already."""
        self._engine(pl_module).finish_epoch()

    # ------------------------------------------------------------------ validation / test
    def _test_epoch_start(self, pl_module: pl.LightningModule) -> None:
        engine = self._engine(pl_module)
        self.callback.on_test_epoch_start(engine.test_state(), engine.model)

    def _test_batch_end(
        self, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, idx: int
    ) -> None:
        engine = self._engine(pl_module)
        self.callback.on_test_batch_end(
            engine.test_state(), engine.model, outputs, batch, batch_idx, dataloader_idx=idx
        )

    def _test_epoch_end(self, pl_module: pl.LightningModule) -> None:
        engine = self._engine(pl_module)
        engine.add_eval_logs(self.callback.on_test_epoch_end(engine.test_state(), engine.model))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``on_test_epoch_start``."""
        self._test_epoch_start(pl_module)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``on_test_epoch_start``."""
        self._test_epoch_start(pl_module)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """``on_test_batch_end`` with the model's outputs."""
        self._test_batch_end(pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """``on_test_batch_end`` with the model's outputs."""
        self._test_batch_end(pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``on_test_epoch_end``; returned logs become ``val/<k>``."""
        self._test_epoch_end(pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``on_test_epoch_end``; returned logs become ``test/<k>``."""
        self._test_epoch_end(pl_module)


__all__ = ["CallbackWrapper"]
