"""The native training loop.

``Trainer`` runs training and testing and calls every callback's hooks, in list order,
at these points::

    callbacks.setup(); resume from ckpt_path if given
    for epoch in range(start_epoch, num_epochs):
        on_train_epoch_start(state, model, loss_module)
        model.train(); sampler.set_epoch(epoch)
        for batch_idx, batch in enumerate(train_dataloader):
            on_train_batch_start(state, model, loss_module, batch, batch_idx)  # may edit batch
            outputs = model(**train_data_connector(batch))
            loss, metrics = loss_module(outputs, batch)
            loss.backward(); optimizer.step() for every optimizer; global_step += 1
            scheduler.step_on_batch(global_step) for every scheduler
            logs = on_train_batch_end(state, model, loss_module, outputs, batch, batch_idx)
            -> logs written as train/<key>
            validate when val_check_interval divides global_step
        scheduler.step(epoch) for every scheduler
        on_train_epoch_end(state, model, loss_module)
        validate when (epoch + 1) % check_val_every_n_epoch == 0
    on_fit_end(state, model)

    validate / test:
        model.eval(); on_test_epoch_start(state, model)
        for each test dataloader, for each batch:
            outputs = model(**test_data_connector(batch))
            on_test_batch_end(state, model, outputs, batch, batch_idx, dataloader_idx)
        logs = on_test_epoch_end(state, model) -> val/<key> (during fit) or test/<key>

Validation never changes the global random generators' states (they are restored after
it), so training randomness does not depend on how often a run validates or whether it
was resumed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from vistrain.common.device import resolve_device
from vistrain.common.distributed import is_distributed
from vistrain.common.typing import DictData, MetricLogs
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.logging import log_callback_train_logs, log_evaluation_logs
from vistrain.engine.callbacks.trainer_state import TrainerState
from vistrain.engine.connectors import DataConnector
from vistrain.engine.loss_module import LossModule
from vistrain.engine.optim import LRSchedulerWrapper
from vistrain.engine.rng import preserved_rng_state
from vistrain.engine.run_state import (
    as_list,
    as_loader_list,
    check_optimizers_train,
    collect_checkpoint,
    lr_scalars,
    num_batches,
    restore_checkpoint,
    start_epoch_iterator,
)
from vistrain.engine.scalar_log import ScalarLogger


def move_to_device(data: Any, device: torch.device) -> Any:
    """Move every tensor in nested dicts, lists and tuples to ``device``; leave the rest."""
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=True)
    if isinstance(data, dict):
        return {key: move_to_device(value, device) for key, value in data.items()}
    if isinstance(data, list):
        return [move_to_device(value, device) for value in data]
    if isinstance(data, tuple) and not hasattr(data, "_fields"):
        return tuple(move_to_device(value, device) for value in data)
    return data


class Trainer:
    """Runs the training and testing loops and calls the callbacks (see the module docstring).

    Args:
        device: Device to train on (``"cpu"``, ``"cuda"``, ``torch.device``).
        output_dir: Folder for scalar logs (``metrics.jsonl``, TensorBoard files).
        train_dataloader: Training data; None for a test-only trainer.
        test_dataloader: One or several test dataloaders; None to never validate.
        train_data_connector: Picks the model's training inputs out of a batch.
        test_data_connector: Picks the model's test inputs out of a batch.
        callbacks: Callbacks, called in list order.
        num_epochs: Epoch limit (-1 = none).
        num_steps: Optimizer-step limit (-1 = none); training stops right after that step.
        check_val_every_n_epoch: Validate after every n-th epoch (None or 0 = never by epoch).
        val_check_interval: Validate every n optimizer steps (None = never by step).
        log_every_n_steps: Write the learning rates every n steps.
        tensorboard: Also write TensorBoard event files next to ``metrics.jsonl``.

    Raises:
        ValueError: If a limit or an interval is out of range, or ``device`` is not a device
            or not available on this machine.
        NotADirectoryError: If ``output_dir`` is an existing file.
        TypeError: If a callback does not subclass ``Callback``.
    """

    def __init__(
        self,
        device: str | torch.device,
        output_dir: str,
        train_dataloader: DataLoader[DictData] | None,
        test_dataloader: DataLoader[DictData] | Sequence[DataLoader[DictData]] | None,
        train_data_connector: DataConnector | None,
        test_data_connector: DataConnector | None,
        callbacks: Sequence[Callback],
        num_epochs: int = 1000,
        num_steps: int = -1,
        check_val_every_n_epoch: int | None = 1,
        val_check_interval: int | None = None,
        log_every_n_steps: int = 50,
        tensorboard: bool = True,
    ) -> None:
        if num_epochs < -1 or num_epochs == 0:
            raise ValueError(f"num_epochs={num_epochs} must be >= 1, or -1 for no limit.")
        if num_steps < -1 or num_steps == 0:
            raise ValueError(f"num_steps={num_steps} must be >= 1, or -1 for no limit.")
        if check_val_every_n_epoch is not None and check_val_every_n_epoch < 0:
            raise ValueError(
                f"check_val_every_n_epoch={check_val_every_n_epoch} must be >= 1 (or None/0)."
            )
        if val_check_interval is not None and val_check_interval < 1:
            raise ValueError(f"val_check_interval={val_check_interval} must be >= 1 or None.")
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps={log_every_n_steps} must be >= 1.")
        for idx, callback in enumerate(callbacks):
            if not isinstance(callback, Callback):
                raise TypeError(
                    f"callbacks[{idx}] is {type(callback).__name__}; callbacks must subclass "
                    "vistrain.engine.callbacks.Callback."
                )
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise NotADirectoryError(
                f"output_dir={output_dir!r} is a file; give a folder (it is created if missing)."
            )
        self.device = resolve_device(device)
        self.output_dir = output_dir
        self.train_dataloader = train_dataloader
        self.test_dataloader: list[DataLoader[DictData]] | None = (
            as_loader_list(test_dataloader) or None
        )
        self.train_data_connector = train_data_connector
        self.test_data_connector = test_data_connector
        self.callbacks = list(callbacks)
        self.num_epochs = num_epochs
        self.num_steps = num_steps
        self.check_val_every_n_epoch = check_val_every_n_epoch or None
        self.val_check_interval = val_check_interval
        self.log_every_n_steps = log_every_n_steps
        self.tensorboard = tensorboard

        self.current_epoch = 0
        self.global_step = 0
        self.batches_done = 0
        self.epoch_finished = False
        self.val_logs: dict[str, float] = {}
        self._epoch_start_rng: dict[str, Any] | None = None
        self._setup_done = False
        self._scalars: ScalarLogger | None = None
        self._model: nn.Module | None = None
        self._optimizers: list[Optimizer] = []
        self._lr_schedulers: list[LRSchedulerWrapper] = []
        self._pending_train_dataloader: DataLoader[DictData] | None = None

    # ----------------------------------------------------------------- engine API
    def set_train_dataloader(self, dataloader: DataLoader[Any]) -> None:
        """Train on ``dataloader`` from the next epoch start on (a running epoch is not cut).

        Called from ``on_train_epoch_start``, the new loader already serves that epoch.
        """
        if not isinstance(dataloader, DataLoader):
            raise TypeError(f"Expected a DataLoader, got {type(dataloader).__name__}.")
        self._pending_train_dataloader = dataloader

    def set_check_val_every_n_epoch(self, every_n_epochs: int) -> None:
        """Validate every ``every_n_epochs`` epochs from now on."""
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be >= 1.")
        self.check_val_every_n_epoch = every_n_epochs

    def _state(self, training: bool = True) -> TrainerState:
        state = TrainerState(
            current_epoch=self.current_epoch,
            num_epochs=self.num_epochs,
            global_step=self.global_step,
            num_steps=self.num_steps,
            train_dataloader=self.train_dataloader,
            num_train_batches=num_batches(self.train_dataloader),
            test_dataloader=self.test_dataloader,
            num_test_batches=(
                None
                if self.test_dataloader is None
                else [num_batches(dl) or 0 for dl in self.test_dataloader]
            ),
            train_module=self,
            train_engine="native",
            val_logs=self.val_logs,
            batches_done=self.batches_done,
        )
        if training:
            state["optimizers"] = self._optimizers
            state["lr_schedulers"] = self._lr_schedulers
        return state

    def checkpoint_state(self) -> dict[str, Any]:
        """Collective: the complete training state; every rank must call it.

        See ``vistrain.engine.run_state.collect_checkpoint`` for the contents.
        """
        if self._model is None:
            raise RuntimeError("checkpoint_state() is only available while fit() runs.")
        return collect_checkpoint(
            trainer_state=self._state(),
            model=self._model,
            optimizers=self._optimizers,
            lr_schedulers=self._lr_schedulers,
            callbacks=self.callbacks,
            epoch=self.current_epoch,
            epoch_finished=self.epoch_finished,
            batches_done=self.batches_done,
            global_step=self.global_step,
            val_logs=self.val_logs,
            train_dataloader=self.train_dataloader,
            epoch_start_rng=self._epoch_start_rng,
        )

    # ----------------------------------------------------------------- fit
    def _setup(self) -> None:
        if not self._setup_done:
            for callback in self.callbacks:
                callback.setup()
            self._setup_done = True

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        needs_ddp = is_distributed() and not isinstance(model, nn.parallel.DistributedDataParallel)
        if needs_ddp and any(p.requires_grad for p in model.parameters()):
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return model

    def fit(
        self,
        model: nn.Module,
        optimizers: Optimizer | Sequence[Optimizer],
        lr_schedulers: LRSchedulerWrapper | Sequence[LRSchedulerWrapper] | None,
        loss_module: LossModule,
        ckpt_path: str | None = None,
    ) -> None:
        """Train ``model``; resume from ``ckpt_path`` when given.

        Raises:
            ValueError: If there is no training data or connector, an optimizer holds none of
                the parameters of ``model`` and ``loss_module``, or the checkpoint does not
                fit (nothing is changed in that case).
            FileNotFoundError: If ``ckpt_path`` does not exist.
        """
        if self.train_dataloader is None or self.train_data_connector is None:
            raise ValueError("fit() needs train_dataloader and train_data_connector.")
        if not isinstance(loss_module, LossModule):
            raise TypeError(f"loss_module must be a LossModule, got {type(loss_module).__name__}.")
        self._optimizers = as_list(optimizers, "optimizers", Optimizer)
        if not self._optimizers:
            raise ValueError("fit() needs at least one optimizer.")
        self._lr_schedulers = as_list(lr_schedulers, "lr_schedulers", LRSchedulerWrapper)
        check_optimizers_train(self._optimizers, model, loss_module)
        model = self._wrap_model(model)
        loss_module.to(self.device)
        self._model = model
        self._setup()
        start_epoch, skip_batches, resume_rng = 0, 0, None
        if ckpt_path is not None:
            start_epoch, skip_batches, resume_rng = self._resume(ckpt_path, model)
        self._scalars = ScalarLogger(
            self.output_dir,
            tensorboard=self.tensorboard,
            purge_after_step=self.global_step if ckpt_path is not None else None,
        )
        try:
            self._fit_loop(model, loss_module, start_epoch, skip_batches, resume_rng)
            state = self._state()
            for callback in self.callbacks:
                callback.on_fit_end(state, model)
        finally:
            self._scalars.close()
            self._scalars = None

    def _stop(self) -> bool:
        return self.num_steps != -1 and self.global_step >= self.num_steps

    def _fit_loop(
        self,
        model: nn.Module,
        loss_module: LossModule,
        start_epoch: int,
        skip_batches: int,
        resume: tuple[dict[str, Any], dict[str, Any]] | None,
    ) -> None:
        epoch = start_epoch
        while (self.num_epochs == -1 or epoch < self.num_epochs) and not self._stop():
            self.current_epoch = epoch
            self.epoch_finished = False
            self.batches_done = skip_batches
            self._train_epoch(model, loss_module, skip_batches, resume)
            skip_batches, resume = 0, None
            if self._stop() and not self.epoch_finished:
                break
            epoch += 1

    def _epoch_iterator(
        self, skip_batches: int, resume: tuple[dict[str, Any], dict[str, Any]] | None
    ) -> Iterator[Any]:
        """Start the epoch's data iterator; on a mid-epoch resume, replay and skip batches.

        A dataloader handed over with ``set_train_dataloader`` (before or during
        ``on_train_epoch_start``) is adopted here, so it serves the whole epoch.
        """
        if self._pending_train_dataloader is not None:
            self.train_dataloader = self._pending_train_dataloader
            self._pending_train_dataloader = None
        if self.train_dataloader is None:
            raise RuntimeError("No training dataloader.")
        iterator, self._epoch_start_rng = start_epoch_iterator(
            self.train_dataloader, self.current_epoch, skip_batches, resume
        )
        return iterator

    def _train_epoch(
        self,
        model: nn.Module,
        loss_module: LossModule,
        skip_batches: int,
        resume: tuple[dict[str, Any], dict[str, Any]] | None,
    ) -> None:
        state = self._state()
        for callback in self.callbacks:
            callback.on_train_epoch_start(state, model, loss_module)
        model.train()
        iterator = self._epoch_iterator(skip_batches, resume)
        # A loader handed over in on_train_epoch_start serves this epoch: describe that one.
        state["train_dataloader"] = self.train_dataloader
        state["num_train_batches"] = num_batches(self.train_dataloader)
        connector = self.train_data_connector
        if connector is None:
            raise RuntimeError("No train data connector.")
        batch_idx = skip_batches
        move_batches = self.device.type != "cpu"  # loaders yield CPU tensors already
        # Per-step path, kept flat: on a short step every call and lookup shows in
        # benchmarks/overhead.py. The hooks still run in the order of the class docstring.
        callbacks = self.callbacks
        optimizers = self._optimizers
        schedulers = self._lr_schedulers
        log_every = self.log_every_n_steps
        val_every = self.val_check_interval
        num_steps = self.num_steps
        for batch in iterator:
            if move_batches:
                batch = move_to_device(batch, self.device)
            state["global_step"] = self.global_step
            state["batches_done"] = self.batches_done
            for callback in callbacks:
                callback.on_train_batch_start(state, model, loss_module, batch, batch_idx)
            inputs = connector(batch)
            outputs = model(**inputs) if isinstance(inputs, dict) else model(inputs)
            total_loss, metrics = loss_module(outputs, batch)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            total_loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            self.global_step = step = self.global_step + 1
            for scheduler in schedulers:
                scheduler.step_on_batch(step)
            self.batches_done = batch_idx + 1
            state["global_step"] = step
            state["batches_done"] = self.batches_done
            state["metrics"] = metrics
            logs: MetricLogs | None = None
            for callback in callbacks:
                cb_logs = callback.on_train_batch_end(
                    state, model, loss_module, outputs, batch, batch_idx
                )
                if cb_logs:
                    logs = dict(cb_logs) if logs is None else {**logs, **cb_logs}
                    log_callback_train_logs(callback, cb_logs, state)
            if logs or step % log_every == 0 or step == 1:
                self._log_train(logs or {})
            if val_every and step % val_every == 0:
                self._validate(model)
                model.train()
            batch_idx += 1
            if num_steps != -1 and step >= num_steps:
                return
        for scheduler in self._lr_schedulers:
            scheduler.step(self.current_epoch)
        self.epoch_finished = True
        state = self._state()
        for callback in self.callbacks:
            callback.on_train_epoch_end(state, model, loss_module)
        every = self.check_val_every_n_epoch
        if every and (self.current_epoch + 1) % every == 0:
            self._validate(model)

    def _log_train(self, logs: MetricLogs) -> None:
        log_step = self.global_step % self.log_every_n_steps == 0 or self.global_step == 1
        if self._scalars is None or not (logs or log_step):
            return
        scalars: dict[str, Any] = {f"train/{key}": value for key, value in logs.items()}
        if log_step:
            scalars.update(lr_scalars(self._optimizers))
            scalars["epoch"] = self.current_epoch
        if scalars:
            self._scalars.log(scalars, self.global_step, self.current_epoch)

    def _validate(self, model: nn.Module) -> None:
        if not self.test_dataloader:
            return
        with preserved_rng_state():
            logs = self._run_test(model)
        self.val_logs = {key: float(value) for key, value in logs.items()}
        log_evaluation_logs("Validation", self.val_logs, self.current_epoch, self.global_step)
        if self._scalars is not None and logs:
            self._scalars.log(
                {f"val/{key}": value for key, value in logs.items()},
                self.global_step,
                self.current_epoch,
            )

    # ----------------------------------------------------------------- test
    @torch.no_grad()
    def _run_test(self, model: nn.Module) -> MetricLogs:
        if not self.test_dataloader or self.test_data_connector is None:
            raise ValueError("Testing needs test_dataloader and test_data_connector.")
        model.eval()
        state = self._state(training=self._model is not None)
        for callback in self.callbacks:
            callback.on_test_epoch_start(state, model)
        for loader_idx, loader in enumerate(self.test_dataloader):
            for batch_idx, raw_batch in enumerate(loader):
                batch = move_to_device(raw_batch, self.device)
                inputs = self.test_data_connector(batch)
                outputs = model(**inputs) if isinstance(inputs, dict) else model(inputs)
                for callback in self.callbacks:
                    callback.on_test_batch_end(
                        state, model, outputs, batch, batch_idx, dataloader_idx=loader_idx
                    )
        logs: MetricLogs = {}
        for callback in self.callbacks:
            cb_logs = callback.on_test_epoch_end(state, model)
            if cb_logs:
                logs.update(cb_logs)
        return logs

    def test(self, model: nn.Module) -> dict[str, float]:
        """Evaluate ``model`` on the test dataloaders; logs go to ``test/<key>``.

        Returns:
            The logs returned by the callbacks' ``on_test_epoch_end``, as floats.
        """
        model = model.to(self.device)
        self._setup()
        logs = self._run_test(model)
        result = {key: float(value) for key, value in logs.items()}
        log_evaluation_logs("Test", result)
        scalars = ScalarLogger(self.output_dir, tensorboard=self.tensorboard)
        try:
            scalars.log(
                {f"test/{key}": value for key, value in result.items()},
                self.global_step,
                self.current_epoch,
            )
        finally:
            scalars.close()
        return result

    # ----------------------------------------------------------------- resume
    def _resume(
        self, ckpt_path: str, model: nn.Module
    ) -> tuple[int, int, tuple[dict[str, Any], dict[str, Any]] | None]:
        """Restore everything from ``ckpt_path``; return where the loop starts."""
        point = restore_checkpoint(
            ckpt_path,
            model=model,
            optimizers=self._optimizers,
            lr_schedulers=self._lr_schedulers,
            callbacks=self.callbacks,
            train_dataloader=self.train_dataloader,
        )
        self.global_step = point.global_step
        self.val_logs = point.val_logs
        self.current_epoch = point.start_epoch
        return point.start_epoch, point.skip_batches, point.resume_rng
