"""``TrainingModule``: a LightningModule around a vistrain model, loss, optimizers and schedules.

Training uses Lightning's manual optimization, so one training step is exactly the native
Trainer's: the forward and the loss run under the engine's autocast and the same
``LoopState.train_step`` calls ``manual_backward`` on the divided (and, for fp16, scaled)
loss and, at an accumulation window's end, unscales, clips and steps every optimizer
(through Lightning's optimizer wrappers, so strategies apply), counts one ``global_step``
and runs ``step_on_batch`` of every scheduler. Precision, accumulation and clipping are the
module's arguments, not Lightning's (which refuses the last two under manual optimization).
Epoch-based scheduler steps and the callbacks' epoch end are run by the engine (see
``vistrain.pl.engine``) so their order matches the native loop.

The module's own hooks run after the callbacks' hooks of the same name; it uses them for the
engine's "after every callback" work: writing logs, ending the epoch, restoring RNG states.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from vistrain.common.checks import check_list_of, check_positive_int
from vistrain.common.typing import DictData
from vistrain.engine.connectors import DataConnector
from vistrain.engine.device_setup import (
    check_channels_last,
    check_compile,
    prepare_model,
    to_channels_last,
)
from vistrain.engine.loop_state import as_loader_list
from vistrain.engine.loss_module import LossModule
from vistrain.engine.optim import LRSchedulerWrapper, check_optimizers_train
from vistrain.engine.optimizer_step import check_step_options
from vistrain.engine.scalar_writers import check_logger_names
from vistrain.engine.time_budget import parse_max_time
from vistrain.pl.engine import LightningEngine


def _call_model(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


class TrainingModule(pl.LightningModule):
    """A LightningModule that trains a vistrain model the way the native Trainer does.

    Pass the data loaders here (not to ``trainer.fit``): the module hands Lightning proxies
    that let callbacks swap the training loader (``set_train_dataloader``) and keep the
    native RNG handling. Wrap every vistrain callback in ``CallbackWrapper``.

    Args:
        model: The vistrain model (may contain an EMA adapter).
        loss_module: The training loss (``LossModule``).
        optimizers: One optimizer or several; each is stepped once per training step.
        lr_schedulers: ``LRSchedulerWrapper`` objects (or None).
        train_data_connector: Picks the model's training inputs out of a batch.
        test_data_connector: Picks the model's test inputs out of a batch.
        train_dataloader: Training data.
        test_dataloader: One or several validation / test loaders.
        output_dir: Folder for ``metrics.jsonl`` and TensorBoard files (None: the trainer's
            ``default_root_dir``).
        log_every_n_steps: Write learning rates every n steps.
        tensorboard: Also write TensorBoard event files.
        resume_from: A vistrain checkpoint (either engine's) to resume from at fit start.
        compile: As the native Trainer's: compile the model's forward in place (``True``:
            inductor; a string: that backend), keeping plain parameter names.
        channels_last: As the native Trainer's: model and 4-D batch tensors channels-last
            (batches after Lightning moved them to the device).

        max_time: Training-time budget, as ``Trainer(max_time=...)``: Lightning stops at the
            step where it is spent, after a checkpoint.
        loggers: Scalar writer names, as ``Trainer(loggers=...)``.
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"``, as the native ``Trainer``'s
            (autocast and the fp16 scaler are the engine's; keep Lightning's own
            ``precision`` at its default).
        accumulate_grad_batches: Batches per optimizer step, as the native ``Trainer``'s
            (Lightning refuses its own under manual optimization). An int
            ``val_check_interval`` of the Lightning trainer counts optimizer steps, as the
            native one does, not batches.
        gradient_clip_val: Clip threshold, as the native ``Trainer``'s (None: never).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If there is no optimizer, an optimizer holds none of the model's
            parameters, ``log_every_n_steps`` is below 1 , ``compile`` names no backend
            or a step option is out of range.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_module: LossModule,
        optimizers: Optimizer | Sequence[Optimizer],
        lr_schedulers: LRSchedulerWrapper | Sequence[LRSchedulerWrapper] | None,
        train_data_connector: DataConnector | None,
        test_data_connector: DataConnector | None,
        train_dataloader: DataLoader[DictData] | None = None,
        test_dataloader: DataLoader[DictData] | Sequence[DataLoader[DictData]] | None = None,
        output_dir: str | None = None,
        log_every_n_steps: int = 50,
        tensorboard: bool = True,
        resume_from: str | None = None,
        compile: bool | str = False,
        channels_last: bool = False,
        max_time: float | str | None = None,
        loggers: Sequence[str] | str | None = None,
        precision: str = "32",
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
    ) -> None:
        super().__init__()
        check_step_options(
            precision, accumulate_grad_batches, gradient_clip_val, gradient_clip_algorithm
        )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}.")
        if not isinstance(loss_module, LossModule):
            raise TypeError(f"loss_module must be a LossModule, got {type(loss_module).__name__}.")
        optimizer_list = check_list_of("optimizers", optimizers, Optimizer)
        if not optimizer_list:
            raise ValueError("TrainingModule needs at least one optimizer.")
        check_optimizers_train(optimizer_list, model, loss_module)
        check_positive_int("log_every_n_steps", log_every_n_steps)
        check_compile(compile)
        check_channels_last(channels_last)
        for name, connector in (
            ("train_data_connector", train_data_connector),
            ("test_data_connector", test_data_connector),
        ):
            if connector is not None and not isinstance(connector, DataConnector):
                raise TypeError(f"{name} must be a DataConnector, got {type(connector).__name__}.")
        if train_dataloader is not None and not isinstance(train_dataloader, DataLoader):
            raise TypeError(
                f"train_dataloader must be a DataLoader, got {type(train_dataloader).__name__}."
            )
        self.automatic_optimization = False
        self.model = model
        self.loss_module = loss_module
        self.train_data_connector = train_data_connector
        self.test_data_connector = test_data_connector
        self.output_dir = output_dir
        self.resume_from = resume_from
        self.compile_model = compile
        self.channels_last = channels_last
        self.engine = LightningEngine(
            model=model,
            loss_module=loss_module,
            optimizers=optimizer_list,
            lr_schedulers=check_list_of("lr_schedulers", lr_schedulers, LRSchedulerWrapper),
            train_dataloader=train_dataloader,
            test_dataloaders=as_loader_list(test_dataloader),
            output_dir=output_dir,
            log_every_n_steps=log_every_n_steps,
            tensorboard=tensorboard,
            max_time=parse_max_time(max_time),
            loggers=check_logger_names(loggers),
            precision=precision,
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
        )

    # ------------------------------------------------------------------ Lightning API
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model."""
        return self.model(*args, **kwargs)

    def configure_optimizers(self) -> Any:
        """The vistrain optimizers (schedulers are stepped by the engine, not Lightning)."""
        return list(self.engine.optimizers)

    def train_dataloader(self) -> Any:
        """The engine's training-data proxy (serves the current loader, started lazily)."""
        if self.engine.train_dataloader is None:
            raise ValueError("TrainingModule was built without train_dataloader; fit needs one.")
        return self.engine.train_loader_proxy

    def val_dataloader(self) -> Any:
        """The test loaders behind lazy proxies (empty list: no validation)."""
        return list(self.engine.test_loader_proxies)

    def test_dataloader(self) -> Any:
        """The test loaders behind lazy proxies."""
        return list(self.engine.test_loader_proxies)

    def _root(self) -> str:
        return self.output_dir or str(self.trainer.default_root_dir)

    def setup(self, stage: str) -> None:
        """Attach the engine to the trainer; channels-last and compile the model.

        Lightning moves the module to its device after this hook (keeping the memory format).
        """
        self.engine.attach(self.trainer)
        prepare_model(self.model, None, self.compile_model, self.channels_last)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The batch on the device; its 4-D floating-point tensors channels-last if asked."""
        return to_channels_last(batch) if self.channels_last else batch

    def on_fit_start(self) -> None:
        """Resume from ``resume_from`` (our checkpoint format) and open the scalar writers."""
        self.engine.start_fit(self._root(), self.resume_from)

    def on_train_start(self) -> None:
        """Take the stop signals back from Lightning's handler (see ``LightningEngine``)."""
        self.engine.start_training()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Connector -> model -> loss; backward and step every optimizer; return the loss.

        The model outputs and loss metrics are handed to the engine, which shows them to the
        callbacks' ``on_train_batch_end`` as the native loop does.
        """
        if self.train_data_connector is None:
            raise ValueError("TrainingModule needs train_data_connector to train.")
        with self.engine.loop.stepper.autocast():
            outputs = _call_model(self.model, self.train_data_connector(batch))
            total_loss, metrics = self.loss_module(outputs, batch)
        optimizers = self.optimizers()
        opt_list = optimizers if isinstance(optimizers, list) else [optimizers]
        self.engine.train_step(
            batch_idx, total_loss, metrics, outputs, opt_list, backward=self.manual_backward
        )
        return total_loss.detach()

    def _eval_step(self, batch: Any) -> Any:
        if self.test_data_connector is None:
            raise ValueError("TrainingModule needs test_data_connector to validate or test.")
        return _call_model(self.model, self.test_data_connector(batch))

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """Connector -> model; the outputs go to the callbacks' ``on_test_batch_end``."""
        return self._eval_step(batch)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """Connector -> model; the outputs go to the callbacks' ``on_test_batch_end``."""
        return self._eval_step(batch)

    # ------------------------------------------------------------------ after the callbacks
    def on_train_epoch_start(self) -> None:
        """Native order: the model is in training mode once the epoch-start hooks ran."""
        self.model.train()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Inside an accumulation window, keep DDP from all-reducing this batch's gradients.

        Runs before Lightning calls the DDP-wrapped ``training_step``, so the forward and the
        backward both run under ``no_sync``; ``on_train_batch_end`` leaves it.
        """
        self.engine.enter_no_sync(self.trainer.model, batch_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Write the callbacks' logs; end the epoch after its last batch (epoch validation)."""
        self.engine.leave_no_sync()
        self.engine.after_train_batch()

    def on_train_epoch_end(self) -> None:
        """End the epoch here if not done after the last batch (step-based validation)."""
        self.engine.finish_epoch()

    def on_validation_model_eval(self) -> None:
        """Save the RNG states before the validation loader starts, then switch to eval."""
        self.engine.start_validation()
        super().on_validation_model_eval()

    def on_validation_epoch_end(self) -> None:
        """Keep and write the validation logs (``val/<k>``); run ``on_validation_end``."""
        self.engine.end_validation_epoch()

    def on_validation_end(self) -> None:
        """Restore the RNG states: validating never changes training randomness."""
        self.engine.end_validation()

    def on_test_epoch_end(self) -> None:
        """Write the callbacks' test logs as ``test/<k>``; kept in ``test_results``."""
        self.test_results = self.engine.end_test_epoch(self._root())

    def teardown(self, stage: str) -> None:
        """Close the scalar writers (also after an exception)."""
        self.engine.close()


__all__ = ["TrainingModule"]
